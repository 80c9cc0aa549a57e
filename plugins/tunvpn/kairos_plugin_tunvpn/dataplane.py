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

The data plane is split by concern: :mod:`.wire` (the datagram format), :mod:`.peertable` (who is
where), :mod:`.sendpath` (TUN → UDP), :mod:`.receivepath` (UDP → TUN); this module holds the
socket, the threads and their loop. Everything wrong is dropped and counted in
:attr:`DataPlane.counters`; nothing a peer sends can stop a thread.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import sys
import threading

from . import fastpath
from .counters import COUNTER_NAMES, Counters
from .crypto import REKEY_AFTER_PACKETS, REKEY_AFTER_SECONDS, TAG_BYTES
from .peertable import Peer
from .receivepath import GRO_CMSG_SPACE, UDP_GRO, ReceivePath
from .roaming import RoamLimiter
from .sendpath import MAX_GSO_SEGMENTS, UDP_SEGMENT, SendPath
from .tun import TunDevice
from .vnet import VNET_HDR_LEN, MalformedFrame, TcpCoalescer
from .wire import HEADER_BYTES, KIND_DATA, MAX_UDP_PAYLOAD, OVERHEAD, WIRE_HEADER, OpenViews, SealSlot

# The names other modules and tests have imported from here since before the split.
__all__ = [
    "COUNTER_NAMES",
    "Counters",
    "DataPlane",
    "HEADER_BYTES",
    "KIND_DATA",
    "MAX_GSO_SEGMENTS",
    "MAX_UDP_PAYLOAD",
    "OVERHEAD",
    "Peer",
    "UDP_GRO",
    "UDP_SEGMENT",
    "WIRE_HEADER",
]

log = logging.getLogger(__name__)

SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
_POLL_IDLE_MS = 500


class DataPlane(SendPath, ReceivePath):
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
        super().__init__(rekey_after_packets, rekey_after_seconds)  # the peer table
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
        self._rx_lock = threading.Lock()  # receive state is shared by the receiving thread and injections
        self._rx_buf = bytearray(VNET_HDR_LEN + 65536 + 64)
        self._rx_view = memoryview(self._rx_buf)
        self._coalescer = TcpCoalescer(self._write_tun) if self.coalesce else None
        self._threads: list[threading.Thread] = []
        self._logged: set[tuple[str, ...]] = set()
        self.fastpath = fastpath.enabled()  # the C loops: built, and not turned off
        self._running = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

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
            self._threads.append(
                threading.Thread(target=self._run_queue, args=(fd, index == 0), name=f"tunvpn-{index}", daemon=True)
            )
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

    # ----- the forwarding loop: one thread per TUN queue ------------------------------------------
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
        cmsg_space = GRO_CMSG_SPACE if self.udp_gro else 0
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
