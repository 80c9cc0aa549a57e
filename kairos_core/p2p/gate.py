"""The admission gate: which connected peers are admitted, and keeping everyone else out.

Revoked peers (see :mod:`kairos_core.revocation`) are refused before any handshake, both ways,
and :meth:`AdmissionGate.revoke` closes what they still have open.

:mod:`.admission` is the handshake itself, over any byte channel; this module decides *when* it
runs and what its verdict opens. Every new connection gets a pending verdict: the dialling side runs
``/kairos/admit/1.0.0``, the accepting side waits (bounded) for the dialler's proof. A peer that fails
is counted, noted in a rate-limited log and disconnected; an admitted one is handed to the host,
which tells gossip, the DHT and the application. Stream handlers and the gossip validator ask the
gate before letting anything of a peer through.

It is kept apart from :mod:`.host` because it is the one piece of policy there: the host only wires
libp2p to asyncio, the gate owns the per-peer verdicts. All of it runs on the host's trio thread,
except the read-only queries (:meth:`AdmissionGate.admitted_peers`,
:meth:`AdmissionGate.is_admitted`) and :meth:`AdmissionGate.reset`, which the asyncio side calls.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable

import trio
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.peer.id import ID

from ..keys import KeySchedule
from .admission import ADMIT_PROTOCOL, admit_as_dialler, admit_as_listener
from .errors import AdmissionError, P2PError

log = logging.getLogger(__name__)

NetStreamHandler = Callable[[Any], Awaitable[None]]

# The handshake is four small messages and two HMACs; what takes time is a busy machine. At 10 s,
# 50 nodes forming on 2 cores timed out three admissions in four (each wasted, then dialled again,
# which kept the machine busy); at 30 s, 1 in 4 and the network formed. The price: a connection
# that never proves anything holds one of libp2p's inbound slots (traps.InboundSlots) this long.
ADMISSION_TIMEOUT = 30.0
# A refused peer is logged at WARNING at most this often, and at most a few per minute overall.
REFUSAL_LOG_INTERVAL = 60.0
REFUSAL_LOG_BURST = 5


class _Admission:
    """The admission state of one peer: pending until ``decided`` is set."""

    def __init__(self) -> None:
        self.decided = trio.Event()
        self.admitted = False
        self.reason = ""


def refusal_kind(reason: str) -> str:
    """The reason of a refused admission in one word, for counters: ``token`` (the peer holds
    another network token, or refused ours), ``hangup`` (it closed the handshake early: a dialler
    does that when our proof fails, so usually another token too), ``timeout``, ``revoked``,
    ``protocol`` (anything else: the peer does not speak the handshake, or broke it)."""
    if "network token" in reason or "refused our proof" in reason:
        return "token"
    if "closed the admission stream early" in reason:
        return "hangup"
    if "timed out" in reason or "timeout" in reason:
        return "timeout"
    if reason == "revoked":
        return "revoked"
    return "protocol"


class _RefusalLog:
    """Rate-limited notes about refused peers: one WARNING per peer per interval, a global cap."""

    def __init__(self) -> None:
        self._last_by_peer: dict[str, float] = {}
        self._window_start = 0.0
        self._in_window = 0
        #: the latest refusal of each peer, for kairos doctor (bounded like the times)
        self.reasons: dict[str, str] = {}

    def note(self, peer_id: str, reason: str) -> None:
        now = time.monotonic()
        if peer_id not in self.reasons and len(self.reasons) >= 4096:
            self.reasons.clear()
        self.reasons[peer_id] = reason
        if now - self._window_start > REFUSAL_LOG_INTERVAL:
            self._window_start, self._in_window = now, 0
        recent = now - self._last_by_peer.get(peer_id, -REFUSAL_LOG_INTERVAL * 2) < REFUSAL_LOG_INTERVAL
        if recent or self._in_window >= REFUSAL_LOG_BURST:
            log.debug("admission refused %s: %s", peer_id, reason)
            return
        self._last_by_peer[peer_id] = now
        self._in_window += 1
        if len(self._last_by_peer) > 4096:  # bound memory under a flood of fresh peer ids
            self._last_by_peer.clear()
        log.warning("admission refused %s: %s", peer_id, reason, extra={"peer": peer_id})


class _NetByteChannel:
    """A libp2p stream seen as the ``read``/``write`` channel the handshake wants."""

    def __init__(self, net_stream: Any) -> None:
        self._net_stream = net_stream

    async def read(self, n: int) -> bytes:
        try:
            return await self._net_stream.read(n) or b""
        except StreamEOF:
            return b""
        except StreamError as exc:
            raise AdmissionError(f"admission stream broken: {type(exc).__name__}") from None

    async def write(self, data: bytes) -> None:
        try:
            await self._net_stream.write(data)
        except StreamError as exc:
            raise AdmissionError(f"admission stream broken: {type(exc).__name__}") from None


class ConnectionWatch:
    """A libp2p notifee that hands connection events to two callbacks (trio side)."""

    def __init__(self, on_connected: Callable[[Any], None], on_disconnected: Callable[[Any], None]) -> None:
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected

    async def connected(self, network: Any, conn: Any) -> None:
        """A connection is up."""
        self._on_connected(conn)

    async def disconnected(self, network: Any, conn: Any) -> None:
        """A connection is gone."""
        self._on_disconnected(conn)

    async def opened_stream(self, network: Any, stream: Any) -> None:
        """Not watched."""
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        """Not watched."""
        return None

    async def listen(self, network: Any, maddr: Any) -> None:
        """Not watched."""
        return None

    async def listen_close(self, network: Any, maddr: Any) -> None:
        """Not watched."""
        return None


def dialled_by_us(conn: Any) -> bool:
    """Whether this node dialled the libp2p connection ``conn`` (its direction is outbound)."""
    return str(getattr(conn, "direction", "")).lower().endswith("outbound")


def peer_of(net_stream: Any) -> str:
    """The peer id at the other end of a libp2p stream."""
    return str(net_stream.muxed_conn.peer_id)


async def quiet_close(net_stream: Any) -> None:
    """Close a libp2p stream, ignoring failure."""
    try:
        await net_stream.close()
    except Exception:  # the peer may already be gone; nothing to tell anyone
        pass


async def quiet_reset(net_stream: Any) -> None:
    """Reset a libp2p stream, ignoring failure."""
    try:
        await net_stream.reset()
    except Exception:
        pass


class AdmissionGate:
    """Per-peer admission verdicts of one host, and the checks that keep unadmitted peers out.

    ``on_admitted(peer)`` is awaited on the trio thread once a peer is admitted; it runs without
    suspending until its own first ``await``. ``on_gone(peer)`` is called on the trio thread when
    the last connection of an admitted peer closes. ``counters`` is the host's, shared.
    """

    def __init__(
        self,
        peer_id: str,
        schedule: KeySchedule,
        *,
        timeout: float,
        counters: dict[str, int],
        on_admitted: Callable[[str], Awaitable[None]],
        on_gone: Callable[[str], None],
    ) -> None:
        self.peer_id = peer_id
        self.schedule = schedule
        self.timeout = timeout
        self.counters = counters
        self._on_admitted = on_admitted
        self._on_gone = on_gone
        self._host: Any = None
        self._nursery: trio.Nursery | None = None
        # Written on the trio thread only. ``_admitted`` is also read from asyncio
        # (admitted_peers, is_admitted): a membership test or a copy of a set is atomic there.
        self._admissions: dict[str, _Admission] = {}
        self._admitted: set[str] = set()
        self._refusals = _RefusalLog()
        # Replaced whole (never mutated) from asyncio, read on trio: kept across host restarts.
        self.revoked: frozenset[str] = frozenset()

    # --- lifecycle (the host's) -------------------------------------------------------------------
    def attach(self, host: Any, nursery: trio.Nursery) -> None:
        """Trio side: gate connections of this libp2p ``host``, spawning work into ``nursery``."""
        self._host, self._nursery = host, nursery

    def detach(self) -> None:
        """Trio side: the libp2p host is gone; stop reaching for it."""
        self._host = None

    def reset(self) -> None:
        """Forget every verdict (asyncio side, while no trio run is going)."""
        self._admissions.clear()
        self._admitted.clear()

    # --- queries --------------------------------------------------------------------------------
    def refusal_reason(self, peer: str) -> str | None:
        """Why ``peer`` was last refused admission, or None."""
        return self._refusals.reasons.get(peer)

    def admitted_peers(self) -> set[str]:
        """Peers connected now that proved the token (a copy)."""
        return set(self._admitted)

    def is_admitted(self, peer: str) -> bool:
        """True when ``peer`` is connected and proved the token."""
        return peer in self._admitted

    async def wait_admitted(self, peer: str) -> bool:
        """Trio side: wait (bounded) for ``peer``'s verdict; True when it was admitted."""
        record = self._admission_for(peer)
        with trio.move_on_after(self.timeout + 1):
            await record.decided.wait()
        return record.admitted

    def forwarded_by_admitted(self, forwarder: ID, msg: Any) -> bool:
        """Pubsub topic validator: only gossip forwarded by us or an admitted peer passes."""
        if str(forwarder) == self.peer_id or str(forwarder) in self._admitted:
            return True
        self.counters["gossip_refused"] += 1
        return False

    def guard(self, handler: NetStreamHandler) -> NetStreamHandler:
        """Wrap a libp2p stream handler so only admitted peers reach it.

        A stream may arrive before our side finished the handshake, so the gate waits for the
        verdict (bounded by the admission timeout) rather than refusing at once.
        """

        async def gate(net_stream: Any) -> None:
            peer = peer_of(net_stream)
            if peer not in self._admitted and not await self.wait_admitted(peer):
                self.counters["streams_refused"] += 1
                await quiet_reset(net_stream)
                return
            await handler(net_stream)

        gate.kairos_gate = self  # type: ignore[attr-defined]
        return gate

    def guards(self, handler: Any) -> bool:
        """Whether ``handler`` is one of this gate's :meth:`guard` wrappers."""
        return getattr(handler, "kairos_gate", None) is self

    # --- connections ----------------------------------------------------------------------------
    async def connect(self, peer: str, dial: Callable[[], Awaitable[Any]]) -> None:
        """Trio side: ``dial()`` ``peer`` unless it is admitted already, then await the verdict.

        Raises :class:`P2PError` when the dial fails, :class:`AdmissionError` when not admitted.
        """
        if peer in self.revoked:
            self.counters["admission_revoked"] += 1
            raise AdmissionError(f"{peer} is revoked: not dialled")
        if peer in self._admitted:
            return
        record = self._admission_for(peer)
        try:
            await dial()
        except Exception as exc:
            if not record.decided.is_set() and self._admissions.get(peer) is record:
                del self._admissions[peer]
            raise P2PError(f"cannot reach {peer}: {type(exc).__name__}: {exc}") from None
        if not await self.wait_admitted(peer):
            raise AdmissionError(f"{peer} not admitted: {record.reason or 'admission timed out'}")

    def connected(self, conn: Any) -> None:
        """Trio side: a connection is up; start (dialler) or await (listener) its admission."""
        peer = str(conn.muxed_conn.peer_id)
        record = self._admission_for(peer)
        if record.decided.is_set():
            return
        if peer in self.revoked:
            self.counters["admission_revoked"] += 1
            self._nursery.start_soon(self._refuse, peer, record, "revoked", None)
            return
        if dialled_by_us(conn):
            self._nursery.start_soon(self._admit_dialler, peer, record)
        else:
            self._nursery.start_soon(self._await_dialler, peer, record)

    def disconnected(self, conn: Any) -> None:
        """Trio side: a connection is gone; the peer leaves once its last connection does."""
        peer_id = conn.muxed_conn.peer_id
        host = self._host
        if host is not None and host.get_network().get_connections(peer_id):
            return
        self._forget(str(peer_id), "disconnected during admission")

    def _forget(self, peer: str, reason: str) -> bool:
        """End ``peer``'s pending admission (with ``reason``) and its admitted state; True when it
        was admitted (then ``on_gone`` was called)."""
        record = self._admissions.pop(peer, None)
        if record is not None and not record.decided.is_set():
            record.reason = reason
            record.decided.set()
        if peer not in self._admitted:
            return False
        self._admitted.discard(peer)
        self._on_gone(peer)
        return True

    async def admit_listener(self, net_stream: Any) -> None:
        """The ``/kairos/admit/1.0.0`` stream handler: check a dialler's proof."""
        peer = peer_of(net_stream)
        record = self._admission_for(peer)
        # A peer we count as admitted that asks again gets its answer like any other: it dialled
        # a new connection (a quick reconnect whose old connection's end we have not seen yet,
        # or one libp2p lost track of), and hanging up on it would lock it out for as long as we
        # miss that end — for good when the swarm keeps the dead connection listed.
        if peer in self.revoked:
            self.counters["admission_revoked"] += 1
            await self._refuse(peer, record, "revoked", net_stream)
            return
        try:
            with trio.fail_after(self.timeout):
                await admit_as_listener(_NetByteChannel(net_stream), self.schedule.admission_keys(), peer, self.peer_id)
        except trio.TooSlowError:
            await self._refuse(peer, record, "admission timed out", net_stream)
        except AdmissionError as exc:
            await self._refuse(peer, record, str(exc), net_stream)
        except Exception as exc:
            await self._refuse(peer, record, f"admission failed: {type(exc).__name__}: {exc}", net_stream)
        else:
            await quiet_close(net_stream)
            await self._admit(peer, record)

    # --- verdicts -------------------------------------------------------------------------------
    def _admission_for(self, peer: str) -> _Admission:
        record = self._admissions.get(peer)
        if record is None:
            record = self._admissions[peer] = _Admission()
        return record

    async def _admit_dialler(self, peer: str, record: _Admission) -> None:
        keys = self.schedule.admission_keys()  # two during a token rotation's grace window
        net_stream = None
        try:
            with trio.fail_after(self.timeout):
                net_stream = await self._host.new_stream(ID.from_base58(peer), [ADMIT_PROTOCOL])
                await admit_as_dialler(_NetByteChannel(net_stream), keys, self.peer_id, peer)
        except trio.TooSlowError:
            await self._refuse(peer, record, "admission timed out", net_stream)
        except AdmissionError as exc:
            await self._refuse(peer, record, str(exc), net_stream)
        except Exception as exc:  # the peer does not speak our protocol, or the dial broke
            await self._refuse(peer, record, f"admission failed: {type(exc).__name__}: {exc}", net_stream)
        else:
            await quiet_close(net_stream)
            await self._admit(peer, record)

    async def _await_dialler(self, peer: str, record: _Admission) -> None:
        """An accepted connection must be followed by the dialler's proof in time."""
        with trio.move_on_after(self.timeout):
            await record.decided.wait()
            return
        await self._refuse(peer, record, "no admission attempt before the timeout", None)

    async def revoke(self, peers: frozenset[str]) -> None:
        """Trio side: refuse ``peers`` from now on and close what they have open, at once.

        They leave the admitted set before their connections close, so no stream handler or
        gossip validator lets anything of theirs through meanwhile.
        """
        self.revoked = self.revoked | frozenset(peers)
        for peer in peers:
            if self._forget(peer, "revoked"):
                self.counters["revoked_disconnected"] += 1
            await self._disconnect(peer)

    async def _admit(self, peer: str, record: _Admission) -> None:
        if record.decided.is_set():
            return
        if peer in self.revoked:  # revoked while its handshake ran
            await self._refuse(peer, record, "revoked", None)
            return
        record.admitted = True
        record.decided.set()
        self._admitted.add(peer)
        self.counters["admission_ok"] += 1
        await self._on_admitted(peer)

    async def _refuse(self, peer: str, record: _Admission, reason: str, net_stream: Any) -> None:
        if record.admitted:
            return  # a parallel handshake on another connection already succeeded
        self.counters["admission_failed"] += 1
        self.counters[f"admission_refused_{refusal_kind(reason)}"] += 1  # by reason: what kairos doctor explains
        self._refusals.note(peer, reason)
        record.reason = reason
        record.decided.set()
        if self._admissions.get(peer) is record:
            del self._admissions[peer]
        if net_stream is not None:
            await quiet_reset(net_stream)
        await self._disconnect(peer)

    async def _disconnect(self, peer: str) -> None:
        """Close every connection of ``peer``, bounded; failure is only noted (it may be gone)."""
        if self._host is not None:
            with trio.move_on_after(5):
                try:
                    await self._host.disconnect(ID.from_base58(peer))
                except Exception as exc:
                    log.debug("disconnecting %s failed: %r", peer, exc)
