"""Who is alive, and the ``on_peer`` events that say so.

Membership is *attested*: a peer is a member only while some node vouches that it admitted it.

- We vouch for the peers connected to us that proved the token (:meth:`Membership.connected`).
- Every node lists, in its own entry of the ``nodes`` bucket, the peers it is connected to and
  admitted (``neighbours``), and rewrites the entry when that set changes.
- A peer is alive when it is reached from us through these vouchers: connected to us, or named
  by an alive member whose entry is fresh, and so on. Freshness is measured on *our* clock, from
  when we last saw the entry change (its owner rewrites it every announce interval), so peers
  with skewed clocks are judged fairly.

So liveness needs no connection to every member: a peer we only reach through others stays alive
while one of them is connected to it, and a crashed node is reported left as soon as the
neighbours that noticed (at once for a kill -9, within the keepalive time for a silent death)
rewrite their entries — the news spreads by gossip, not by everyone probing everyone. An
identity that only signs entries of its own, never admitted by anyone, is never a member, never a
voter and never a candidate; a token holder can vouch for at most ``MAX_NEIGHBOURS`` peers.

Events for one peer are delivered in order through one queue; ``updated`` fires only when the
advertised information changes, not on every heartbeat.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .events import PeerEvent
from .config import CORE_DEFAULTS  # membership.peer_ttl, declared once in the config schema
from .identity import public_key_from_peer_id

log = logging.getLogger(__name__)

NODES_BUCKET = "nodes"
# A connected peer whose entry has not arrived yet is announced after this many seconds anyway;
# usually its entry follows the connection within milliseconds, and ``joined`` then carries it.
JOIN_GRACE = 2.0
# Keys of a node's entry that change on every heartbeat or with its connections, and say nothing
# about the node itself (``updated`` events ignore them).
VOLATILE_KEYS = frozenset({"beat", "announced_at", "neighbours", "relayed", "rtt_ms"})
# The most peers one entry may vouch for; a longer list vouches for nobody (a bounded-degree node
# lists far fewer, and one insider must not be able to vouch for a crowd of made-up identities).
MAX_NEIGHBOURS = 64


@dataclass
class PeerState:
    """What this node knows about one peer."""

    connected: bool = False
    connected_at: float = 0.0
    heartbeat_at: float | None = None  # local time we last saw its entry change
    disconnected_at: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    neighbours: frozenset[str] = frozenset()  # whom its entry vouches for
    alive: bool = False
    last_alive_at: float | None = None  # local time this peer was last judged alive
    remembered_at: float | None = None  # known only from disk since this local time
    # Its entry advertises another network_id: a node of another cluster sharing the token. The
    # connection is fine (gossip is shared), but it is never a member, voucher or voter here.
    foreign: bool = False


def is_node_key(key: str) -> bool:
    """Whether a key of the ``nodes`` bucket is a node's own entry (its peer id).

    The bucket's policy also lets a node write ``<peer_id>/<anything>``; such sub-keys are data,
    not members — counting them would invent phantom peers that sway elections.
    """
    return isinstance(key, str) and _is_peer_id(key)


# Every neighbour of every entry is checked on each rewrite of it (a base58 decode and a key
# parse each); the answers for the few hundred ids a network holds are kept. Bounded, so made-up
# ids only push out others, which are then parsed again.
@functools.lru_cache(maxsize=4096)
def _is_peer_id(key: str) -> bool:
    if "/" in key:
        return False
    try:
        public_key_from_peer_id(key)
    except ValueError:
        return False
    return True


def neighbours_of(info: dict[str, Any]) -> frozenset[str] | None:
    """The peers a node entry vouches for; None when the field is malformed or too long."""
    listed = info.get("neighbours", [])
    if not isinstance(listed, list) or len(listed) > MAX_NEIGHBOURS:
        return None
    if not all(isinstance(peer, str) and is_node_key(peer) for peer in listed):
        return None
    return frozenset(listed)


def stable_info(info: dict[str, Any]) -> dict[str, Any]:
    """The part of a node entry that ``updated`` events compare."""
    return {key: value for key, value in info.items() if key not in VOLATILE_KEYS}


# An unchanged entry is rewritten (refreshed) this many times per entry TTL, so a voucher's entry
# never goes stale while its node lives.
REFRESHES_PER_TTL = 3


class Membership:
    """Tracks peers and emits :class:`PeerEvent` through ``emit`` (awaited, in order).

    :param self_id: our own peer id (never a member of our own view).
    :param network_id: only entries that advertise this network id count.
    :param ttl: seconds an entry stays fresh without a change (``membership.peer_ttl``), on a
        network small enough for the refresh budget; see :meth:`entry_ttl`.
    :param refresh_budget: refreshes of unchanged entries per second the whole network may send
        (``membership.refresh_budget``); 0: none, every entry is refreshed ``REFRESHES_PER_TTL``
        times per ``ttl`` whatever the network's size.
    """

    def __init__(
        self,
        self_id: str,
        emit: Callable[[PeerEvent], Awaitable[None]],
        *,
        network_id: str = "kairos",
        ttl: float = CORE_DEFAULTS["membership"]["peer_ttl"],
        refresh_budget: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.self_id = self_id
        self.network_id = network_id
        self.ttl = ttl
        self.refresh_budget = refresh_budget
        self.clock = clock
        self._emit = emit
        self._peers: dict[str, PeerState] = {}
        self._events: asyncio.Queue[PeerEvent] = asyncio.Queue()
        self._worker: asyncio.Task | None = None
        #: entries whose ``neighbours`` were refused (malformed, or more than MAX_NEIGHBOURS)
        self.bad_vouchers = 0
        self._next_deadline = 0.0  # when expire() must re-judge (see there)
        #: revoked peers: never reached, never vouching, never a voter or worth a dial
        self.excluded: frozenset[str] = frozenset()

    def exclude(self, peers: frozenset[str] | set[str]) -> None:
        """Peers revoked (kairos_core.revocation): they leave at once and never count again."""
        self.excluded = self.excluded | frozenset(peers)
        for peer_id in peers:
            state = self._peers.get(peer_id)
            if state is not None:
                state.last_alive_at = state.remembered_at = None
        self._evaluate_all()

    # --- inputs ------------------------------------------------------------------------------
    def remember(self, peer_id: str, info: dict[str, Any]) -> None:
        """Know a peer's entry from disk without counting it alive: it must be heard from again."""
        if peer_id != self.self_id:
            state = self._peers.setdefault(peer_id, PeerState())
            state.foreign = info.get("network_id", self.network_id) != self.network_id
            state.info, state.remembered_at = ({}, None) if state.foreign else (dict(info), self.clock())

    def connected(self, peer_id: str) -> None:
        """An admitted connection to ``peer_id`` is up."""
        if peer_id == self.self_id:
            return
        state = self._peers.setdefault(peer_id, PeerState())
        if not state.connected:
            state.connected, state.connected_at = True, self.clock()
        self._evaluate_all()

    def disconnected(self, peer_id: str) -> None:
        """Our connection to ``peer_id`` closed."""
        state = self._peers.get(peer_id)
        if state is None or not state.connected:
            return
        state.connected = False
        state.disconnected_at = self.clock()
        self._evaluate_all()

    def entry_changed(self, peer_id: str, info: dict[str, Any] | None) -> None:
        """The peer's entry in ``nodes`` changed (``None``: deleted)."""
        if peer_id == self.self_id:
            return
        state = self._peers.setdefault(peer_id, PeerState())
        state.foreign = info is not None and info.get("network_id", self.network_id) != self.network_id
        if state.foreign:  # another cluster sharing the token: connected perhaps, a member never
            state.heartbeat_at, state.neighbours = None, frozenset()  # (its info stays what we knew)
        elif info is None:
            state.heartbeat_at = None
            state.neighbours = frozenset()
        else:
            state.heartbeat_at = self.clock()
            vouched = neighbours_of(info)
            if vouched is None:
                self.bad_vouchers += 1
                vouched = frozenset()
            state.neighbours = vouched - {peer_id}
            old, state.info = stable_info(state.info), dict(info)
            if state.alive and old != stable_info(info):
                self._queue(PeerEvent("updated", peer_id, dict(info)))
        self._evaluate_all()

    def expire(self) -> None:
        """Re-judge freshness; call periodically (the node does, every second).

        Cheap between deadlines: every other change of a verdict comes with an event (a connection,
        an entry) that re-judges at once, so time alone matters only when an entry in use reaches
        its TTL or a connected peer's join grace ends — a full pass (O(members x neighbours)) runs
        only then, not every second.
        """
        if self.clock() >= self._next_deadline:
            self._evaluate_all()

    # --- views -------------------------------------------------------------------------------
    def alive(self) -> dict[str, dict[str, Any]]:
        """Alive peers (not including this node) with their advertised entries."""
        return {peer_id: dict(state.info) for peer_id, state in self._peers.items() if state.alive}

    def alive_count(self) -> int:
        """How many peers (not including this node) are alive in this node's view."""
        return sum(1 for state in self._peers.values() if state.alive)

    def is_alive(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is alive in this node's view."""
        state = self._peers.get(peer_id)
        return bool(state and state.alive)

    def worth_dialling(self, horizon: float) -> set[str]:
        """Peers to reconnect to: alive within ``horizon``, or known from disk for less than that."""
        now = self.clock()
        return self.recently_alive(horizon) | {
            peer_id
            for peer_id, state in self._peers.items()
            if state.remembered_at is not None and now - state.remembered_at < horizon and peer_id not in self.excluded
        }

    def recently_alive(self, horizon: float) -> set[str]:
        """Peers alive now or within the last ``horizon`` seconds (the electorate of a quorum)."""
        now = self.clock()
        return {
            peer_id
            for peer_id, state in self._peers.items()
            if peer_id not in self.excluded
            and (state.alive or (state.last_alive_at is not None and now - state.last_alive_at < horizon))
        }

    def lost(self, horizon: float) -> set[str]:
        """Peers alive within ``horizon`` but not now: crashed, cut off by a partition, or on the
        other side of an overlay that split (no connection between the parts, so neither hears
        the other's entries). Only a dial tells these apart; the dial manager tries them now and
        then even when it has its degree (see :mod:`kairos_core.connections`)."""
        return {peer_id for peer_id in self.recently_alive(horizon) if not self._peers[peer_id].alive}

    def degree(self, peer_id: str) -> int | None:
        """How many peers ``peer_id``'s entry vouches for (its connections), or None if unknown."""
        state = self._peers.get(peer_id)
        return len(state.neighbours) if state is not None and state.info else None

    def bridges(self, peers: set[str]) -> set[str]:
        """Those of ``peers`` (connected to us) whose connection is, in our view, the only way to
        some alive member, the peer itself included: closing it would cut the overlay in two (for
        us), or leave the peer with no connection (a private node that reaches only us would
        redial at once, and be trimmed again). A trim keeps them.

        Costs one walk of the vouching graph per peer asked about (O(members x neighbours)
        each); the connection manager asks only while it trims.
        """
        alive = {peer_id for peer_id, state in self._peers.items() if state.alive}
        return {peer_id for peer_id in peers if not alive <= self.vouched(without=peer_id)}

    def alive_unless_lost(self, window: float) -> set[str]:
        """Alive peers, less those whose connection *to us* closed within ``window`` seconds and
        whose own entry has not changed since: our own news that a peer is gone beats a voucher's
        claim that it is there, until the peer itself speaks again. What a leader counts to keep
        its majority (see :mod:`kairos_core.election`): cut off with one partner, it must not go on
        leading on the partner's entry — written before the cut, or after it by a partner that has
        not noticed the cut yet — naming the others. A peer we merely stopped being connected to
        (trimmed, a flaky link) rewrites its own entry (its neighbours changed), and once that
        arrives it counts again.
        """
        now = self.clock()
        kept = set()
        for peer_id, state in self._peers.items():
            if not state.alive:
                continue
            lost = not state.connected and state.disconnected_at and now - state.disconnected_at < window
            if not lost or (state.heartbeat_at is not None and state.heartbeat_at > state.disconnected_at):
                kept.add(peer_id)
        return kept

    def describe(self) -> list[dict[str, Any]]:
        """Every known peer of this network with its state, for the local API."""
        now = self.clock()
        return [
            {
                "peer_id": peer_id,
                "alive": state.alive,
                "connected": state.connected,
                "last_seen_s": None if state.heartbeat_at is None else round(now - state.heartbeat_at, 1),
                **{key: state.info.get(key) for key in ("hostname", "addresses", "version")},
            }
            for peer_id, state in sorted(self._peers.items())
            if not state.foreign
        ]

    # --- event delivery ----------------------------------------------------------------------
    def start(self) -> None:
        """Start delivering events."""
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._deliver(), name="membership-events")

    async def stop(self) -> None:
        """Stop delivering (pending events are dropped: the node is going away)."""
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    async def drain(self) -> None:
        """Wait until every queued event has been delivered (tests)."""
        await self._events.join()

    def refresh_interval(self) -> float:
        """Seconds between refreshes of an unchanged entry: ``ttl / REFRESHES_PER_TTL``, or longer
        on a large network, so that its entries' refreshes (each reaches every node) stay within
        ``refresh_budget`` a second: ``(entries + 1) / refresh_budget``. Every node holds the same
        ``nodes`` bucket, so owners and readers of an entry compute the same interval."""
        base = self.ttl / REFRESHES_PER_TTL
        if self.refresh_budget <= 0:
            return base
        entries = sum(1 for state in self._peers.values() if state.heartbeat_at is not None and not state.foreign)
        return max(base, (entries + 1) / self.refresh_budget)

    def entry_ttl(self) -> float:
        """Seconds an entry vouches without a change: ``REFRESHES_PER_TTL`` refresh intervals."""
        return REFRESHES_PER_TTL * self.refresh_interval()

    def _fresh(self, state: PeerState, ttl: float) -> bool:
        return state.heartbeat_at is not None and self.clock() - state.heartbeat_at < ttl

    def vouched(self, without: str | None = None) -> set[str]:
        """Peers reached from us through vouchers: connected to us, or named by a reached peer
        whose entry is fresh (see the module docstring). ``without``: as if our own connection to
        that peer were closed (it may still be reached through others)."""
        excluded = self.excluded
        ttl = self.entry_ttl()
        reached = {
            peer_id
            for peer_id, state in self._peers.items()
            if state.connected and not state.foreign and peer_id not in excluded and peer_id != without
        }
        frontier = list(reached)
        while frontier:
            state = self._peers[frontier.pop()]
            if not self._fresh(state, ttl):
                continue  # an entry not renewed for a TTL vouches for nobody any more
            for peer_id in state.neighbours:
                if (
                    peer_id not in reached
                    and peer_id != self.self_id
                    and peer_id in self._peers
                    and not self._peers[peer_id].foreign
                    and peer_id not in excluded
                ):
                    reached.add(peer_id)
                    frontier.append(peer_id)
        return reached

    def _evaluate_all(self) -> None:
        vouched = self.vouched()
        deadline = float("inf")
        ttl = self.entry_ttl()
        for peer_id, state in list(self._peers.items()):
            self._evaluate(peer_id, state, peer_id in vouched)
            if state.heartbeat_at is not None and self._fresh(state, ttl):
                deadline = min(deadline, state.heartbeat_at + ttl)  # it stops vouching then
            if state.connected and not state.alive:
                deadline = min(deadline, state.connected_at + JOIN_GRACE)  # it joins without an entry then
        self._next_deadline = deadline

    def _evaluate(self, peer_id: str, state: PeerState, alive: bool) -> None:
        if alive and not state.alive and not state.info and self.clock() - state.connected_at < JOIN_GRACE:
            return  # wait briefly for the entry, so that `joined` can carry it
        if (alive or state.alive) and peer_id not in self.excluded:
            state.last_alive_at = self.clock()
        if alive == state.alive:
            return
        state.alive = alive
        self._queue(PeerEvent("joined" if alive else "left", peer_id, dict(state.info)))

    def _queue(self, event: PeerEvent) -> None:
        self._events.put_nowait(event)

    async def _deliver(self) -> None:
        while True:
            event = await self._events.get()
            try:
                await self._emit(event)
            except Exception:  # the emitter isolates plugins already; never let delivery die
                log.exception("delivering %s failed", event)
            finally:
                self._events.task_done()
