"""The forwarder: TUN ⇄ sealed UDP datagrams, one inner packet per datagram, syscalls batched.

Threads with non-blocking I/O and ``poll`` (asyncio measured ~2x slower here); one thread per TUN
queue, and the first one also receives. *Sending*: read a frame (a TSO super-frame with
offloads), cut it into MTU-sized inner packets, look up the peer of its destination VIP, seal
every packet on its own into one reused buffer and hand the whole train to the kernel with one UDP
GSO ``sendmsg``. *Receiving*: ``recvmsg`` with UDP GRO (a train of datagrams per call), open each
datagram, check that the inner source address belongs to the peer whose key opened it, and write
to the TUN, coalescing consecutive TCP segments into one GSO write. A lost wire datagram costs
exactly one inner packet.

Why one thread does both directions: a TUN write makes the kernel answer at once (an ICMP echo
reply, a TCP ACK) into the TUN's queue, and the thread that just wrote reads it on its next turn
without sleeping; with a thread per direction every round trip paid one more wake-up of a sleeping
thread, and the two threads of a process contended for the GIL. Measured here (``bench/vpn.py``):
added ping RTT p99 0.32 → 0.26 ms at one ping per 2 ms, iperf3 ~2.1 → ~2.6 Gbit/s.

The per-packet loops — sealing the middle segments of a TSO frame, opening a GRO train in order,
appending in-order TCP segments to the coalesced frame — run in C when the plugin was built with
its ``_fastpath`` extension (OpenSSL's AES-256-GCM; the same bytes on the wire, checked by tests);
everything else, and every packet that leaves the common case, stays in Python. Without the
extension, or with ``KAIROS_TUNVPN_PURE_PYTHON=1``, all of it runs in Python.

Wire format of a datagram (big-endian)::

    kind=1 (1) | epoch (1) | csum_start (1) | csum_offset (1) | key id (4) | counter (8)
    | AES-256-GCM(inner IP packet) with the 16 header bytes as associated data | tag (16)

The nonce is the header's last 12 bytes (key id + counter): unique per key, never sent twice.

``csum_start/csum_offset`` are non-zero when the inner packet's L4 checksum is partial (the
receiving kernel finishes it): see :mod:`.vnet`. Everything wrong is dropped and counted in
:attr:`DataPlane.counters`; nothing a peer sends can stop a thread.

The key id is readable by anyone who sees the traffic, so before any AES-GCM open a datagram must
come from the endpoint its session last authenticated from; one from another endpoint (the peer
roaming, or a flood) is opened only within the budget of :class:`~.roaming.RoamLimiter`, and
dropped unopened beyond it (``drop_roam_limited``). A GRO train is judged once, by its first
datagram: a flood costs a dictionary lookup per train.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any

from cryptography.exceptions import InvalidTag

from . import fastpath
from .crypto import (
    REKEY_AFTER_PACKETS,
    REKEY_AFTER_SECONDS,
    TAG_BYTES,
    ReceiveState,
    SendState,
    SessionKeys,
)
from .roaming import RoamLimiter
from .tun import TunDevice
from .vnet import (
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    NEEDS_CSUM,
    VNET_HDR,
    VNET_HDR_LEN,
    MalformedFrame,
    TcpCoalescer,
    TsoFrame,
    complete_checksum,
    l4_offset,
)

log = logging.getLogger(__name__)

WIRE_HEADER = struct.Struct("!BBBBIQ")
HEADER_BYTES = WIRE_HEADER.size
OVERHEAD = HEADER_BYTES + TAG_BYTES
KIND_DATA = 1
MAX_UDP_PAYLOAD = 65507
UDP_SEGMENT = 103  # not exported by Python 3.11's socket module
UDP_GRO = 104
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
# The kernel takes up to 128 segments per GSO send; a TSO frame never makes more than ~46.
MAX_GSO_SEGMENTS = 64
_GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
_SEGMENT_SIZE = struct.Struct("=H")
_GRO_SIZE = struct.Struct("=i")
_WIRE_WORDS = struct.Struct("!QQ")  # a wire header as two integers: (kind … key id) and counter
_KEY_ID = struct.Struct("!I")  # at offset 4 of a wire header
_POLL_IDLE_MS = 500
_TRANSIENT_SEND_ERRORS = {
    errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPERM, errno.EACCES,
    errno.ENOBUFS, errno.EMSGSIZE, errno.EINVAL, errno.EHOSTDOWN, errno.ENETDOWN,
}

@dataclass(slots=True)
class Counters:
    """Event counters of a data plane; each is written by one thread, read by anyone."""

    tx_packets: int = 0
    tx_bytes: int = 0
    tx_sends: int = 0
    tun_reads: int = 0
    rekeys: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_batches: int = 0
    tun_writes: int = 0
    drop_malformed: int = 0
    drop_no_route: int = 0
    drop_unsupported: int = 0
    drop_no_endpoint: int = 0
    drop_unknown_peer: int = 0
    drop_stale_epoch: int = 0
    drop_replay: int = 0
    drop_bad_tag: int = 0
    drop_spoofed_source: int = 0
    #: not from the endpoint of its session, and over the budget for opening such datagrams
    drop_roam_limited: int = 0
    #: datagrams from another endpoint than their session's that were opened (within the budget)
    roam_opens: int = 0
    #: sessions moved to a new endpoint by an authentic datagram from it
    roams: int = 0
    send_errors: int = 0
    recv_errors: int = 0
    tun_errors: int = 0

    def snapshot(self) -> dict[str, int]:
        """The current values by name."""
        return {name: getattr(self, name) for name in COUNTER_NAMES}


#: every counter of :class:`Counters`, in order
COUNTER_NAMES = tuple(f.name for f in fields(Counters))


#: the ``encrypt_into`` arguments at one train position: nonce, inner packet, associated data, destination
SealSlot = tuple[memoryview, memoryview, memoryview, memoryview]
#: one train position for opening: the datagram, the ``decrypt_into`` arguments (nonce, sealed
#: packet, associated data, destination) and the inner packet's length
OpenSlot = tuple[memoryview, memoryview, memoryview, memoryview, memoryview, int]
#: the per-thread cache of open slots by datagram size (``-size``: the C path's inner-packet views)
OpenViews = dict[int, list[Any]]


def _seal_views(out_view: memoryview, size: int, length: int, slots: int) -> list[SealSlot]:
    """The ``encrypt_into`` arguments (nonce, inner packet, associated data, destination) of an
    inner packet of ``length`` bytes at each of ``slots`` train positions ``size`` bytes apart."""
    views: list[SealSlot] = []
    for slot in range(slots):
        at = slot * size
        body = at + HEADER_BYTES
        views.append((out_view[at + 4 : body], out_view[body : body + length], out_view[at:body],
                      out_view[body : body + length + TAG_BYTES]))
    return views


def _open_views(view: memoryview, rx_view: memoryview, size: int, slots: int) -> list[OpenSlot]:
    """Per train position of ``size``-byte datagrams in ``view``: the datagram, the
    ``decrypt_into`` arguments (nonce, sealed packet, associated data, destination in
    ``rx_view`` after the vnet header) and the inner packet's length."""
    length = size - OVERHEAD
    inner = rx_view[VNET_HDR_LEN : VNET_HDR_LEN + length]
    views: list[OpenSlot] = []
    for slot in range(slots):
        datagram = view[slot * size : slot * size + size]
        views.append((datagram, datagram[4:HEADER_BYTES], datagram[HEADER_BYTES:], datagram[:HEADER_BYTES],
                      inner, length))
    return views


class Peer:
    """One remote node: its virtual IP (and extra networks), UDP endpoint, session state."""

    __slots__ = ("peer_id", "vip", "vip_bytes", "networks", "endpoint", "source", "send", "receive", "fallback",
                 "heard", "udp_heard")

    def __init__(
        self,
        peer_id: str,
        vip: ipaddress.IPv4Address,
        endpoint: tuple[str, int] | None,
        send: SendState,
        receive: ReceiveState,
        networks: tuple[ipaddress.IPv4Network, ...],
    ) -> None:
        self.peer_id = peer_id
        self.vip = vip
        self.vip_bytes = vip.packed
        self.networks = networks
        self.endpoint = endpoint
        # the UDP endpoint whose datagrams are opened without a roaming token: where the last
        # authentic datagram came from (until there is one, where the peer was said to be)
        self.source = endpoint
        self.send = send
        self.receive = receive
        self.fallback: Callable[[bytes], object] | None = None
        # time.monotonic() of the last authentic datagram, by any path / over UDP (None: never);
        # only authentic datagrams move them, so forged ones cannot fake liveness
        self.heard: float | None = None
        self.udp_heard: float | None = None

    def owns_source(self, source: bytes) -> bool:
        """True if an inner packet from ``source`` may come from this peer."""
        if source == self.vip_bytes:
            return True
        address = ipaddress.IPv4Address(source)
        return any(address in network for network in self.networks)


class DataPlane:
    """The forwarder between one TUN device and one UDP socket.

    :param tun: an open :class:`TunDevice` (the data plane does not close it).
    :param udp_bind: local address of the UDP socket, e.g. ``("0.0.0.0", 51820)``; port 0 picks one
        (see :attr:`local_address`).
    :param udp_gso: send trains of datagrams with one ``sendmsg`` (UDP_SEGMENT).
    :param udp_gro: receive trains with one ``recvmsg`` (UDP_GRO).
    :param coalesce: merge received TCP segments into GSO writes (needs a vnet-header TUN).
    :param roam_limiter: the budget for opening datagrams that do not come from their session's
        endpoint (default: :class:`~.roaming.RoamLimiter` with its default rates); the attribute
        of the same name may be replaced while the plane runs.
    """

    def __init__(
        self,
        tun: TunDevice,
        udp_bind: tuple[str, int],
        *,
        udp_gso: bool = True,
        udp_gro: bool = True,
        coalesce: bool = True,
        rekey_after_packets: int = REKEY_AFTER_PACKETS,
        rekey_after_seconds: float = REKEY_AFTER_SECONDS,
        socket_buffer: int = 8 << 20,
        roam_limiter: RoamLimiter | None = None,
    ) -> None:
        self.tun = tun
        self.roam_limiter = roam_limiter if roam_limiter is not None else RoamLimiter()
        self.udp_gso = udp_gso
        self.coalesce = coalesce and tun.vnet_hdr
        self.rekey_after_packets = rekey_after_packets
        self.rekey_after_seconds = rekey_after_seconds
        self._counters = Counters()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, force, socket_buffer)
            except OSError:  # without CAP_NET_ADMIN: capped by net.core.*mem_max
                self._sock.setsockopt(socket.SOL_SOCKET, plain, socket_buffer)
        self.udp_gro = False
        if udp_gro:
            try:
                self._sock.setsockopt(socket.SOL_UDP, UDP_GRO, 1)
                self.udp_gro = True
            except OSError:
                log.info("UDP_GRO unavailable: receiving one datagram per call")
        self._sock.bind(udp_bind)
        self._sock.setblocking(False)
        self.local_address: tuple[str, int] = self._sock.getsockname()
        self._peers: dict[str, Peer] = {}
        self._by_vip: dict[bytes, Peer] = {}
        self._by_key_id: dict[int, Peer] = {}
        self._routed: list[tuple[ipaddress.IPv4Network, Peer]] = []
        self._control = threading.Lock()
        self._rx_lock = threading.Lock()  # receive state is shared by the receiving thread and injections
        self._rx_buf = bytearray(VNET_HDR_LEN + 65536 + 64)
        self._rx_view = memoryview(self._rx_buf)
        self._coalescer = TcpCoalescer(self._write_tun) if self.coalesce else None
        self._threads: list[threading.Thread] = []
        self._logged: set[tuple[str, ...]] = set()
        self.fastpath = fastpath.enabled()  # the C loops: built, and not turned off
        self._running = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ----- peers ---------------------------------------------------------------------------------

    def add_peer(
        self,
        peer_id: str,
        vip: ipaddress.IPv4Address | str,
        endpoint: tuple[str, int] | None,
        keys: SessionKeys,
        *,
        networks: Iterable[ipaddress.IPv4Network | str] = (),
    ) -> None:
        """Add a peer, or replace it (new keys, endpoint or VIP) if ``peer_id`` is known.

        :param vip: the peer's virtual IP; packets to it go to the peer, packets from the peer
            must come from it (or from one of ``networks``).
        :param endpoint: the peer's UDP address, or None to use its fallback (and learn the
            address from its first authentic datagram).
        :raises ValueError: if the VIP or the receive key id is already another peer's.
        """
        vip = ipaddress.IPv4Address(vip)
        nets = tuple(ipaddress.IPv4Network(n) for n in networks)
        with self._control:
            old = self._peers.get(peer_id)
            for other in self._peers.values():
                if other is old:
                    continue
                if other.vip == vip:
                    raise ValueError(f"VIP {vip} already belongs to peer {other.peer_id}")
                if other.receive.key_id == keys.receive_key_id:
                    raise ValueError(f"receive key id of {peer_id} collides with {other.peer_id}'s")
            peer = Peer(
                peer_id,
                vip,
                endpoint,
                SendState(keys, self.rekey_after_packets, self.rekey_after_seconds),
                ReceiveState(keys),
                nets,
            )
            if old is not None:
                peer.fallback = old.fallback
                if old.source is not None:
                    peer.source = old.source  # new keys, same peer: it sends from where it did
            peers = dict(self._peers)
            peers[peer_id] = peer
            self._publish(peers)

    def remove_peer(self, peer_id: str) -> None:
        """Forget a peer: its packets are dropped from now on. Unknown ids are ignored."""
        with self._control:
            peers = dict(self._peers)
            if peers.pop(peer_id, None) is not None:
                self._publish(peers)

    def set_vip(self, peer_id: str, vip: ipaddress.IPv4Address | str) -> None:
        """Route ``vip`` to ``peer_id`` from now on, keeping its session (keys, counters).

        Re-adding a peer with the same keys would restart its packet counter and so reuse
        AES-GCM nonces: a VIP that moves must move through here.

        :raises ValueError: if another peer holds ``vip``.
        :raises KeyError: for an unknown peer.
        """
        vip = ipaddress.IPv4Address(vip)
        with self._control:
            peer = self._peers[peer_id]
            for other in self._peers.values():
                if other is not peer and other.vip == vip:
                    raise ValueError(f"VIP {vip} already belongs to peer {other.peer_id}")
            peer.vip = vip
            peer.vip_bytes = vip.packed
            self._publish(dict(self._peers))

    def set_endpoint(self, peer_id: str, endpoint: tuple[str, int] | None) -> None:
        """Point a peer's datagrams at a new UDP address (None: use the fallback)."""
        self._peers[peer_id].endpoint = endpoint

    def has_peer(self, peer_id: str) -> bool:
        """True if ``peer_id`` has a session in the data plane."""
        return peer_id in self._peers

    def peer_ids(self) -> list[str]:
        """The ids of every peer with a session."""
        return list(self._peers)

    def vip_of(self, peer_id: str) -> ipaddress.IPv4Address | None:
        """The VIP routed to ``peer_id`` (None for an unknown peer)."""
        peer = self._peers.get(peer_id)
        return peer.vip if peer else None

    def endpoint_of(self, peer_id: str) -> tuple[str, int] | None:
        """The UDP address datagrams to ``peer_id`` go to now (None: the fallback, or unknown)."""
        peer = self._peers.get(peer_id)
        return peer.endpoint if peer else None

    def source_of(self, peer_id: str) -> tuple[str, int] | None:
        """The UDP endpoint whose datagrams under ``peer_id``'s key id are opened without a
        roaming token: where its last authentic datagram came from (None: unknown peer, or none
        yet and no endpoint given)."""
        peer = self._peers.get(peer_id)
        return peer.source if peer else None

    def last_heard(self, peer_id: str) -> float | None:
        """``time.monotonic()`` of the last authentic datagram from ``peer_id``, by UDP or stream."""
        peer = self._peers.get(peer_id)
        return peer.heard if peer else None

    def udp_heard(self, peer_id: str) -> float | None:
        """``time.monotonic()`` of the last authentic datagram from ``peer_id`` over UDP."""
        peer = self._peers.get(peer_id)
        return peer.udp_heard if peer else None

    def set_fallback(self, peer_id: str, send: Callable[[bytes], object] | None) -> None:
        """Send a peer's datagrams through ``send`` while it has no UDP endpoint.

        ``send`` is called from a forwarding thread with one sealed datagram at a time; it must not
        block for long (queue the bytes to a stream writer).
        """
        self._peers[peer_id].fallback = send

    def inject_from_fallback(self, peer_id: str, datagram: bytes) -> bool:
        """Process a datagram that ``peer_id`` sent over the fallback stream; True if delivered.

        The datagram must open under ``peer_id``'s keys: a stream cannot speak for another peer.
        """
        return self.inject_batch_from_fallback(peer_id, (datagram,)) > 0

    def inject_batch_from_fallback(self, peer_id: str, datagrams: Iterable[bytes]) -> int:
        """Process datagrams ``peer_id`` sent over the fallback stream; return how many were delivered.

        One lock and one coalescer flush for the whole batch. Such datagrams move
        :meth:`last_heard` but never :meth:`udp_heard`.
        """
        peer = self._peers.get(peer_id)
        if peer is None:
            self._counters.drop_unknown_peer += 1
            return 0
        with self._rx_lock:
            before = self._counters.rx_packets
            for datagram in datagrams:
                try:
                    self._open_datagram(memoryview(datagram), None, expected=peer)
                except Exception:  # a bug must not reach the stream reader
                    self._counters.drop_malformed += 1
                    self._log_once("tunvpn: datagram dropped", exc_info=True)
            if self._coalescer is not None:
                self._coalescer.flush()
            return self._counters.rx_packets - before

    def _publish(self, peers: dict[str, Peer]) -> None:
        # the threads only read these maps; replacing them whole keeps every read consistent
        self._by_vip = {p.vip_bytes: p for p in peers.values()}
        self._by_key_id = {p.receive.key_id: p for p in peers.values()}
        self._routed = [(net, p) for p in peers.values() for net in p.networks]
        self._peers = peers

    # ----- lifecycle -----------------------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        """A snapshot of all counters (see :data:`COUNTER_NAMES`), and ``fastpath``: 1 when the
        per-packet loops run in C, 0 on the pure-Python path."""
        snapshot = self._counters.snapshot()
        if self._coalescer is not None:
            snapshot["coalesced_frames"] = self._coalescer.frames
            snapshot["coalesced_packets"] = self._coalescer.merged
        snapshot["fastpath"] = int(self.fastpath)
        return snapshot

    def start(self) -> None:
        """Start one thread per TUN queue; the first also receives from the UDP socket."""
        if self._running:
            return
        self._running = True
        for fd in self.tun.queues:
            os.set_blocking(fd, False)
        for index, fd in enumerate(self.tun.queues):
            self._threads.append(threading.Thread(
                target=self._run_queue, args=(fd, index == 0), name=f"tunvpn-{index}", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop the threads and close the UDP socket (the TUN device stays open)."""
        self._running = False
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        self._sock.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _log_once(self, message: str, exc_info: bool = False) -> None:
        """Log ``message`` the first time it (and the exception being handled) occurs.

        What goes wrong per packet goes wrong 100,000 times a second: the counters say how often,
        the log says once what it was.
        """
        error = sys.exc_info()[1] if exc_info else None
        key = (message, type(error).__name__, str(error)[:80]) if error is not None else (message,)
        if key in self._logged or len(self._logged) > 256:
            return
        self._logged.add(key)
        log.warning("%s (logged once; see the counters for how often)", message, exc_info=exc_info)

    def __enter__(self) -> "DataPlane":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----- sending: TUN → UDP --------------------------------------------------------------------

    def _route(self, destination: bytes) -> Peer | None:
        peer = self._by_vip.get(destination)
        if peer is None and self._routed:
            address = ipaddress.IPv4Address(destination)
            for network, candidate in self._routed:
                if address in network:
                    return candidate
        return peer

    def _run_queue(self, fd: int, receive: bool) -> None:
        """Forward until stopped: TUN queue ``fd`` → UDP, and UDP → TUN if ``receive``.

        Each turn tries one TUN read and one UDP receive without blocking, and sleeps in ``poll``
        only when neither had anything.
        """
        buf = bytearray(VNET_HDR_LEN + 65536 + 64)
        view = memoryview(buf)
        # a full train plus one more packet written behind it before the train is sent
        out = bytearray(MAX_UDP_PAYLOAD + HEADER_BYTES + 65536 + TAG_BYTES)
        out_view = memoryview(out)
        seal_views: dict[int, list[SealSlot]] = {}
        rbuf = bytearray(65536 + 64)
        rview = memoryview(rbuf)
        open_views: OpenViews = {}
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        if receive:
            poller.register(self._sock.fileno(), select.POLLIN)
        skip = VNET_HDR_LEN if self.tun.vnet_hdr else 0
        counters = self._counters
        readv = os.readv
        recvmsg_into = self._sock.recvmsg_into
        cmsg_space = _GRO_CMSG_SPACE if self.udp_gro else 0
        while self._running:
            busy = False
            try:
                n = readv(fd, [view])
            except BlockingIOError:
                pass
            except OSError as error:
                if error.errno in (errno.EBADF, errno.EBADFD):
                    return
                counters.tun_errors += 1
            else:
                busy = True
                counters.tun_reads += 1
                try:
                    self._forward(buf, view, n, skip, out, out_view, seal_views)
                except MalformedFrame:
                    counters.drop_malformed += 1
                except Exception:  # a bug must not kill the forwarder: count and log
                    counters.drop_malformed += 1
                    self._log_once("tunvpn: frame dropped", exc_info=True)
            if receive:
                try:
                    n, ancillary, _flags, address = recvmsg_into([rview], cmsg_space)
                except BlockingIOError:
                    pass
                except OSError as error:
                    if error.errno == errno.EBADF:
                        return
                    counters.recv_errors += 1  # e.g. ECONNREFUSED from an earlier ICMP error
                    busy = True
                else:
                    busy = True
                    self._receive(rview, n, ancillary, address, open_views)
            if not busy:
                poller.poll(_POLL_IDLE_MS)

    def _forward(
        self, buf: bytearray, view: memoryview, n: int, skip: int, out: bytearray, out_view: memoryview,
        seal_views: dict[int, list[SealSlot]],
    ) -> None:
        counters = self._counters
        if n < skip + 20:
            counters.drop_malformed += 1
            return
        if skip:
            flags, gso_type, _, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(buf)
        else:
            flags = gso_type = gso_size = csum_start = csum_offset = 0
        if buf[skip] >> 4 != 4:
            counters.drop_no_route += 1  # the VPN carries IPv4 VIPs only
            return
        peer = self._route(bytes(buf[skip + 16 : skip + 20]))
        if peer is None:
            counters.drop_no_route += 1
            return
        packet = view[skip:n]
        if not flags & NEEDS_CSUM:
            csum_start = csum_offset = 0
        gso_type &= ~GSO_ECN
        if gso_type == GSO_NONE:
            self._seal_one(peer, packet, csum_start, csum_offset, out_view)
            return
        if gso_type == GSO_TCPV4:
            frame = TsoFrame(packet, gso_size, csum_start or l4_offset(packet), bool(csum_start))
            if frame.linear and frame.count > 2:
                self._seal_tso(peer, frame, csum_start, csum_offset, out, out_view, seal_views)
                return
            count, write_segment = frame.count, frame.write_segment
        else:
            counters.drop_unsupported += 1
            return
        self._seal_and_send(peer, count, write_segment, csum_start, csum_offset, out, out_view)

    def _seal_one(self, peer: Peer, packet: memoryview, csum_start: int, csum_offset: int, out_view: memoryview) -> None:
        """Seal and send one packet (the latency path: pings, ACKs, small requests).

        The packet is sealed straight from the TUN read buffer into the datagram, without a copy.
        """
        counters = self._counters
        send = peer.send
        epoch, aead, counter, rekeyed, _ = send.reserve(1)
        if rekeyed:
            counters.rekeys += 1
        length = len(packet)
        size = length + OVERHEAD
        WIRE_HEADER.pack_into(out_view, 0, KIND_DATA, epoch & 0xFF, csum_start, csum_offset, send.key_id, counter)
        aead.encrypt_into(out_view[4:HEADER_BYTES], packet, out_view[:HEADER_BYTES], out_view[HEADER_BYTES:size])
        counters.tx_packets += 1
        counters.tx_bytes += length
        self._send_train(peer, out_view, size, size, 1)

    def _seal_and_send(
        self,
        peer: Peer,
        count: int,
        write_segment: Callable[[bytearray, int, int], int],
        csum_start: int,
        csum_offset: int,
        out: bytearray,
        out_view: memoryview,
    ) -> None:
        """Write, seal and send ``count`` inner packets, as few GSO trains as the limits allow."""
        counters = self._counters
        send = peer.send
        epoch, aead, counter, rekeyed, _ = send.reserve(count)
        if rekeyed:
            counters.rekeys += 1
        epoch &= 0xFF
        key_id = send.key_id
        encrypt_into = aead.encrypt_into
        pack_header = WIRE_HEADER.pack_into
        gso = self.udp_gso
        offset = 0
        train = 0
        train_size = 0
        short = False
        tx_bytes = 0
        for index in range(count):
            start = offset + HEADER_BYTES
            length = write_segment(out, start, index)
            size = length + OVERHEAD
            if train and (
                not gso or size > train_size or short or offset + size > MAX_UDP_PAYLOAD or train >= MAX_GSO_SEGMENTS
            ):
                # the packet is already written past the train: send the train, then move it down
                self._send_train(peer, out_view, offset, train_size, train)
                out[HEADER_BYTES : HEADER_BYTES + length] = out_view[start : start + length]
                offset, train, short, start = 0, 0, False, HEADER_BYTES
            if not train:
                train_size = size
            elif size < train_size:
                short = True  # a shorter datagram may only end a GSO train
            pack_header(out, offset, KIND_DATA, epoch, csum_start, csum_offset, key_id, counter)
            # nonce = key id + counter: the header's last 12 bytes, unique per key
            encrypt_into(
                out_view[offset + 4 : start],
                out_view[start : start + length],
                out_view[offset:start],
                out_view[start : start + length + TAG_BYTES],
            )
            counter += 1
            offset += size
            train += 1
            tx_bytes += length
        counters.tx_packets += count
        counters.tx_bytes += tx_bytes
        if train:
            self._send_train(peer, out_view, offset, train_size, train)

    def _seal_tso(
        self, peer: Peer, frame: TsoFrame, csum_start: int, csum_offset: int, out: bytearray, out_view: memoryview,
        seal_views: dict[int, list[SealSlot]],
    ) -> None:
        """:meth:`_seal_and_send` for a TSO frame whose middle segments' headers advance linearly.

        Each segment's wire header and IP+TCP headers are one big-endian integer that grows by a
        constant step from segment to segment (counter +1, IP id +1, IP checksum -1, sequence
        number +gso_size): one ``to_bytes`` writes them all, and the views passed to
        ``encrypt_into`` at each train position are made once per datagram size.
        """
        counters = self._counters
        send = peer.send
        count = frame.count
        epoch, aead, first_counter, rekeyed, fast = send.reserve(count)
        if rekeyed:
            counters.rekeys += 1
        header_len = frame.header_len
        gso_size = frame.gso_size
        bits = 8 * header_len
        headers_size = HEADER_BYTES + header_len
        size = headers_size + gso_size + TAG_BYTES
        per_train = min(MAX_GSO_SEGMENTS, MAX_UDP_PAYLOAD // size) if self.udp_gso else 1
        views = seal_views.get(size)
        if views is None or len(views) < per_train:
            if len(seal_views) > 16:
                seal_views.clear()  # MSS changes are rare; keep the cache small anyway
            views = seal_views[size] = _seal_views(out_view, size, header_len + gso_size, MAX_GSO_SEGMENTS)
        wire = (
            (KIND_DATA << 120 | (epoch & 0xFF) << 112 | csum_start << 104 | csum_offset << 96
             | send.key_id << 64 | first_counter) << bits
        )
        step = (1 << bits) + frame.step
        step_bytes = step.to_bytes(headers_size, "big") if fast is not None else b""
        encrypt_into = aead.encrypt_into
        payload = frame.payload
        last = count - 1
        index = 0
        while index < count:
            end = min(index + per_train, count)
            full_end = min(end, last)  # segments [index, full_end) carry gso_size bytes
            position = 0
            start = index * gso_size
            if index == 0:
                out[:headers_size] = (wire + int.from_bytes(frame.headers(0), "big")).to_bytes(headers_size, "big")
                out[headers_size:size - TAG_BYTES] = payload[:gso_size]
                encrypt_into(*views[0])
                index = position = 1
                start = gso_size
            if index < full_end:
                headers = (index << bits) + wire + int.from_bytes(frame.headers(index), "big")
                offset = position * size
                if fast is not None:  # the same loop in C
                    fast.seal_run(out, offset, size, full_end - index, headers.to_bytes(headers_size, "big"),
                                  step_bytes, payload, start, gso_size)
                    start += (full_end - index) * gso_size
                else:
                    for views_at in views[position : position + full_end - index]:
                        out[offset : offset + headers_size] = headers.to_bytes(headers_size, "big")
                        out[offset + headers_size : offset + size - TAG_BYTES] = payload[start : start + gso_size]
                        encrypt_into(*views_at)
                        headers += step
                        offset += size
                        start += gso_size
                position += full_end - index
                index = full_end
            length = position * size
            if end == count:
                offset = length
                last_size = frame.last_size
                body = offset + headers_size
                stop = body + last_size
                out[offset:body] = ((last << bits) + wire + int.from_bytes(frame.headers(last), "big")).to_bytes(
                    headers_size, "big")
                out[body:stop] = payload[start : start + last_size]
                inner = out_view[offset + HEADER_BYTES : stop]
                encrypt_into(out_view[offset + 4 : offset + HEADER_BYTES], inner, out_view[offset : offset + HEADER_BYTES],
                             out_view[offset + HEADER_BYTES : stop + TAG_BYTES])
                position += 1
                index = count
                length = stop + TAG_BYTES
            self._send_train(peer, out_view, length, size, position)
        counters.tx_packets += count
        counters.tx_bytes += len(frame.packet) + (count - 1) * header_len

    def _send_train(self, peer: Peer, out_view: memoryview, length: int, size: int, count: int) -> None:
        counters = self._counters
        endpoint = peer.endpoint
        if endpoint is None:
            fallback = peer.fallback
            if fallback is None:
                counters.drop_no_endpoint += count
                return
            for start in range(0, length, size):
                try:
                    fallback(bytes(out_view[start : min(start + size, length)]))
                except Exception:
                    counters.send_errors += 1
            return
        data = out_view[:length]
        ancillary = [(socket.SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(size))] if count > 1 else []
        for _attempt in range(20):
            try:
                self._sock.sendmsg([data], ancillary, 0, endpoint)
                counters.tx_sends += 1
                return
            except BlockingIOError:  # send buffer full: wait for room rather than drop
                select.select([], [self._sock], [], 0.05)
            except OSError as error:
                counters.send_errors += 1
                if error.errno not in _TRANSIENT_SEND_ERRORS:
                    self._log_once(f"tunvpn: send to {endpoint} failed: {error}")
                return
        counters.send_errors += 1

    # ----- receiving: UDP → TUN ------------------------------------------------------------------

    def _receive(self, rview: memoryview, n: int, ancillary: list[tuple[int, int, bytes]], address: tuple[str, int],
                 open_views: OpenViews) -> None:
        """Open what one ``recvmsg`` returned (a GRO train, or one datagram) and write it to the TUN."""
        counters = self._counters
        size = n
        for level, kind, data in ancillary:
            if level == socket.SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                size = _GRO_SIZE.unpack_from(data)[0]
        if size <= 0:
            size = n
        counters.rx_batches += 1
        with self._rx_lock:
            try:
                self._open_train(rview, n, size, address, open_views)
                if self._coalescer is not None:
                    self._coalescer.flush()
            except Exception:
                counters.drop_malformed += 1
                self._log_once("tunvpn: datagram dropped", exc_info=True)

    def _open_train(
        self, view: memoryview, n: int, size: int, address: tuple[str, int],
        open_views: OpenViews | None = None,
    ) -> None:
        """Open a GRO train: datagrams of ``size`` bytes (the last may be shorter) from one sender.

        Fast path for the common case — every datagram of the train under the same key id and
        epoch, authentic, from the peer's own VIP — with the per-train lookups done once, the
        replay window kept in local variables and the ``decrypt_into`` views of each train
        position made once per datagram size (in ``open_views``, for ``view``); any datagram that
        leaves it goes through :meth:`_open_datagram`, which counts the reason.
        """
        coalescer = self._coalescer
        if n <= 0:
            self._counters.drop_malformed += 1  # an empty datagram: nothing to open, no train to cut
            return
        if size <= 0:
            size = n  # no usable GRO segment size: one datagram
        if n >= HEADER_BYTES:
            # the pre-check before any AES-GCM open, once per train: a GRO train has one source
            peer = self._by_key_id.get(_KEY_ID.unpack_from(view, 4)[0])
            if peer is not None and address != peer.source:
                if not self._may_roam(address):
                    self._counters.drop_roam_limited += (n + size - 1) // size
                    return
                # one by one: the first that authenticates moves the session here and the others
                # then pass; until one does, each needs a token of its own
                self._open_datagram(view[: min(size, n)], address, prechecked=True)
                for start in range(size, n, size):
                    self._open_datagram(view[start : min(start + size, n)], address)
                return
        if n < OVERHEAD + 20 or size >= n or size < OVERHEAD + 20 or coalescer is None:
            for start in range(0, n, size):
                self._open_datagram(view[start : min(start + size, n)], address)
            return
        kind, epoch_byte, csum_start, csum_offset, key_id, _ = WIRE_HEADER.unpack_from(view)
        peer = self._by_key_id.get(key_id)
        epoch = peer.receive.epoch_for(epoch_byte) if peer is not None and kind == KIND_DATA else None
        if epoch is None or peer is None or peer.endpoint is None or (csum_start and csum_start + csum_offset + 22 > size):
            for start in range(0, n, size):
                self._open_datagram(view[start : min(start + size, n)], address)
            return
        prefix = _WIRE_WORDS.unpack_from(view)[0]  # kind, epoch, checksum offsets, key id
        full = n // size
        if open_views is None:
            open_views = {}
        views = open_views.get(size)
        if views is None or len(views) < full:
            if len(open_views) > 16:
                open_views.clear()
            views = open_views[size] = _open_views(view, self._rx_view, size, len(view) // size)
        slots = views[:full]
        tail = n - full * size
        if tail >= OVERHEAD + 20:
            slots.append(_open_views(view[full * size : n], self._rx_view, tail, 1)[0])
        window = epoch.window
        highest, bits, window_size = window.highest, window.bits, window.size
        decrypt_into = epoch.aead.decrypt_into
        vip = peer.vip_bytes
        buf = self._rx_buf
        push = coalescer.push
        counters = self._counters
        unpack_words = _WIRE_WORDS.unpack_from
        base = VNET_HDR_LEN
        delivered = 0
        delivered_bytes = 0
        authentic = False
        fast = epoch.fast
        if fast is not None:
            # the datagrams in order under one key, opened in place by C; the loop below takes
            # over at the first one that is not (another peer or epoch, a replay, a late one)
            status, last, run = fast.open_run(view, full, size, view[:8], highest, vip or b"\0\0\0\0")
            if run:
                run_bits = int.from_bytes(run, "little")
                shift = last - highest
                bits = bits << shift | run_bits if shift < window_size else run_bits
                highest = last
                authentic = True
            length = size - OVERHEAD
            fast_views = open_views.get(-size)
            if fast_views is None or len(fast_views) < full:
                fast_views = open_views[-size] = [
                    view[at + HEADER_BYTES - base : at + HEADER_BYTES + length] for at in range(0, len(view) - size + 1, size)]
            append_run = coalescer.append_run
            index, handled = 0, len(status)
            while index < handled:
                code = status[index]
                if code == 0:
                    # the segments that continue the pending TCP frame are appended by C too
                    zeros = handled - index - len(status[index:].lstrip(b"\0"))
                    taken = append_run(view, index * size + HEADER_BYTES, size, zeros, length, csum_start, csum_offset)
                    if taken:
                        delivered += taken
                        delivered_bytes += taken * length
                        index += taken
                        continue
                packet = fast_views[index]
                if code == 0 or (code == 2 and packet[base] >> 4 == 4
                                 and peer.owns_source(bytes(packet[base + 12 : base + 16]))):
                    delivered += 1
                    delivered_bytes += length
                    push(packet, length, csum_start, csum_offset)
                elif code == 1:
                    counters.drop_bad_tag += 1
                else:
                    counters.drop_spoofed_source += 1
                index += 1
            slots = slots[handled:]
        for datagram, nonce, sealed, header, inner, length in slots:
            head, counter = unpack_words(header)
            if head != prefix or (
                counter <= highest
                and (highest - counter >= window_size or (bits >> (highest - counter)) & 1)
            ):
                # not the train's peer and epoch, or a replay: the slow path counts why
                window.highest, window.bits = highest, bits & window.mask
                self._open_datagram(datagram, address)
                highest, bits = window.highest, window.bits
                continue
            try:
                decrypt_into(nonce, sealed, header, inner)
            except InvalidTag:
                counters.drop_bad_tag += 1
                continue
            # ReplayWindow.update on locals; bits above the mask are cut once, after the train
            if counter > highest:
                shift = counter - highest
                bits = bits << shift | 1 if shift < window_size else 1
                highest = counter
            else:
                bits |= 1 << (highest - counter)
            authentic = True
            # the version nibble first: bytes 12..15 are a source address only in an IPv4 packet
            if buf[base] >> 4 != 4 or (
                buf[base + 12 : base + 16] != vip and not peer.owns_source(bytes(buf[base + 12 : base + 16]))
            ):
                counters.drop_spoofed_source += 1
                continue
            delivered += 1
            delivered_bytes += length
            push(buf, length, csum_start, csum_offset)
        window.highest, window.bits = highest, bits & window.mask
        if authentic:
            peer.receive.confirm(epoch)
            peer.heard = peer.udp_heard = time.monotonic()
        counters.rx_packets += delivered
        counters.rx_bytes += delivered_bytes
        if 0 < tail < OVERHEAD + 20:
            self._open_datagram(view[full * size : n], address)  # too short: counted there

    def _may_roam(self, address: tuple[str, int]) -> bool:
        """True if a datagram from ``address``, not its session's endpoint, may be opened."""
        if self.roam_limiter.allow(address):
            self._counters.roam_opens += 1
            return True
        return False

    def _open_datagram(self, datagram: memoryview, address: tuple[str, int] | None, expected: Peer | None = None,
                       prechecked: bool = False) -> None:
        """Open one datagram and deliver it; ``address`` is its UDP source (None: it came over
        the fallback stream of ``expected``); ``prechecked``: its roaming token is taken."""
        counters = self._counters
        length = len(datagram) - OVERHEAD
        if length < 20:
            counters.drop_malformed += 1
            return
        kind, epoch_byte, csum_start, csum_offset, key_id, counter = WIRE_HEADER.unpack_from(datagram)
        if kind != KIND_DATA:
            counters.drop_malformed += 1
            return
        peer = self._by_key_id.get(key_id)
        if peer is None or (expected is not None and peer is not expected):
            counters.drop_unknown_peer += 1
            return
        receive = peer.receive
        epoch = receive.epoch_for(epoch_byte)
        if epoch is None:
            counters.drop_stale_epoch += 1
            return
        window = epoch.window
        if not window.check(counter):
            counters.drop_replay += 1
            return
        # the last check before the costly open: what it lets through from other endpoints is budgeted
        if address is not None and address != peer.source and not prechecked and not self._may_roam(address):
            counters.drop_roam_limited += 1
            return
        buf = self._rx_buf
        base = VNET_HDR_LEN
        try:
            epoch.aead.decrypt_into(
                datagram[4:HEADER_BYTES],
                datagram[HEADER_BYTES:],
                datagram[:HEADER_BYTES],
                self._rx_view[base : base + length],
            )
        except InvalidTag:
            counters.drop_bad_tag += 1
            return
        window.update(counter)
        receive.confirm(epoch)
        peer.heard = time.monotonic()
        if address is not None:
            peer.udp_heard = peer.heard
            if address != peer.source:
                peer.source = address  # roaming: the session follows its authentic datagrams
                counters.roams += 1
        if buf[base] >> 4 != 4 or not peer.owns_source(bytes(buf[base + 12 : base + 16])):
            counters.drop_spoofed_source += 1
            return
        if csum_start and csum_start + csum_offset + 2 > length:
            counters.drop_malformed += 1
            return
        if address is not None and peer.endpoint is None:
            peer.endpoint = address  # learned from an authentic datagram
        counters.rx_packets += 1
        counters.rx_bytes += length
        if self._coalescer is not None:
            self._coalescer.push(buf, length, csum_start, csum_offset)
        elif self.tun.vnet_hdr:
            VNET_HDR.pack_into(buf, 0, NEEDS_CSUM if csum_start else 0, GSO_NONE, 0, 0, csum_start, csum_offset)
            self._write_tun(self._rx_view[: base + length])
        else:
            if csum_start:
                complete_checksum(self._rx_view[base : base + length], csum_start, csum_offset)
            self._write_tun(self._rx_view[base : base + length])

    def _write_tun(self, frame: memoryview) -> None:
        try:
            os.write(self.tun.fd, frame)
            self._counters.tun_writes += 1
        except OSError:
            self._counters.tun_errors += 1
