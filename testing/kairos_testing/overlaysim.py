"""A simulated overlay driven by the real :class:`~kairos_core.connections.ConnectionManager`.

What it answers fast, for any N: does the bounded-degree overlay *settle* — once every node has
its degree, does the network stop dialling and trimming — and how many connection changes does
one lost connection set off (each change is a rewrite of two ``nodes`` entries that every node
receives, see ``docs/scaling.md``)? A real network of 50 processes on 2 cores takes a quarter of
an hour to say the same, blurred by the machine's saturation.

What is real: the connection manager's decisions (``to_dial``, ``to_trim``), called once per
simulated second per node as the dial manager does. What is modelled, simply: a dial completes
after ``dial_delay`` seconds (both ends then count the connection); a trim closes both ends at
once and the trimmed peer holds off the trimmer for ``hold`` seconds (the trim notice); the
degree a peer's ``nodes`` entry lists lags its true degree by ``publish_lag`` seconds; every node
knows every other as a candidate (a LAN with mDNS, or a ledger with everyone's addresses); a
bridge is an edge whose removal disconnects the graph (each node is given the true graph, not its
view of the vouching graph). Connections can be lost at random (``loss_per_s``, per connection).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kairos_core.connections import ConnectionManager


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _SimNode:
    node_id: str
    peers: set[str] = field(default_factory=set)
    held: dict[str, float] = field(default_factory=dict)  # peer -> hold-off ends
    dialling: set[str] = field(default_factory=set)
    started: bool = False
    manager: ConnectionManager | None = None

    def admitted_peers(self) -> set[str]:
        return set(self.peers)

    async def disconnect(self, peer_id: str) -> None:  # (the simulation closes both ends itself)
        raise AssertionError("the simulation closes connections itself")


class Overlay:
    """N simulated nodes; :meth:`run` advances the clock one second at a time.

    :param start_spread: nodes start at random times within this many seconds (0: all at once).
    """

    def __init__(
        self,
        n: int,
        *,
        low: int = 8,
        high: int = 16,
        grace: float = 20.0,
        hold: float = 120.0,
        dial_delay: tuple[float, float] = (0.5, 3.0),
        publish_lag: float = 2.0,
        start_spread: float = 0.0,
        loss_per_s: float = 0.0,
        bridges: bool = True,
        seed: int = 1,
    ) -> None:
        self.rng = random.Random(seed)
        self.clock = _Clock()
        self.low, self.high, self.hold = low, high, hold
        self.dial_delay, self.publish_lag, self.loss_per_s = dial_delay, publish_lag, loss_per_s
        self.use_bridges = bridges
        self.nodes = {f"n{index:05d}": _SimNode(f"n{index:05d}") for index in range(n)}
        self._starts = {node_id: self.rng.uniform(0, start_spread) for node_id in self.nodes}
        self._dials: list[tuple[float, str, str]] = []  # (completes at, dialler, target)
        self._published: dict[str, list[tuple[float, int]]] = {node_id: [(0.0, 0)] for node_id in self.nodes}
        self.counts: Counter[str] = Counter()
        for node in self.nodes.values():
            node.manager = ConnectionManager(
                node.node_id,
                node,
                lambda peer, node=node: self._want_dial(node, peer),
                bridges=lambda peers, node=node: self._bridges(node, peers),
                degree=self._published_degree,
                dialling=lambda node=node: set(node.dialling),
                low=low,
                high=high,
                grace=grace,
                clock=self.clock,
                rng=random.Random(self.rng.random()),
            )

    # --- the model -------------------------------------------------------------------------------
    def _want_dial(self, node: _SimNode, peer: str) -> bool:
        if peer in node.dialling or peer in node.peers or node.held.get(peer, -1.0) > self.clock.now:
            return False
        if not self.nodes[peer].started:
            return False
        node.dialling.add(peer)
        self._dials.append((self.clock.now + self.rng.uniform(*self.dial_delay), node.node_id, peer))
        return True

    def _published_degree(self, peer: str) -> int | None:
        history = self._published[peer]
        cutoff = self.clock.now - self.publish_lag
        value = history[0][1]
        for when, degree in history:
            if when > cutoff:
                break
            value = degree
        return value

    def _record_degree(self, node_id: str) -> None:
        history = self._published[node_id]
        history.append((self.clock.now, len(self.nodes[node_id].peers)))
        if len(history) > 64:
            del history[: len(history) - 64]

    def _bridges(self, node: _SimNode, peers: set[str]) -> set[str]:
        if not self.use_bridges:
            return set()
        return {peer for peer in peers if not self._connected_without(node.node_id, peer)}

    def _connected_without(self, a: str, b: str) -> bool:
        """Whether every started node is still reachable from ``a`` without the edge a–b."""
        started = [node_id for node_id, node in self.nodes.items() if node.started]
        seen, stack = {a}, [a]
        while stack:
            current = stack.pop()
            for nxt in self.nodes[current].peers:
                if (current, nxt) in ((a, b), (b, a)) or nxt in seen:
                    continue
                seen.add(nxt)
                stack.append(nxt)
        return len(seen) == len(started)

    def _link(self, a: str, b: str, *, up: bool) -> None:
        """Both ends gain (``up``) or lose the connection a–b, and say so to their managers."""
        for x, y in ((a, b), (b, a)):
            node = self.nodes[x]
            manager = node.manager
            assert manager is not None
            if up:
                node.peers.add(y)
                manager.connected(y)
            else:
                node.peers.discard(y)
                manager.disconnected(y)
            self._record_degree(x)

    def step(self) -> None:
        """One simulated second: starts, finished dials, random losses, one pass per node."""
        now = self.clock.now
        for node_id, node in self.nodes.items():
            if not node.started and self._starts[node_id] <= now:
                node.started = True
        done = [dial for dial in self._dials if dial[0] <= now]
        self._dials = [dial for dial in self._dials if dial[0] > now]
        for _, dialler, target in done:
            self.nodes[dialler].dialling.discard(target)
            if target not in self.nodes[dialler].peers:
                self._link(dialler, target, up=True)
                self.counts["dial"] += 1
        if self.loss_per_s:
            edges = {tuple(sorted((a, b))) for a, node in self.nodes.items() for b in node.peers}
            for a, b in sorted(edges):
                if self.rng.random() < self.loss_per_s:
                    self._link(a, b, up=False)
                    self.counts["loss"] += 1
        order = [node for node in self.nodes.values() if node.started]
        self.rng.shuffle(order)
        everyone = set(self.nodes)
        for node in order:
            manager = node.manager
            assert manager is not None
            held = {peer for peer, until in node.held.items() if until > now}  # (as Dialer.candidates)
            for peer in manager.round(everyone - held - {node.node_id}):
                if peer in node.peers:
                    self._link(node.node_id, peer, up=False)
                    self.counts["trim"] += 1
                    self.nodes[peer].held[node.node_id] = now + self.hold
        self.clock.now += 1.0

    # --- what it reports -------------------------------------------------------------------------
    def formed(self) -> bool:
        """Every node started, at ``min(low, N - 1)`` connections or more, and one component."""
        target = min(self.low, len(self.nodes) - 1)
        if not all(node.started and len(node.peers) >= target for node in self.nodes.values()):
            return False
        return self.one_piece()

    def one_piece(self) -> bool:
        """Whether every started node reaches every other."""
        first = next(iter(self.nodes))
        return self._connected_without(first, first)  # (no node is its own peer: no edge left out)

    def run(self, *, formation_limit: float = 600.0, settle: float = 30.0, quiet: float = 120.0) -> dict[str, Any]:
        """Run until formed (or ``formation_limit``), then ``settle`` seconds, then a ``quiet``
        window whose connection changes are reported per second (as ``bench/scale.py`` does)."""
        while not self.formed() and self.clock.now < formation_limit:
            self.step()
        formed_at = self.clock.now if self.formed() else None
        for _ in range(int(settle)):
            self.step()
        before = Counter(self.counts)
        for _ in range(int(quiet)):
            self.step()
        window = self.counts - before
        degrees = sorted(len(node.peers) for node in self.nodes.values())
        return {
            "n": len(self.nodes),
            "low": self.low,
            "high": self.high,
            "formation_s": formed_at,
            "changes_until_quiet": sum(before[kind] for kind in ("dial", "trim", "loss")),
            "settle_s": settle,
            "quiet_window_s": quiet,
            "quiet_changes_per_s": {kind: round(window[kind] / quiet, 3) for kind in ("dial", "trim", "loss")},
            "degree_min_median_max": [degrees[0], degrees[len(degrees) // 2], degrees[-1]],
            "one_piece": self.one_piece(),
        }
