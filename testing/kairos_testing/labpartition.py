"""One split-and-heal round on real ``kairos run`` processes, for the partition tests and benchmark.

A round cuts the network in two — the sitting leader and one more node on the minority side —,
lets each side elect (or keep) its leader and take writes, heals, and times from the heal to:

- ``reconnect_s``: every node admitted to every other again;
- ``converge_s``: every node holds every acknowledged write of both sides, and the key both
  sides wrote resolves to one value everywhere;
- ``leader_s``: every node names the same leader.

During the split, timed from the cut and polled side by side (so that one does not wait for the
other):

- ``cut_seen_s``: the old leader's connections to the majority are gone (keepalive detection);
- ``members_lost_s``: its membership counts no majority node alive any more;
- ``step_down_s``: it stops saying ``is_leader``;
- ``new_leader_s``: every majority node names one leader of a higher epoch.

A time is ``None`` when it was not reached within the round's timeout. ``sync_counters`` are the
replication counters (summed over the nodes) that moved from the heal until the end of the
round (read ``COUNTERS_SETTLE`` s after it), to tell a slow convergence's cause; ``cut_at``/``healed_at`` are wall-clock times, to
find a round in the nodes' logs.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kairos_core.errors import KairosError
from .labnodes import LabNetwork, LabNode

# How a round cuts: frames dropped on the bridge, a host firewall on both sides' input, or only
# the majority's input (the minority's packets vanish, the majority's still arrive).
CUT_MODES = ("bridge", "input", "oneway")


@dataclass
class RoundResult:
    """What one round measured (seconds; ``None``: not reached in time)."""

    mode: str
    split_s: float
    cut_seen_s: float | None = None
    members_lost_s: float | None = None
    step_down_s: float | None = None
    new_leader_s: float | None = None
    reconnect_s: float | None = None
    converge_s: float | None = None
    leader_s: float | None = None
    acknowledged: int = 0
    missing: dict[int, int] = field(default_factory=dict)  # node index → acknowledged writes it lacks
    sync_counters: dict[str, int] = field(default_factory=dict)
    cut_at: float = 0.0
    healed_at: float = 0.0

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


def _poll_all(checks: dict[str, Any], since: float, deadline: float, interval: float = 0.05) -> dict[str, float | None]:
    """Poll every check side by side until each held once; seconds from ``since`` (None: never)."""
    reached: dict[str, float | None] = dict.fromkeys(checks)
    pending = dict(checks)
    while pending and time.monotonic() <= deadline:
        for name, check in list(pending.items()):
            if check():
                reached[name] = round(time.monotonic() - since, 3)
                del pending[name]
        time.sleep(interval)
    return reached


# Replication counters that tell why a convergence took long (see kairos_core.replication).
SYNC_COUNTERS = (
    "syncs",
    "sync_failures",
    "syncs_cancelled",
    "syncs_confirmed",
    "syncs_still_differing",
    "admission_syncs_taken_over",
    "admission_syncs_abandoned",
    "admission_syncs_queued",
    "syncs_refused_busy",
)
# After convergence the admission syncs still run their confirming digest checks: read the
# counters this much later.
COUNTERS_SETTLE = 2.0


def _sync_counters(nodes: list[LabNode]) -> Counter[str]:
    total: Counter[str] = Counter()
    for node in nodes:
        counters = (node.status() or {}).get("counters", {})
        total.update({name: counters.get(name, 0) for name in SYNC_COUNTERS})
    return total


def split_and_heal(
    network: LabNetwork, round_no: int, *, mode: str = "input", split_s: float = 0.0, keys: int = 50, timeout: float = 60.0
) -> RoundResult:
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

    old_node = network.nodes[leader_index]
    majority_nodes = [network.nodes[i] for i in majority]
    majority_ids = {ids[i] for i in majority}

    def cut_seen() -> bool:
        return (old_node.status() or {}).get("admitted", len(nodes)) <= len(minority) - 1

    def members_lost() -> bool:
        try:
            rows = old_node.client.request("GET", "/api/peers")
        except KairosError:
            return False
        return not any(row["alive"] and row["peer_id"] in majority_ids for row in rows)

    def stepped_down() -> bool:
        return (old_node.status() or {}).get("is_leader") is False

    def new_leader() -> bool:
        seen = {leader_of(n) for n in majority_nodes}
        return len(seen) == 1 and all(view is not None and view[1] > epoch for view in seen)

    result.cut_at = time.time()
    cut = time.monotonic()
    if mode == "bridge":
        lab.partition(minority, majority)
    else:
        lab.drop_inbound(majority, minority, oneway=(mode == "oneway"))
    try:
        during = _poll_all(
            {"cut_seen_s": cut_seen, "members_lost_s": members_lost, "step_down_s": stepped_down, "new_leader_s": new_leader},
            cut,
            cut + timeout,
        )
        for name, value in during.items():
            setattr(result, name, value)
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
        before = _sync_counters(nodes)
        lab.heal()
    result.healed_at = time.time()
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

    after = _poll_all({"reconnect_s": reconnected, "converge_s": converged, "leader_s": agreed}, healed, deadline)
    for name, value in after.items():
        setattr(result, name, value)
    time.sleep(COUNTERS_SETTLE)
    moved = _sync_counters(nodes)
    moved.subtract(before)
    result.sync_counters = {name: count for name, count in sorted(moved.items()) if count}
    for node in nodes:
        items = bucket_of(node, bucket) or {}
        lacking = sum(1 for k, value in expected.items() if items.get(k) != value)
        if lacking:
            result.missing[node.index] = lacking
    return result
