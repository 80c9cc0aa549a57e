"""Who is alive, and the ``on_peer`` events that say so.

A peer is alive while it is connected to us and admitted, or while its entry in the ``nodes``
bucket is fresh. Freshness is measured on *our* clock, from when we last saw the peer's entry
change (its owner rewrites it every announce interval), so peers with skewed clocks are judged
fairly. A peer whose direct connection dropped counts as left at once unless its entry changes
*after* the drop: a node killed with SIGKILL is reported left as soon as the kernel closes its
sockets, not a whole TTL later, while a peer we only reach through others stays alive on its
heartbeats.

Events for one peer are delivered in order through one queue; ``updated`` fires only when the
advertised information changes, not on every heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .events import PeerEvent
from .identity import public_key_from_peer_id

log = logging.getLogger(__name__)

NODES_BUCKET = "nodes"
# A connected peer whose entry has not arrived yet is announced after this many seconds anyway;
# usually its entry follows the connection within milliseconds, and ``joined`` then carries it.
JOIN_GRACE = 2.0
# Keys of a node's entry that change on every heartbeat and say nothing about the node.
VOLATILE_KEYS = frozenset({"beat", "announced_at"})


@dataclass
class PeerState:
    """What this node knows about one peer."""

    connected: bool = False
    connected_at: float = 0.0
    heartbeat_at: float | None = None  # local time we last saw its entry change
    disconnected_at: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)
    alive: bool = False
    last_alive_at: float | None = None  # local time this peer was last judged alive
    remembered_at: float | None = None  # known only from disk since this local time


def is_node_key(key: str) -> bool:
    """Whether a key of the ``nodes`` bucket is a node's own entry (its peer id).

    The bucket's policy also lets a node write ``<peer_id>/<anything>``; such sub-keys are data,
    not members — counting them would invent phantom peers that sway elections.
    """
    if "/" in key:
        return False
    try:
        public_key_from_peer_id(key)
    except ValueError:
        return False
    return True


def stable_info(info: dict[str, Any]) -> dict[str, Any]:
    """The part of a node entry that ``updated`` events compare."""
    return {key: value for key, value in info.items() if key not in VOLATILE_KEYS}


class Membership:
    """Tracks peers and emits :class:`PeerEvent` through ``emit`` (awaited, in order).

    :param self_id: our own peer id (never a member of our own view).
    :param network_id: only entries that advertise this network id count.
    :param ttl: seconds an entry stays fresh without a change.
    """

    def __init__(
        self,
        self_id: str,
        emit: Callable[[PeerEvent], Awaitable[None]],
        *,
        network_id: str = "kairos",
        ttl: float = 95.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.self_id = self_id
        self.network_id = network_id
        self.ttl = ttl
        self.clock = clock
        self._emit = emit
        self._peers: dict[str, PeerState] = {}
        self._events: asyncio.Queue[PeerEvent] = asyncio.Queue()
        self._worker: asyncio.Task | None = None

    # --- inputs ------------------------------------------------------------------------------
    def remember(self, peer_id: str, info: dict[str, Any]) -> None:
        """Know a peer's entry from disk without counting it alive: it must be heard from again."""
        if peer_id != self.self_id:
            state = self._peers.setdefault(peer_id, PeerState())
            state.info, state.remembered_at = dict(info), self.clock()

    def connected(self, peer_id: str) -> None:
        """An admitted connection to ``peer_id`` is up."""
        if peer_id == self.self_id:
            return
        state = self._peers.setdefault(peer_id, PeerState())
        if not state.connected:
            state.connected, state.connected_at = True, self.clock()
        self._evaluate(peer_id, state)

    def disconnected(self, peer_id: str) -> None:
        """Our connection to ``peer_id`` closed."""
        state = self._peers.get(peer_id)
        if state is None or not state.connected:
            return
        state.connected = False
        state.disconnected_at = self.clock()
        self._evaluate(peer_id, state)

    def entry_changed(self, peer_id: str, info: dict[str, Any] | None) -> None:
        """The peer's entry in ``nodes`` changed (``None``: deleted)."""
        if peer_id == self.self_id:
            return
        if info is not None and info.get("network_id", self.network_id) != self.network_id:
            return  # another cluster sharing the token
        state = self._peers.setdefault(peer_id, PeerState())
        if info is None:
            state.heartbeat_at = None
        else:
            state.heartbeat_at = self.clock()
            old, state.info = stable_info(state.info), dict(info)
            if state.alive and old != stable_info(info):
                self._queue(PeerEvent("updated", peer_id, dict(info)))
        self._evaluate(peer_id, state)

    def expire(self) -> None:
        """Re-judge freshness; call periodically (the node does, every second)."""
        for peer_id, state in list(self._peers.items()):
            self._evaluate(peer_id, state)

    # --- views -------------------------------------------------------------------------------
    def alive(self) -> dict[str, dict[str, Any]]:
        """Alive peers (not including this node) with their advertised entries."""
        return {peer_id: dict(state.info) for peer_id, state in self._peers.items() if state.alive}

    def is_alive(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is alive in this node's view."""
        state = self._peers.get(peer_id)
        return bool(state and state.alive)

    def worth_dialling(self, horizon: float) -> set[str]:
        """Peers to reconnect to: alive within ``horizon``, or known from disk for less than that."""
        now = self.clock()
        return self.recently_alive(horizon) | {
            peer_id for peer_id, state in self._peers.items()
            if state.remembered_at is not None and now - state.remembered_at < horizon
        }

    def recently_alive(self, horizon: float) -> set[str]:
        """Peers alive now or within the last ``horizon`` seconds (the electorate of a quorum)."""
        now = self.clock()
        return {
            peer_id for peer_id, state in self._peers.items()
            if state.alive or (state.last_alive_at is not None and now - state.last_alive_at < horizon)
        }

    def describe(self) -> list[dict[str, Any]]:
        """Every known peer with its state, for the local API."""
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

    def _fresh(self, state: PeerState) -> bool:
        if state.heartbeat_at is None:
            return False
        if state.heartbeat_at <= state.disconnected_at:
            return False  # nothing heard since the connection dropped
        return self.clock() - state.heartbeat_at < self.ttl

    def _evaluate(self, peer_id: str, state: PeerState) -> None:
        alive = state.connected or self._fresh(state)
        if alive and not state.alive and not state.info and self.clock() - state.connected_at < JOIN_GRACE:
            return  # wait briefly for the entry, so that `joined` can carry it
        if alive or state.alive:
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
