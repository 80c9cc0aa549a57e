"""Relayed sealed datagrams (issue #15): a peer both ends reach forwards their VPN datagrams.

When A and B have no UDP path between them (symmetric NATs, a blocked link) but both have one to
a third node R, R forwards their *sealed* datagrams between its own UDP sockets' peers: A sends its
datagrams for B to R's data-plane endpoint, R sends them on to B, and back. R never holds A↔B's
keys: the datagrams are sealed end to end per pair, so R can neither read nor forge them — one R
alters fails AES-GCM at the receiver and is dropped and counted there (``drop_bad_tag``).

**No relay header.** A relayed datagram is byte for byte the datagram A would send B directly.
R routes it by ``(UDP source, key id)``: the key id (in the clear at offset 4 of every wire
header) names the receiving end's session, and the source must be the address R's *own*
session with the sender last authenticated (:meth:`~.peertable.PeerTable.source_of`) — so a third
party that learns a key id cannot have R forward its traffic, and nobody can bind a session to
an address they do not own. Without a header a GRO train received from A is forwarded as it is,
with one GSO ``sendmsg`` (see :meth:`RelayTable.forward`), and the sender's and receiver's fast
paths are unchanged: to them R is just the peer's endpoint, and B's receive path moves A's
session to R's address the way it follows any roaming peer (an authentic datagram from it).

**Allocation** over admitted streams (``/kairos/vpn/relay/1.0.0``, one JSON frame each way):

1. A → R ``{"op": "open", "peer": B, "key": K_AB}`` — K_AB is A's send key id towards B.
2. R checks its limits and that it has UDP sessions with both, then R → B (a new stream)
   ``{"op": "offer", "peer": A, "key": K_AB}``; B accepts only if K_AB is the key id its own
   session with A receives under, answering ``{"op": "accept", "key": K_BA}``.
3. R installs both routes and answers A ``{"op": "ok"}`` (or ``{"op": "refused", "reason": …}``
   at any step). Each end then points the other's datagrams at R.

**Limits**, per admitted peer: at most ``p2p.relay.max_circuits`` sessions through R as either
end, each ended after ``p2p.relay.max_duration`` seconds, :data:`IDLE_TIMEOUT` seconds without a
datagram (the pair moved up to a punched path, say) or ``vpn.relay_max_bytes`` bytes (both
ways; ``p2p.relay.max_bytes`` is sized for libp2p connections and would end a VPN session at
full speed within seconds). A
session ends too when either peer leaves R's VPN (its session with R goes) or moves to an
address its relay route does not follow. Every refusal and ending is counted
(``vpn_relay_refused_*``, ``vpn_relay_ended_*``); the ends notice a dead relay by its silence
(``vpn.udp_timeout``) and fall back to the libp2p stream.

Who relays: ``vpn.relay`` — ``auto`` (the default) while ``p2p.relay.enable`` is on and this node
is publicly reachable; ``always`` for any peer both ends reach (``B↔C blocked, both reach A``);
``off`` never.
"""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

from .wire import HEADER_BYTES, KEY_ID

RELAY_PROTOCOL = "/kairos/vpn/relay/1.0.0"
MAX_MESSAGE = 1024
RELAY_MODES = ("auto", "always", "off")
#: a session that forwarded nothing for this long ends (its pair moved to a better path, or left
#: without saying so): it would hold one of each end's sessions until max_duration otherwise
IDLE_TIMEOUT = 60.0
UDP_SEGMENT = 103  # not exported by Python 3.11's socket module
_SEGMENT_SIZE = struct.Struct("=H")
Address = tuple[str, int]


class RelayMessageError(ValueError):
    """A relay control message that is not one (a peer wrote it)."""


def encode(op: str, **fields: Any) -> bytes:
    """One control message."""
    return json.dumps({"op": op, **fields}).encode()


def decode(data: bytes) -> dict[str, Any]:
    """A control message as a dict with a string ``op``; :class:`RelayMessageError` for anything
    else, whatever ``data`` holds."""
    try:
        message = json.loads(data)
    except (ValueError, TypeError, RecursionError):
        raise RelayMessageError("not a relay message") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise RelayMessageError("not a relay message")
    for name in ("peer", "reason"):
        if name in message and not isinstance(message[name], str):
            raise RelayMessageError(f"{name} is not a string")
    if "key" in message:
        key = message["key"]
        if not isinstance(key, int) or isinstance(key, bool) or not 0 <= key < 1 << 32:
            raise RelayMessageError("key is not a 32-bit key id")
    return message


@dataclass(frozen=True)
class RelayLimits:
    """What this node grants each peer when relaying (``p2p.relay``'s limits)."""

    max_sessions: int = 8
    max_bytes: int = 1 << 30
    max_duration: float = 3600.0

    @classmethod
    def from_config(cls, relay: Any) -> "RelayLimits":
        """From the ``p2p.relay`` section (defaults for whatever it lacks)."""
        relay = relay if isinstance(relay, dict) or hasattr(relay, "get") else {}
        return cls(
            int(relay.get("max_circuits", cls.max_sessions)),
            int(relay.get("max_bytes", cls.max_bytes)),
            float(relay.get("max_duration", cls.max_duration)),
        )


@dataclass(eq=False)
class RelaySession:
    """A pair of peers whose datagrams this node forwards."""

    a: str
    b: str
    started: float
    bytes: int = 0
    active: float = 0.0  # the clock when it last forwarded (or opened)
    ended: str | None = None  # why, once it has ended
    routes: list[tuple[Address, int]] = field(default_factory=list)

    def peers(self) -> tuple[str, str]:
        """Both ends."""
        return (self.a, self.b)


class Leg:
    """One direction of a session: where datagrams matching its route go."""

    __slots__ = ("dest", "session")

    def __init__(self, dest: Address, session: RelaySession) -> None:
        self.dest = dest
        self.session = session


#: the counters :meth:`RelayTable.forward` (the receiving thread) moves
THREAD_COUNTERS = (
    "relay_forwarded_bytes",
    "relay_forwarded_sends",
    "relay_drop_unrouted",
    "relay_drop_ended",
    "relay_ended_bytes",
    "relay_send_errors",
)


class RelayTable:
    """The sessions this node relays and the routes its receiving thread forwards by.

    Changed under a lock by the control side (allocation on the event loop, endings from either);
    read without one by the receiving thread, which sees whole route maps only (they are replaced,
    never changed in place), as the peer table's maps are.

    :param counters: where refusals, endings and forwarding are counted (``relay_*`` names).
    """

    def __init__(self, limits: RelayLimits, counters: Counter[str] | None = None, clock: Any = time.monotonic) -> None:
        self.limits = limits
        self.counters: Counter[str] = counters if counters is not None else Counter()
        # every name the receiving thread counts under, there from the start: a key it added
        # while the event loop iterates the counters would break that iteration
        for name in THREAD_COUNTERS:
            self.counters.setdefault(name, 0)
        self._clock = clock
        self._lock = threading.Lock()
        self._routes: dict[tuple[Address, int], Leg] = {}
        self._sessions: list[RelaySession] = []

    # ----- control side ---------------------------------------------------------------------------

    def sessions_of(self, peer_id: str) -> int:
        """How many live sessions ``peer_id`` is an end of."""
        return sum(1 for s in self._sessions if peer_id in s.peers())

    def refusal(self, a: str, b: str) -> str | None:
        """Why a new session between ``a`` and ``b`` would be refused now (None: it would not)."""
        if a == b:
            return "a peer cannot relay to itself"
        if any({s.a, s.b} == {a, b} for s in self._sessions):
            return None  # a renewal replaces the old session (new keys): never over a limit
        if self.sessions_of(a) >= self.limits.max_sessions or self.sessions_of(b) >= self.limits.max_sessions:
            return "too many relay sessions"
        return None

    def open(self, a: str, a_source: Address, a_key: int, b: str, b_source: Address, b_key: int) -> str | None:
        """Forward ``a_source``'s datagrams under key id ``a_key`` to ``b_source`` and back under
        ``b_key``; returns the refusal reason instead (counted), None when open."""
        with self._lock:
            reason = self.refusal(a, b)
            # a route another pair's session holds; the pair's own old session (both ends asking
            # at once, or a renewal under the same keys) gives its routes to the new one
            taken = [self._routes.get(route) for route in ((a_source, a_key), (b_source, b_key))]
            if reason is None and any(leg is not None and {leg.session.a, leg.session.b} != {a, b} for leg in taken):
                reason = "route in use"
            if reason is not None:
                self.counters["relay_refused_" + reason.replace(" ", "_").lower()] += 1
                return reason
            for old in [s for s in self._sessions if {s.a, s.b} == {a, b}]:
                self._end(old, "renewed")
            session = RelaySession(a, b, self._clock())
            session.active = session.started
            session.routes = [(a_source, a_key), (b_source, b_key)]
            routes = dict(self._routes)
            routes[(a_source, a_key)] = Leg(b_source, session)
            routes[(b_source, b_key)] = Leg(a_source, session)
            self._sessions.append(session)
            self._routes = routes
            self.counters["relay_sessions_opened"] += 1
            return None

    def end_peer(self, peer_id: str, reason: str) -> int:
        """End every session ``peer_id`` is an end of; returns how many."""
        with self._lock:
            ended = [s for s in self._sessions if peer_id in s.peers()]
            for session in ended:
                self._end(session, reason)
            return len(ended)

    def check(self, source_of: Any) -> None:
        """End sessions past ``max_duration`` and those whose end no longer sends from the address
        its route was made for (``source_of(peer_id)``: where this node's session with it last
        authenticated from)."""
        now = self._clock()
        with self._lock:
            for session in list(self._sessions):
                if now - session.started > self.limits.max_duration:
                    self._end(session, "duration")
                    continue
                if now - session.active > IDLE_TIMEOUT:
                    self._end(session, "idle")
                    continue
                for peer_id, (address, _key) in zip(session.peers(), session.routes):
                    if source_of(peer_id) != address:
                        self._end(session, "moved")
                        break

    def sessions(self) -> list[dict[str, Any]]:
        """The live sessions, for status."""
        now = self._clock()
        return [{"peers": list(s.peers()), "bytes": s.bytes, "age_s": round(now - s.started, 1)} for s in self._sessions]

    def _end(self, session: RelaySession, reason: str) -> None:
        # under self._lock
        if session.ended is not None:
            return
        session.ended = reason
        self._sessions.remove(session)
        routes = dict(self._routes)
        for route in session.routes:
            leg = routes.get(route)
            if leg is not None and leg.session is session:
                del routes[route]
        self._routes = routes
        self.counters["relay_ended_" + reason] += 1

    # ----- the receiving thread -------------------------------------------------------------------

    def forward(
        self,
        sock: socket.socket,
        view: memoryview,
        n: int,
        size: int,
        address: Address,
        own: Callable[[memoryview, Address], object] | None = None,
    ) -> bool:
        """Forward what one ``recvmsg`` returned if it is relayed traffic; False if it is not.

        A GRO train (``n`` bytes of ``size``-byte datagrams from one source) under one key id goes
        on unchanged with one GSO send; a train mixing sessions is split by key id, and its
        datagrams under no route go to ``own`` (this node's own traffic from that peer: the kernel
        may end a train of relayed datagrams with a shorter one of its own, a keepalive say).
        """
        routes = self._routes
        if not routes or n < HEADER_BYTES:
            return False
        key_id = KEY_ID.unpack_from(view, 4)[0]
        leg = routes.get((address, key_id))
        if leg is None:
            return False
        if size <= 0 or size >= n:
            self._send(sock, leg, view[:n], n)
            return True
        key = view[4:8]
        start = size
        while start + HEADER_BYTES <= n and view[start + 4 : start + 8] == key:
            start += size
        start = min(start, n)
        self._send(sock, leg, view[:start], size)
        while start < n:  # a mixed train (rare): datagram by datagram
            datagram = view[start : min(start + size, n)]
            start += size
            other = routes.get((address, KEY_ID.unpack_from(datagram, 4)[0])) if len(datagram) >= HEADER_BYTES else None
            if other is not None:
                self._send(sock, other, datagram, len(datagram))
            elif own is not None:
                own(datagram, address)
            else:
                self.counters["relay_drop_unrouted"] += 1
        return True

    def _send(self, sock: socket.socket, leg: Leg, data: memoryview, size: int) -> None:
        session = leg.session
        if session.ended is not None:
            self.counters["relay_drop_ended"] += 1
            return
        session.bytes += len(data)
        session.active = self._clock()
        if session.bytes > self.limits.max_bytes:
            with self._lock:
                self._end(session, "bytes")
            self.counters["relay_drop_ended"] += 1
            return
        ancillary = [(socket.SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(size))] if len(data) > size else []
        for _attempt in range(20):
            try:
                sock.sendmsg([data], ancillary, 0, leg.dest)
                self.counters["relay_forwarded_bytes"] += len(data)
                self.counters["relay_forwarded_sends"] += 1
                return
            except BlockingIOError:  # the send buffer is full: wait for room rather than drop
                select.select([], [sock], [], 0.05)
            except OSError:
                break
        self.counters["relay_send_errors"] += 1
