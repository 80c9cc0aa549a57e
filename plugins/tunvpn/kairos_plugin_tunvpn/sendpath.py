"""The send path, TUN → UDP: a frame read from the TUN becomes sealed datagrams to one peer.

Read a frame (a TSO super-frame with offloads), cut it into MTU-sized inner packets, look up the
peer of its destination VIP, seal every packet on its own into one reused buffer and hand the
whole train to the kernel with one UDP GSO ``sendmsg``. The middle segments of a TSO frame are
sealed in C when the ``_fastpath`` extension is built (:mod:`.fastpath`). A peer without a UDP
endpoint gets its datagrams through its fallback (the libp2p stream).

:class:`SendPath` is one half of :class:`~.dataplane.DataPlane`, which owns the socket, the
counters and the threads.
"""

from __future__ import annotations

import errno
import select
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from .counters import Counters
from .crypto import TAG_BYTES
from .peertable import Peer, PeerTable
from .vnet import GSO_ECN, GSO_NONE, GSO_TCPV4, NEEDS_CSUM, VNET_HDR, TsoFrame, l4_offset
from .wire import HEADER_BYTES, KIND_DATA, MAX_UDP_PAYLOAD, OVERHEAD, WIRE_HEADER, SealSlot, seal_slots

UDP_SEGMENT = 103  # not exported by Python 3.11's socket module
# The kernel takes up to 128 segments per GSO send; a TSO frame never makes more than ~46.
MAX_GSO_SEGMENTS = 64
_SEGMENT_SIZE = struct.Struct("=H")
_TRANSIENT_SEND_ERRORS = {
    errno.ECONNREFUSED,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EPERM,
    errno.EACCES,
    errno.ENOBUFS,
    errno.EMSGSIZE,
    errno.EINVAL,
    errno.EHOSTDOWN,
    errno.ENETDOWN,
}


def keepalive_packet(source: bytes, destination: bytes, port: int = 9) -> bytes:
    """An IPv4 packet holding an empty UDP datagram from ``source`` to ``destination``:``port``
    (the discard port: the receiving kernel drops it)."""
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0x4000, 64, socket.IPPROTO_UDP, 0, source, destination))
    total = sum(struct.unpack("!10H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    struct.pack_into("!H", header, 10, ~total & 0xFFFF)
    # UDP checksum 0: none, which IPv4 allows
    return bytes(header) + struct.pack("!HHHH", port, port, 8, 0)


class SendPath(PeerTable):
    """Sealing and sending: the methods the forwarding threads call for what they read from the TUN."""

    # set by the data plane
    _counters: Counters
    _sock: socket.socket
    udp_gso: bool

    if TYPE_CHECKING:

        def _log_once(self, message: str, exc_info: bool = False) -> None: ...

    def _forward(
        self,
        buf: bytearray,
        view: memoryview,
        n: int,
        skip: int,
        out: bytearray,
        out_view: memoryview,
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
            if train and (not gso or size > train_size or short or offset + size > MAX_UDP_PAYLOAD or train >= MAX_GSO_SEGMENTS):
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
        self,
        peer: Peer,
        frame: TsoFrame,
        csum_start: int,
        csum_offset: int,
        out: bytearray,
        out_view: memoryview,
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
            views = seal_views[size] = seal_slots(out_view, size, header_len + gso_size, MAX_GSO_SEGMENTS)
        wire = (
            KIND_DATA << 120 | (epoch & 0xFF) << 112 | csum_start << 104 | csum_offset << 96 | send.key_id << 64 | first_counter
        ) << bits
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
                out[headers_size : size - TAG_BYTES] = payload[:gso_size]
                encrypt_into(*views[0])
                index = position = 1
                start = gso_size
            if index < full_end:
                headers = (index << bits) + wire + int.from_bytes(frame.headers(index), "big")
                offset = position * size
                if fast is not None:  # the same loop in C
                    fast.seal_run(
                        out,
                        offset,
                        size,
                        full_end - index,
                        headers.to_bytes(headers_size, "big"),
                        step_bytes,
                        payload,
                        start,
                        gso_size,
                    )
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
                    headers_size, "big"
                )
                out[body:stop] = payload[start : start + last_size]
                inner = out_view[offset + HEADER_BYTES : stop]
                encrypt_into(
                    out_view[offset + 4 : offset + HEADER_BYTES],
                    inner,
                    out_view[offset : offset + HEADER_BYTES],
                    out_view[offset + HEADER_BYTES : stop + TAG_BYTES],
                )
                position += 1
                index = count
                length = stop + TAG_BYTES
            self._send_train(peer, out_view, length, size, position)
        counters.tx_packets += count
        counters.tx_bytes += len(frame.packet) + (count - 1) * header_len

    def probe(self, peer_id: str, endpoint: tuple[str, int], source_vip: bytes) -> bool:
        """Send one sealed keepalive to ``peer_id`` at ``endpoint``, whatever path its packets take.

        This is how a path that is not in use is tried (UDP to the advertised endpoint while on
        the stream, a hole punch to a reported public endpoint): an authentic datagram that arrives
        tells the peer where we are and that UDP from here gets through; its NAT mapping opens on
        our side as it leaves. The inner packet is an empty UDP datagram from ``source_vip`` to the
        peer's discard port, as the VPN's keepalives are. False for an unknown peer or a failed send.
        """
        peer = self._peers.get(peer_id)
        if peer is None:
            return False
        inner = keepalive_packet(source_vip, peer.vip_bytes)
        epoch, aead, counter, rekeyed, _ = peer.send.reserve(1)
        if rekeyed:
            self._counters.rekeys += 1
        header = WIRE_HEADER.pack(KIND_DATA, epoch & 0xFF, 0, 0, peer.send.key_id, counter)
        datagram = header + aead.encrypt(header[4:], inner, header)
        try:
            self._sock.sendto(datagram, endpoint)
        except OSError:
            self._counters.send_errors += 1
            return False
        self._counters.probes_sent += 1
        return True

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
