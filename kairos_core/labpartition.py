"""One split-and-heal round on real ``kairos run`` processes, for the partition tests and benchmark.

A round cuts the network in two — the sitting leader and one more node on the minority side —,
lets each side elect (or keep) its leader and take writes, heals, and times from the heal to:

- ``reconnect_s``: every node admitted to every other again;
- ``converge_s``: every node holds every acknowledged write of both sides, and the key both
  sides wrote resolves to one value everywhere;
- ``leader_s``: every node names the same leader.

``step_down_s`` is the time from the cut until the old leader stops saying ``is_leader``. A time
is ``None`` when it was not reached within the round's timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .errors import KairosError
from .labnodes import LabNetwork, LabNode

# How a round cuts: frames dropped on the bridge, a host firewall on both sides' input, or only
# the majority's input (the minority's packets vanish, the majority's still arrive).
CUT_MODES = ("bridge", "input", "oneway")


@dataclass
class RoundResult:
    """What one round measured (seconds; ``None``: not reached in time)."""

    mode: str
    split_s: float
    step_down_s: float | None = None
    reconnect_s: float | None = None
    converge_s: float | None = None
    leader_s: float | None = None
    acknowledged: int = 0
    missing: dict[int, int] = field(default_factory=dict)  # node index → acknowledged writes it lacks

    @property
    def ok(self) -> bool:
        """Reconnected, converged and agreed on a leader."""
        return None not in (self.reconnect_s, self.converge_s, self.leader_s)


def leader_of(node: LabNode) -> tuple[str, int] | None:
    """``(peer_id, epoch)`` as ``node`` sees it, or None."""
    status = node.status()
    if not status or not status.get("leader"):
        return None
    return status["leader"]["peer_id"], status["leader"]["epoch"]


def bucket_of(node: LabNode, bucket: str) -> dict[str, Any] | None:
    """The items of one ledger bucket on ``node`` (None while its API does not answer)."""
    try:
        return node.client.request("GET", f"/api/ledger/{bucket}")
    except KairosError:
        return None


def _poll_until(condition, deadline: float, interval: float = 0.05) -> float | None:
    while True:
        if condition():
            return time.monotonic()
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def split_and_heal(network: LabNetwork, round_no: int, *, mode: str = "input", split_s: float = 0.0,
                   keys: int = 50, timeout: float = 60.0) -> RoundResult:
    """Run one round on a formed network; see the module docstring."""
    if mode not in CUT_MODES:
        raise ValueError(f"mode must be one of {CUT_MODES}, not {mode!r}")
    nodes = list(network.nodes.values())
    ids = {node.index: node.peer_id for node in nodes}
    view = leader_of(nodes[0])
    if view is None:
        raise RuntimeError("the network has no leader to start a round from")
    old_leader, epoch = view
    leader_index = next(i for i, peer in ids.items() if peer == old_leader)
    others = [i for i in ids if i != leader_index]
    minority = [leader_index, others[round_no % len(others)]]
    majority = [i for i in ids if i not in minority]
    lab = network.lab
    result = RoundResult(mode=mode, split_s=split_s)

    cut = time.monotonic()
    if mode == "bridge":
        lab.partition(minority, majority)
    else:
        lab.drop_inbound(majority, minority, oneway=(mode == "oneway"))
    try:
        deadline = cut + timeout
        majority_nodes = [network.nodes[i] for i in majority]
        _poll_until(lambda: all((leader_of(n) or ("", 0))[1] > epoch for n in majority_nodes)
                    and len({leader_of(n) for n in majority_nodes}) == 1, deadline)
        stepped = _poll_until(lambda: (network.nodes[leader_index].status() or {}).get("is_leader") is False, deadline)
        result.step_down_s = None if stepped is None else round(stepped - cut, 3)
        bucket = f"partition-{round_no}"
        expected: dict[str, Any] = {}
        for side, members in (("minority", minority), ("majority", majority)):
            writer = network.nodes[members[0]]
            for k in range(keys):
                key, value = f"{side}-{k}", {"side": side, "k": k}
                try:
                    writer.client.request("PUT", f"/api/ledger/{bucket}/{key}", json=value)
                except KairosError:
                    continue  # not acknowledged: not expected anywhere
                expected[key] = value
            try:
                writer.client.request("PUT", f"/api/ledger/{bucket}/shared", json={"side": side})
            except KairosError:
                pass
        result.acknowledged = len(expected)
        remaining = split_s - (time.monotonic() - cut)
        if remaining > 0:
            time.sleep(remaining)
    finally:
        lab.heal()
    healed = time.monotonic()
    deadline = healed + timeout

    def reconnected() -> bool:
        return all((node.status() or {}).get("admitted") == len(nodes) - 1 for node in nodes)

    def converged() -> bool:
        views = [bucket_of(node, bucket) for node in nodes]
        if any(v is None for v in views):
            return False
        shared = {repr(v.get("shared")) for v in views}
        return len(shared) == 1 and all(all(v.get(k) == value for k, value in expected.items()) for v in views)

    def agreed() -> bool:
        seen = {leader_of(node) for node in nodes}
        return len(seen) == 1 and None not in seen

    pending = {"reconnect_s": reconnected, "converge_s": converged, "leader_s": agreed}
    while pending and time.monotonic() <= deadline:
        for name, check in list(pending.items()):
            if check():
                setattr(result, name, round(time.monotonic() - healed, 3))
                del pending[name]
        time.sleep(0.05)
    for node in nodes:
        items = bucket_of(node, bucket) or {}
        lacking = sum(1 for k, value in expected.items() if items.get(k) != value)
        if lacking:
            result.missing[node.index] = lacking
    return result
