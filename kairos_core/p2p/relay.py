"""Relayed libp2p connections between admitted peers: a small circuit relay over admitted streams.

A node that is publicly reachable (:mod:`.reachability`) serves ``/kairos/relay/hop/1.0.0`` to
admitted peers; a private node keeps a *reservation* on one or two of them (a hop stream it holds
open) and advertises ``<relay address>/p2p-circuit/p2p/<itself>``. A peer dialling such an
address asks the relay to ``connect`` it; the relay opens ``/kairos/relay/stop/1.0.0`` to the
reserved node and, when that accepts, copies bytes between the two streams. Each end then treats
its stream as a raw connection and upgrades it as libp2p upgrades a TCP socket (noise, yamux)
into an ordinary connection of the swarm, so the admission gate runs ``/kairos/admit`` on it and
everything above works unchanged. The relay sees only noise ciphertext.

Why not py-libp2p 0.8.1's ``relay.circuit_v2``: it is not wired into ``new_host()``; its
transport starts its own DHT client, relay discovery and reservation refresh loops, a
performance tracker and resource manager of its own, all of which would have to be tamed and
put behind the gate; its limits are per IP and global, not per admitted peer. This module is the
part of it we need (~ the hop/stop split of circuit v2) and reuses libp2p's own upgrade path.

Limits, all per peer and counted when hit: only admitted peers reach either protocol (the gate),
only public nodes with ``p2p.relay.enable`` accept reservations, at most ``max_circuits`` circuits
at once per peer (as source or destination), each circuit closed after ``max_bytes`` bytes or
``max_duration`` seconds, at most :data:`MAX_RESERVATIONS` reservations in all. Everything here
runs on the host's trio thread.
"""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import multiaddr
import trio
from libp2p.abc import ConnectionType
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID

from .errors import P2PError
from .frames import FrameError, read_frame, write_frame
from .gate import peer_of, quiet_close, quiet_reset

log = logging.getLogger(__name__)

HOP_PROTOCOL = "/kairos/relay/hop/1.0.0"
STOP_PROTOCOL = "/kairos/relay/stop/1.0.0"
CIRCUIT = "/p2p-circuit"
MAX_RESERVATIONS = 128
#: a private node keeps reservations on this many relays
WANTED_RESERVATIONS = 2
# A relay answers a request and a reserved node answers a stop within this many seconds.
REQUEST_TIMEOUT = 10.0
# How often the reservation loop looks at the verdict and the candidates (a check, no traffic).
RESERVE_INTERVAL = 1.0
REFUSED_BACKOFF = 60.0  # a relay that refused a reservation is not asked again for this long
PUMP_CHUNK = 64 * 1024


@dataclass(frozen=True)
class RelayLimits:
    """What a relay grants each admitted peer (``p2p.relay`` in the config)."""

    enable: bool = True
    max_circuits: int = 8
    max_bytes: int = 1 << 30
    max_duration: float = 3600.0


def circuit_address(relay_address: str, relay_id: str, target_id: str) -> str:
    """``<relay address>/p2p/<relay>/p2p-circuit/p2p/<target>``."""
    base = relay_address if "/p2p/" in relay_address else f"{relay_address}/p2p/{relay_id}"
    return f"{base}{CIRCUIT}/p2p/{target_id}"


def split_circuit(address: str) -> tuple[str, str, str] | None:
    """``(relay address with /p2p/<relay>, relay id, target id)`` of a circuit address, else None."""
    if CIRCUIT + "/" not in address:
        return None
    relay_part, _, target_part = address.partition(CIRCUIT)
    if "/p2p/" not in relay_part or not target_part.startswith("/p2p/"):
        return None
    relay_id = relay_part.rsplit("/p2p/", 1)[1]
    target_id = target_part[len("/p2p/") :]
    if not relay_id or not target_id or "/" in relay_id or "/" in target_id:
        return None
    return relay_part, relay_id, target_id


def _valid_peer(text: Any) -> ID | None:
    if not isinstance(text, str) or len(text) > 128:
        return None
    try:
        return ID.from_base58(text)
    except Exception:
        return None


def is_relayed(conn: Any) -> bool:
    """Whether the libp2p connection ``conn`` runs through a relay (this module marks its raw
    connections so)."""
    try:
        return conn.muxed_conn.get_connection_type() == ConnectionType.RELAYED
    except Exception:  # a connection that cannot tell is a TCP one of ours
        return False


class Relay:
    """Both sides of the relay for one host: serving circuits, and holding reservations."""

    def __init__(
        self,
        peer_id: str,
        limits: RelayLimits,
        counters: dict[str, int],
        is_public: Callable[[], bool],
        on_reservations_changed: Callable[[], None] = lambda: None,
    ) -> None:
        self.peer_id = peer_id
        #: called (trio side) when a reservation of ours is made or lost: our relayed addresses changed
        self.on_reservations_changed = on_reservations_changed
        self.limits = limits
        self.counters = counters
        self._is_public = is_public
        self._host: Any = None
        self._nursery: trio.Nursery | None = None
        # relay side
        self._reserved: dict[str, Any] = {}  # reserved peer -> its hop stream
        self._circuits: Counter[str] = Counter()
        # client side
        self._holding: dict[str, str] = {}  # relay peer -> the relay's address we advertise through
        self._refused_until: dict[str, float] = {}  # relays that refused us: not asked again before
        #: peers whose connection with us runs through a relay
        self.relayed: set[str] = set()

    def attach(self, host: Any, nursery: trio.Nursery) -> None:
        self._host, self._nursery = host, nursery

    def detach(self) -> None:
        self._host = None
        self._reserved.clear()
        self._circuits.clear()
        self._holding.clear()
        self.relayed.clear()

    # --- what we advertise ----------------------------------------------------------------------
    def addresses(self) -> list[str]:
        """Our relayed addresses, one per relay holding a reservation for us."""
        return [circuit_address(address, relay, self.peer_id) for relay, address in sorted(self._holding.items())]

    def relays(self) -> list[str]:
        """Relays holding a reservation for us."""
        return sorted(self._holding)

    def reserved_peers(self) -> list[str]:
        """Peers holding a reservation on us (relay side)."""
        return sorted(self._reserved)

    def serving(self) -> dict[str, int]:
        """Relay-side load: reservations held and circuits open."""
        return {"reservations": len(self._reserved), "circuits": sum(self._circuits.values()) // 2}

    # --- relay side -----------------------------------------------------------------------------
    async def serve_hop(self, net_stream: Any) -> None:
        """``/kairos/relay/hop/1.0.0`` (behind the gate): a reservation or a connect request."""
        peer = peer_of(net_stream)
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = await read_frame(net_stream)
        except (FrameError, trio.TooSlowError) as exc:
            self.counters["relay_bad_requests"] += 1
            log.debug("relay request from %s dropped: %s", peer, exc)
            await quiet_reset(net_stream)
            return
        if not (self.limits.enable and self._is_public()):
            await self._refuse(net_stream, "this node is not a relay")
            return
        op = request.get("op")
        if op == "reserve":
            await self._reserve(peer, net_stream)
        elif op == "connect":
            await self._connect(peer, request.get("peer"), net_stream)
        else:
            self.counters["relay_bad_requests"] += 1
            await quiet_reset(net_stream)

    async def _refuse(self, net_stream: Any, reason: str) -> None:
        self.counters["relay_refused"] += 1
        try:
            await write_frame(net_stream, {"ok": False, "reason": reason})
        except FrameError:
            pass
        # close, not reset: a reset right behind the frame can overtake it, and the peer then
        # sees "stream reset" instead of the reason (seen in CI)
        await quiet_close(net_stream)

    async def _reserve(self, peer: str, net_stream: Any) -> None:
        if peer not in self._reserved and len(self._reserved) >= MAX_RESERVATIONS:
            await self._refuse(net_stream, "too many reservations")
            return
        old = self._reserved.get(peer)
        self._reserved[peer] = net_stream
        if old is not None:
            await quiet_reset(old)
        try:
            await write_frame(net_stream, {"ok": True})
            self.counters["relay_reservations"] += 1
            # The reservation lasts while the peer keeps the stream open; it sends nothing more.
            await read_frame(net_stream)
        except FrameError:
            pass
        finally:
            if self._reserved.get(peer) is net_stream:
                del self._reserved[peer]
            await quiet_reset(net_stream)

    async def _connect(self, source: str, target_text: Any, net_stream: Any) -> None:
        target = _valid_peer(target_text)
        if target is None:
            self.counters["relay_bad_requests"] += 1
            await quiet_reset(net_stream)
            return
        dest = str(target)
        if dest not in self._reserved:
            await self._refuse(net_stream, "no reservation for that peer")
            return
        if max(self._circuits[source], self._circuits[dest]) >= self.limits.max_circuits:
            await self._refuse(net_stream, "too many circuits")
            return
        self._circuits[source] += 1
        self._circuits[dest] += 1
        stop = None
        try:
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    stop = await self._host.new_stream(target, [STOP_PROTOCOL])
                    await write_frame(stop, {"peer": source})
                    answer = await read_frame(stop)
            except Exception as exc:  # the reserved node is gone, refuses, or answers garbage
                await self._refuse(net_stream, f"the peer did not accept: {type(exc).__name__}")
                return
            if answer.get("ok") is not True:
                await self._refuse(net_stream, "the peer refused")
                return
            try:
                await write_frame(net_stream, {"ok": True})
            except FrameError:
                return
            self.counters["relay_circuits"] += 1
            await self._splice(net_stream, stop)
        finally:
            for peer in (source, dest):
                self._circuits[peer] -= 1
                if self._circuits[peer] <= 0:
                    del self._circuits[peer]
            await quiet_reset(net_stream)
            if stop is not None:
                await quiet_reset(stop)

    async def _splice(self, a: Any, b: Any) -> None:
        """Copy both ways until either side ends or the circuit's bytes or time run out."""
        left = [self.limits.max_bytes]

        async def pump(src: Any, dst: Any, scope: trio.CancelScope) -> None:
            try:
                while True:
                    data = await src.read(PUMP_CHUNK)
                    if not data:
                        break
                    left[0] -= len(data)
                    if left[0] < 0:
                        self.counters["relay_circuits_over_bytes"] += 1
                        break
                    self.counters["relay_bytes"] += len(data)
                    await dst.write(data)
            except Exception:  # a reset end (StreamError) closes the circuit; nothing to report
                pass
            finally:
                scope.cancel()

        with trio.move_on_after(self.limits.max_duration) as timer:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, a, b, nursery.cancel_scope)
                nursery.start_soon(pump, b, a, nursery.cancel_scope)
        if timer.cancelled_caught:
            self.counters["relay_circuits_over_time"] += 1

    # --- reserved side --------------------------------------------------------------------------
    async def serve_stop(self, net_stream: Any) -> None:
        """``/kairos/relay/stop/1.0.0`` (behind the gate): a relay brings us a peer's connection."""
        relay = peer_of(net_stream)
        if relay not in self._holding:
            self.counters["relay_stop_refused"] += 1
            await quiet_reset(net_stream)
            return
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                request = await read_frame(net_stream)
                source = _valid_peer(request.get("peer"))
                if source is None or str(source) == self.peer_id:
                    raise FrameError("no valid peer id")
                if self._holds_direct(source):
                    self.counters["relay_stop_direct_exists"] += 1
                    await quiet_reset(net_stream)
                    return
                await write_frame(net_stream, {"ok": True})
        except (FrameError, trio.TooSlowError) as exc:
            self.counters["relay_bad_requests"] += 1
            log.debug("stop request from relay %s dropped: %s", relay, exc)
            await quiet_reset(net_stream)
            return
        raw = RawConnection(net_stream, False, ConnectionType.RELAYED)
        address = multiaddr.Multiaddr(f"{self._holding[relay]}{CIRCUIT}")
        self.relayed.add(str(source))
        try:
            # noise proves who is at the other end; the gate then awaits its admission proof
            muxed = await self._host.get_network().upgrade_inbound_raw_conn(raw, address)
        except Exception as exc:
            self.relayed.discard(str(source))
            self.counters["relay_upgrade_failed"] += 1
            log.debug("relayed connection from %s via %s failed: %r", source, relay, exc)
            await quiet_reset(net_stream)
            return
        proven = getattr(muxed, "peer_id", None)
        if proven is not None and str(proven) != str(source):
            # the relay named someone else than the peer noise proved: that name would be kept
            # out of our dial-backs and relay candidates while the real peer passed for direct
            self.relayed.discard(str(source))
            self.counters["relay_source_mismatch"] += 1
            log.warning("relay %s named %s for a connection from %s: closed", relay, source, proven)
            with suppress(Exception):
                await muxed.close()

    async def dial(self, relay_address: str, relay: str, target: str, connect_relay: Callable[[str], Awaitable[None]]) -> None:
        """Connect to ``target`` through ``relay`` (dialled and admitted first if need be)."""
        await connect_relay(relay_address)
        target_id = ID.from_base58(target)
        if self._holds_direct(target_id):
            raise P2PError(f"connected to {target} directly already: no relayed connection beside it")
        net_stream = await self._host.new_stream(ID.from_base58(relay), [HOP_PROTOCOL])
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                await write_frame(net_stream, {"op": "connect", "peer": target})
                answer = await read_frame(net_stream)
        except (FrameError, trio.TooSlowError) as exc:
            await quiet_reset(net_stream)
            raise P2PError(f"relay {relay} did not answer: {exc}") from None
        if answer.get("ok") is not True:
            await quiet_reset(net_stream)
            reason = answer.get("reason")
            raise P2PError(f"relay {relay} refused: {reason if isinstance(reason, str) else 'no reason'}"[:200])
        raw = RawConnection(net_stream, True, ConnectionType.RELAYED)
        self.relayed.add(target)
        try:
            await self._host.get_network().upgrade_outbound_raw_conn(raw, target_id)
        except BaseException:
            self.relayed.discard(target)
            await quiet_reset(net_stream)
            raise

    def _holds_direct(self, peer: ID) -> bool:
        """Whether a connection to ``peer`` that is not relayed is up. A relayed one beside it
        would be a duplicate, and libp2p's per-peer trim spares the newest connection: it could
        close the direct (hole-punched) one and leave the peer on the relay."""
        return self._host is not None and not all(map(is_relayed, self._host.get_network().get_connections(peer)))

    def disconnected(self, peer: str) -> None:
        """The last connection to ``peer`` closed."""
        self.relayed.discard(peer)

    async def keep_reservations(self, wanted: Callable[[], bool], candidates: Callable[[], list[tuple[str, str]]]) -> None:
        """While ``wanted()``, hold reservations on up to :data:`WANTED_RESERVATIONS` of
        ``candidates()`` — ``(relay peer, its address)`` of admitted peers on direct connections."""
        trying: set[str] = set()
        while True:
            if wanted():
                for relay, address in candidates():
                    if len(self._holding) + len(trying) >= WANTED_RESERVATIONS:
                        break
                    if relay in self._holding or relay in trying:
                        continue
                    if self._refused_until.get(relay, 0.0) > trio.current_time():
                        continue
                    trying.add(relay)
                    self._nursery.start_soon(self._hold, relay, address, trying)
            await trio.sleep(RESERVE_INTERVAL)

    async def _hold(self, relay: str, address: str, trying: set[str]) -> None:
        net_stream = None
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                net_stream = await self._host.new_stream(ID.from_base58(relay), [HOP_PROTOCOL])
                await write_frame(net_stream, {"op": "reserve"})
                answer = await read_frame(net_stream)
            if answer.get("ok") is not True:
                self.counters["relay_reservation_refused"] += 1
                self._refused_until[relay] = trio.current_time() + REFUSED_BACKOFF
                if len(self._refused_until) > 1024:
                    self._refused_until.clear()
                return
            self._holding[relay] = address
            trying.discard(relay)
            log.info("relay %s holds a reservation for us: reachable at %s", relay, circuit_address(address, relay, self.peer_id))
            self.on_reservations_changed()
            await read_frame(net_stream)  # the relay sends nothing: this returns when it is gone
        except Exception as exc:
            log.debug("reservation on %s ended: %r", relay, exc)
        finally:
            trying.discard(relay)
            if self._holding.pop(relay, None) is not None:
                log.info("reservation on relay %s lost", relay)
                self.on_reservations_changed()
            if net_stream is not None:
                await quiet_reset(net_stream)
