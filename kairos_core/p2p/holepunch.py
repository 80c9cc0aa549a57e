"""Direct connections between NATed peers: replacing a relayed libp2p connection (our DCUtR).

Two peers whose connection runs through a relay (:mod:`.relay`) try to replace it with a TCP
connection of their own, opened from both sides at once through both NATs. The peer with the
lower id (the initiator) asks over the relayed connection, on ``/kairos/holepunch/1.0.0``: it binds
a fresh TCP socket and sends the address the others see its connections come from (its observed
public IP, :mod:`.reachability`) with that socket's port; the other end binds one of its own,
answers the same way and connects at once; the initiator connects as it reads the answer. Each
SYN opens its own router's mapping toward the other, so the later one finds the other side's
mapping open and gets through (a TCP simultaneous open when both meet in flight): a NAT that keeps
the source port — plain ``masquerade``, most home and office routers — lets the pair meet. A NAT
that picks a new port for each destination (symmetric) does not: the attempt ends after
:data:`CONNECT_TIMEOUT` and the relayed connection stays, as it was.

The new socket is upgraded as libp2p upgrades a dialled one (noise — which proves the peer
again —, then yamux), the initiator as the dialler. Once the initiator reports its upgrade done
and has read the answer, the other end closes the relayed connection: both ends hold the direct
one by then, so the peer never looks disconnected, and every stream opens on the direct
connection from now on.

Why not py-libp2p 0.8.1's DCUtR (``libp2p.relay.circuit_v2.dcutr``): it runs over the connections
of its own circuit v2 transport, which we do not use (see :mod:`.relay`), and sends each side's
advertised addresses, which a NATed node does not know to be its router's.

Limits: only a peer whose connection with us is relayed gets an answer, at most one per
:data:`ANSWER_INTERVAL`, at most :data:`MAX_ATTEMPTS` attempts run at once; garbage and refusals
are counted. Everything here runs on the host's trio thread.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from contextlib import suppress
from typing import Any, Awaitable, Callable

import multiaddr
import trio
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.io.trio import TrioTCPStream
from libp2p.peer.id import ID

from ..ratelimit import TokenBuckets
from .frames import FrameError, read_frame, write_frame
from .gate import peer_of, quiet_close, quiet_reset

log = logging.getLogger(__name__)

HOLEPUNCH_PROTOCOL = "/kairos/holepunch/1.0.0"
#: how long the two SYNs have to meet: one retransmission (1 s) and its successor (3 s) included
CONNECT_TIMEOUT = 4.0
# The exchange over the relay (two frames), and the noise and yamux upgrade of the new socket.
REQUEST_TIMEOUT = 10.0
UPGRADE_TIMEOUT = 10.0
PROTECT_TAG = "kairos-holepunch"
ANSWER_INTERVAL = 10.0  # one answer per peer per this many seconds
MAX_ATTEMPTS = 8
#: the initiator tries this often per relayed connection, this long apart (a NAT mapping may
#: need the relayed connection's first exchange to settle; a symmetric NAT fails every time)
TRIES, RETRY_AFTER = 2, 15.0
# How long an initiator waits for its own observed address (the first reachability round).
OBSERVED_WAIT, OBSERVED_POLL = 10.0, 0.25


def _usable_ip(text: Any) -> str | None:
    """``text`` as an IP another machine could connect to (not loopback, multicast or any), else None."""
    if not isinstance(text, str) or len(text) > 64:
        return None
    try:
        parsed = ipaddress.ip_address(text)
    except ValueError:
        return None
    if parsed.is_multicast or parsed.is_unspecified or parsed.is_loopback:
        return None
    return str(parsed)


def observed_ip(observed: list[str]) -> str | None:
    """The first usable IP among ``observed`` (``/ip4|ip6/<ip>/tcp/<port>``), else None."""
    for address in observed:
        parts = address.split("/")
        if len(parts) >= 3 and parts[1] in ("ip4", "ip6") and (ip := _usable_ip(parts[2])) is not None:
            return ip
    return None


def endpoint(message: Any) -> tuple[str, int] | None:
    """``(ip, port)`` of a peer's ``{"ip", "port"}``, or None when that is not a usable endpoint."""
    if not isinstance(message, dict):
        return None
    ip, port = _usable_ip(message.get("ip")), message.get("port")
    if ip is None or not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        return None
    return ip, port


def _bound_socket(family: socket.AddressFamily) -> trio.socket.SocketType:
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return sock


class HolePunch:
    """Both ends of the upgrade of relayed connections to direct ones, for one host."""

    def __init__(
        self,
        counters: dict[str, int],
        observed: Callable[[], list[str]],
        relayed: Callable[[str], bool],
        on_direct: Callable[[str, bool], Awaitable[None]],
    ) -> None:
        """``observed()``: where admitted peers see our connections come from; ``relayed(peer)``:
        whether our connection with ``peer`` runs through a relay; ``on_direct(peer, close_relayed)``:
        awaited once a direct connection is up on both ends; the responder's call closes the
        relayed connection."""
        self.counters = counters
        self._observed = observed
        self._relayed = relayed
        self._on_direct = on_direct
        self._host: Any = None
        self._answers = TokenBuckets(rate=1 / ANSWER_INTERVAL, burst=1, max_keys=4096)
        self._running: set[str] = set()
        #: peers a punched connection was made with (the host forgets a peer with its last connection)
        self.met: set[str] = set()

    def attach(self, host: Any) -> None:
        self._host = host

    def detach(self) -> None:
        self._host = None
        self._answers = TokenBuckets(rate=1 / ANSWER_INTERVAL, burst=1, max_keys=4096)
        self._running.clear()
        self.met.clear()

    def running(self, peer: str) -> bool:
        """Whether an attempt with ``peer`` runs now (either end)."""
        return peer in self._running

    # --- initiator ------------------------------------------------------------------------------
    async def upgrade(self, peer: str) -> bool:
        """Try :data:`TRIES` times to replace our relayed connection with ``peer``; True on success."""
        for attempt in range(TRIES):
            if attempt:
                await trio.sleep(RETRY_AFTER)
            if self._host is None or not self._relayed(peer):
                return False  # gone, or direct already
            if await self._attempt(peer):
                return True
        return False

    async def _attempt(self, peer: str) -> bool:
        if peer in self._running or len(self._running) >= MAX_ATTEMPTS:
            return False
        ours = await self._wait_observed()
        if ours is None:
            self.counters["holepunch_no_address"] += 1
            return False
        self._hold(peer, True)
        self.counters["holepunch_attempts"] += 1
        net_stream = sock = None
        try:
            family = socket.AF_INET6 if ":" in ours else socket.AF_INET
            sock = _bound_socket(family)
            await sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            with trio.fail_after(REQUEST_TIMEOUT):
                net_stream = await self._host.new_stream(ID.from_base58(peer), [HOLEPUNCH_PROTOCOL])
                await write_frame(net_stream, {"ip": ours, "port": sock.getsockname()[1]})
                answer = await read_frame(net_stream)
            theirs = endpoint(answer)
            if theirs is None:
                self.counters["holepunch_refused"] += 1
                log.debug("hole punch to %s: no endpoint in the answer %r", peer, answer)
                return False
            conn = await self._meet(peer, sock, theirs, initiator=True)
            sock = None  # the connection owns it now
            if conn is None:
                return False
            with trio.fail_after(REQUEST_TIMEOUT):
                await write_frame(net_stream, {"done": True})
                await read_frame(net_stream)  # the other end's ack: it holds the connection too
            await self._on_direct(peer, False)
            return True
        except Exception as exc:  # the relay or the peer went away mid-way, or answered garbage
            self.counters["holepunch_failed"] += 1
            log.debug("hole punch to %s failed: %r", peer, exc)
            return False
        finally:
            self._hold(peer, False)
            if sock is not None:
                sock.close()
            if net_stream is not None:
                await quiet_reset(net_stream)

    async def _wait_observed(self) -> str | None:
        for _ in range(int(OBSERVED_WAIT / OBSERVED_POLL)):
            ip = observed_ip(self._observed())
            if ip is not None:
                return ip
            await trio.sleep(OBSERVED_POLL)  # a check, no traffic
        return None

    # --- responder ------------------------------------------------------------------------------
    async def serve(self, net_stream: Any) -> None:
        """``/kairos/holepunch/1.0.0`` (behind the gate): a peer on a relayed connection asks."""
        peer = peer_of(net_stream)
        now = trio.current_time()
        busy = peer in self._running or len(self._running) >= MAX_ATTEMPTS
        if not self._relayed(peer) or busy or not self._answers.take(peer, now):
            self.counters["holepunch_refused"] += 1
            await quiet_reset(net_stream)
            return
        ours = observed_ip(self._observed())
        self._hold(peer, True)
        sock = None
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                theirs = endpoint(await read_frame(net_stream))
                if theirs is None:
                    raise FrameError("no valid endpoint")
                if ours is None or (":" in ours) != (":" in theirs[0]):
                    self.counters["holepunch_no_address"] += 1
                    await write_frame(net_stream, {"ip": None})
                    await quiet_close(net_stream)
                    return
                family = socket.AF_INET6 if ":" in ours else socket.AF_INET
                sock = _bound_socket(family)
                await sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
                await write_frame(net_stream, {"ip": ours, "port": sock.getsockname()[1]})
            self.counters["holepunch_attempts"] += 1
            conn = await self._meet(peer, sock, theirs, initiator=False)
            sock = None
            if conn is None:
                await quiet_reset(net_stream)
                return
            with trio.fail_after(REQUEST_TIMEOUT):
                done = await read_frame(net_stream)
                if done.get("done") is not True:
                    raise FrameError("no report of the other end's upgrade")
                await write_frame(net_stream, {"ok": True})
            # The answer crosses the relay: closing the relayed connection before the asker read
            # it would drop it there, and the asker would count a failure while both hold the
            # direct connection. The asker ends the stream once it read the answer.
            with trio.move_on_after(REQUEST_TIMEOUT), suppress(FrameError):
                await read_frame(net_stream)
            await quiet_close(net_stream)
            await self._on_direct(peer, True)
        except (FrameError, trio.TooSlowError, OSError) as exc:
            self.counters["holepunch_bad_requests"] += 1
            log.debug("hole punch request from %s dropped: %r", peer, exc)
            await quiet_reset(net_stream)
        finally:
            self._hold(peer, False)
            if sock is not None:
                sock.close()

    def _hold(self, peer: str, held: bool) -> None:
        """Mark ``peer``'s attempt running or over. While it runs, libp2p's per-peer trim (one
        connection per peer) must not close either connection: the end whose new one registers
        first would close the relayed one under the other end, which would then hold none for a
        moment, forget the peer's admission and refuse the direct connection."""
        network = self._host.get_network() if self._host is not None else None
        if held:
            self._running.add(peer)
            if network is not None:
                network.protect(ID.from_base58(peer), PROTECT_TAG)
        else:
            self._running.discard(peer)
            if network is not None:
                with suppress(Exception):
                    network.unprotect(ID.from_base58(peer), PROTECT_TAG)

    # --- both ends ------------------------------------------------------------------------------
    async def _meet(self, peer: str, sock: Any, theirs: tuple[str, int], *, initiator: bool) -> Any:
        """Connect ``sock`` to ``theirs`` and upgrade it; the new connection, or None (counted)."""
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                await sock.connect(theirs)
        except (OSError, trio.TooSlowError) as exc:
            sock.close()
            self.counters["holepunch_failed"] += 1
            log.info("hole punch to %s at %s:%d: no direct connection (%s)", peer, *theirs, type(exc).__name__)
            return None
        raw = RawConnection(TrioTCPStream(trio.SocketStream(sock)), initiator)
        network = self._host.get_network()
        try:
            with trio.fail_after(UPGRADE_TIMEOUT):
                if initiator:
                    conn = await network.upgrade_outbound_raw_conn(raw, ID.from_base58(peer))
                else:
                    family = "ip6" if ":" in theirs[0] else "ip4"
                    address = multiaddr.Multiaddr(f"/{family}/{theirs[0]}/tcp/{theirs[1]}")
                    conn = await network.upgrade_inbound_raw_conn(raw, address)
        except Exception as exc:
            self.counters["holepunch_failed"] += 1
            log.debug("hole punch to %s: the upgrade failed: %r", peer, exc)
            with suppress(Exception):
                await raw.close()
            return None
        if str(getattr(conn, "peer_id", getattr(getattr(conn, "muxed_conn", None), "peer_id", ""))) != peer:
            # noise proved someone else at that address: not the peer we meant to meet
            self.counters["holepunch_wrong_peer"] += 1
            with suppress(Exception):
                await conn.close()
            return None
        self.counters["holepunch_successes"] += 1
        self.met.add(peer)
        log.info("hole punched: a direct connection to %s at %s:%d", peer, *theirs)
        return conn
