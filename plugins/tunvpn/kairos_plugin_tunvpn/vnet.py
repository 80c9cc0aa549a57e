"""virtio-net headers, TSO super-frame splitting and receive-side TCP coalescing.

With ``IFF_VNET_HDR`` every TUN read and write starts with a 10-byte little-endian header
(``flags, gso_type, hdr_len, gso_size, csum_start, csum_offset``). A read may hold a TSO
*super-frame*: one TCP packet of up to 64 KB that the kernel expects us to cut into ``gso_size``
segments. Sealing the super-frame whole would make one lost wire datagram cost ~46 inner packets,
so :func:`split_tso` cuts it into real, independent TCP/IP packets before sealing, and
:class:`TcpCoalescer` glues consecutive ones back into a super-frame on the receiving side, so the
TUN sees one write per burst instead of one per packet.

Checksums: a frame read with ``NEEDS_CSUM`` carries only the pseudo-header sum in its L4 checksum
field (the kernel finishes it later). Segments keep that *partial* form (their pseudo-header sum is
recomputed for their own length) and travel with their ``csum_start/csum_offset``; the receiver
writes them to its TUN with ``NEEDS_CSUM`` again, so no payload byte is ever summed in Python.
:func:`complete_checksum` finishes a partial checksum where a full one is needed.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from . import fastpath

VNET_HDR = struct.Struct("<BBHHHH")
VNET_HDR_LEN = VNET_HDR.size
NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80

TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_CWR = 0x80
IPPROTO_TCP = 6
IPPROTO_UDP = 17
TCP_CSUM_OFFSET = 16
UDP_CSUM_OFFSET = 6

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
# IPv4 bytes 4..11: id, flags+fragment offset, TTL, protocol, header checksum
_IP_ID_TO_CSUM = struct.Struct("!HHBBH")
# IPv4 header without options + TCP header up to the window
_IPV4_TCP = struct.Struct("!BBHHHBBH12sIIBBH")
# Kernel TSO frames stay below 64 KB; a coalesced frame must also fit IPv4's 16-bit total length.
MAX_COALESCED = 65000
# (offset, width) of the IPv4+TCP header fields in which consecutive segments of one flow may
# differ and still merge: total length, id, header checksum, TCP checksum, urgent pointer
_MERGE_VARIES = ((2, 2), (4, 2), (10, 2), (36, 2), (38, 2))


class MalformedFrame(ValueError):
    """A frame's headers are inconsistent (too short, wrong offsets, unsupported GSO type)."""


def fold(total: int) -> int:
    """Fold an integer sum of 16-bit words into a one's-complement 16-bit sum (0 stays 0)."""
    folded = total % 0xFFFF
    return 0xFFFF if folded == 0 and total else folded


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The folded one's-complement sum of ``data`` as big-endian 16-bit words.

    ``2**16 ≡ 1 (mod 0xFFFF)``, so the big integer of the bytes is congruent to the sum of its
    words: one C-level conversion instead of a Python loop over words.
    """
    if len(data) & 1:
        data = bytes(data) + b"\0"
    return fold(int.from_bytes(data, "big"))


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 checksum of ``data``."""
    return ~ones_sum(data) & 0xFFFF


def pseudo_header_sum(packet: bytes | bytearray | memoryview, l4_length: int, protocol: int) -> int:
    """Folded sum of the IPv4/IPv6 pseudo-header of ``packet`` for an L4 segment of ``l4_length``."""
    if packet[0] >> 4 == 4:
        return fold(ones_sum(packet[12:20]) + protocol + l4_length)
    return fold(ones_sum(packet[8:40]) + protocol + l4_length)


def complete_checksum(packet: bytearray | memoryview, csum_start: int, csum_offset: int) -> None:
    """Finish a partial (pseudo-header only) L4 checksum in place, as the kernel would."""
    field = csum_start + csum_offset
    if field + 2 > len(packet):
        raise MalformedFrame(f"checksum field at {field} beyond a {len(packet)}-byte packet")
    checksum = internet_checksum(packet[csum_start:])
    if checksum == 0 and csum_offset == UDP_CSUM_OFFSET:
        checksum = 0xFFFF  # 0 means "no checksum" in UDP
    _U16.pack_into(packet, field, checksum)


def l4_offset(packet: bytes | bytearray | memoryview) -> int:
    """Offset of the L4 header of an IPv4 packet or an IPv6 packet without extension headers."""
    version = packet[0] >> 4
    if version == 4:
        return (packet[0] & 0x0F) * 4
    if version == 6:
        return 40
    raise MalformedFrame(f"IP version {version}")


class TsoFrame:
    """A TCP super-frame ready to be cut into independent TCP/IP packets of ``gso_size`` payload.

    :meth:`write_segment` writes segment ``index`` straight into the caller's buffer (the send
    buffer, where it is then sealed in place), so a segment costs two slice copies and two
    ``struct`` calls. Each segment gets its own IP total length, IP id (incrementing, as kernel
    GSO does) and header checksum, TCP sequence number, flags (FIN/PSH only on the last, CWR only
    on the first) and TCP checksum: partial (pseudo-header) if ``partial``, else complete.
    """

    def __init__(self, packet: memoryview, gso_size: int, tcp_offset: int, partial: bool) -> None:
        if gso_size <= 0 or tcp_offset + 20 > len(packet):
            raise MalformedFrame("TSO frame too short or without a segment size")
        header_len = tcp_offset + (packet[tcp_offset + 12] >> 4) * 4
        if header_len >= len(packet):
            raise MalformedFrame("TCP header reaches the end of the frame")
        version = packet[0] >> 4
        if version == 4:
            if tcp_offset != (packet[0] & 0x0F) * 4:
                raise MalformedFrame("TCP offset is not the IPv4 header length")
            address_sum = ones_sum(packet[12:20])
        elif version == 6:
            address_sum = ones_sum(packet[8:40])
        else:
            raise MalformedFrame(f"IP version {version}")
        self.packet = packet
        self.version = version
        self.gso_size = gso_size
        self.tcp_offset = tcp_offset
        self.header_len = header_len
        self.partial = partial
        self.payload = packet[header_len:]
        total = len(self.payload)
        self.count = (total + gso_size - 1) // gso_size
        self.last_size = total - (self.count - 1) * gso_size
        self._seq0 = _U32.unpack_from(packet, tcp_offset + 4)[0]
        self._ip_id0 = _U16.unpack_from(packet, 4)[0] if version == 4 else 0
        self._ip_tail = _IP_ID_TO_CSUM.unpack_from(packet, 4)[1:4] if version == 4 else ()
        self._pseudo_base = address_sum + IPPROTO_TCP + header_len - tcp_offset
        flags = packet[tcp_offset + 13]
        single = self.count == 1
        self._templates = {
            "first": self._template(gso_size, flags & ~(TCP_FIN | TCP_PSH)),
            "middle": self._template(gso_size, flags & ~(TCP_FIN | TCP_PSH | TCP_CWR)),
            "last": self._template(self.last_size, flags if single else flags & ~TCP_CWR),
        }
        self.step, self.linear = self._progression()

    def _progression(self) -> tuple[int, bool]:
        """How the headers of middle segments (1 ≤ index ≤ count - 2) advance, read as one
        big-endian integer: +1 IP id, -1 IP checksum, +gso_size sequence number. Linear only if
        no field wraps within the frame (else callers build every header with :meth:`headers`)."""
        bits = 8 * self.header_len
        step = self.gso_size << (bits - 8 * (self.tcp_offset + 8))
        middles = self.count - 2
        linear = self.partial and self._seq0 + middles * self.gso_size <= 0xFFFFFFFF
        if self.version == 4:
            step += (1 << (bits - 48)) - (1 << (bits - 96))
            ip_sum = self._templates["middle"][1] + self._ip_id0
            linear = (
                linear
                and self._ip_id0 + middles <= 0xFFFF
                and (middles < 1 or fold(ip_sum + middles) == fold(ip_sum + 1) + middles - 1)
            )
        return step, linear

    def headers(self, index: int) -> bytes:
        """The IP+TCP headers of segment ``index`` of a ``partial`` frame (they do not depend on
        the payload then), as :meth:`write_segment` writes them."""
        if not self.partial:
            raise ValueError("headers of a frame with complete checksums depend on the payload")
        out = bytearray(self.header_len)
        self._write_headers(out, 0, index)
        return bytes(out)

    def _template(self, size: int, flags: int) -> tuple[bytes, int]:
        """Headers for a segment of ``size`` payload bytes (id, IP csum and seq patched later)
        and the folded sum of its IPv4 header without id and checksum."""
        headers = bytearray(self.packet[: self.header_len])
        t = self.tcp_offset
        headers[t + 13] = flags
        length = self.header_len + size
        ip_sum = 0
        if self.version == 4:
            _U16.pack_into(headers, 2, length)
            headers[4:6] = headers[10:12] = b"\0\0"
            ip_sum = ones_sum(headers[:t])
        else:
            _U16.pack_into(headers, 4, length - 40)
        _U16.pack_into(headers, t + TCP_CSUM_OFFSET, fold(self._pseudo_base + size) if self.partial else 0)
        return bytes(headers), ip_sum

    def write_segment(self, out: bytearray, pos: int, index: int) -> int:
        """Write segment ``index`` (0 ≤ index < :attr:`count`) at ``out[pos:]``; return its length."""
        size = self._write_headers(out, pos, index)
        header_len = self.header_len
        end = pos + header_len + size
        start = index * self.gso_size
        out[pos + header_len : end] = self.payload[start : start + size]
        if not self.partial:
            t = self.tcp_offset
            field = pos + t + TCP_CSUM_OFFSET
            full = fold(self._pseudo_base + size + ones_sum(out[pos + t : end]))
            _U16.pack_into(out, field, ~full & 0xFFFF)
        return end - pos

    def _write_headers(self, out: bytearray, pos: int, index: int) -> int:
        """Write the headers of segment ``index`` at ``out[pos:]`` (the TCP checksum partial or
        0); return its payload size."""
        if index == self.count - 1:
            headers, ip_sum = self._templates["last"]
            size = self.last_size
        else:
            headers, ip_sum = self._templates["first" if index == 0 else "middle"]
            size = self.gso_size
        start = index * self.gso_size
        out[pos : pos + self.header_len] = headers
        t = self.tcp_offset
        _U32.pack_into(out, pos + t + 4, (self._seq0 + start) & 0xFFFFFFFF)
        if self.version == 4:
            ip_id = (self._ip_id0 + index) & 0xFFFF
            _IP_ID_TO_CSUM.pack_into(out, pos + 4, ip_id, *self._ip_tail, ~fold(ip_sum + ip_id) & 0xFFFF)
        return size


def split_tso(packet: memoryview, gso_size: int, tcp_offset: int, partial: bool) -> list[bytearray]:
    """Cut a TCP super-frame into independent TCP/IP packets (see :class:`TsoFrame`)."""
    frame = TsoFrame(packet, gso_size, tcp_offset, partial)
    segments = []
    for index in range(frame.count):
        out = bytearray(frame.header_len + gso_size)
        length = frame.write_segment(out, 0, index)
        del out[length:]
        segments.append(out)
    return segments


class TcpCoalescer:
    """Glues consecutive in-order IPv4 TCP segments of one flow into one GSO TUN write.

    Feed packets with :meth:`push` (each in a buffer with :data:`VNET_HDR_LEN` bytes of headroom
    before it, so a packet that is not merged is written from where it lies) and call
    :meth:`flush` at the end of each receive batch. Only segments that the kernel's own GRO would
    merge are merged: same addresses, ports, TOS, TTL, ACK number, window and options, plain
    ACK(+PSH on the last) flags, contiguous sequence numbers, equal sizes except a shorter last
    one, and partial checksums (``NEEDS_CSUM``), so the kernel never has to verify a payload sum.
    """

    def __init__(self, write: Callable[[memoryview], object]) -> None:
        self._write = write
        self._buf = bytearray(VNET_HDR_LEN + 65536 + 4096)
        self._view = memoryview(self._buf)
        self._end = 0  # end of the pending frame in _buf; 0 = nothing pending
        self._count = 0
        self._header_len = 0
        self._segment_size = 0
        self._next_seq = 0
        self._closed = False
        self._head: tuple[object, ...] = ()
        self._options = b""
        # the fast path of push (see there): which header bits must match, and their values
        self._mask_bits = 0
        self._mask = 0
        self._seq_shift = 0
        self._expect_base = 0
        self._expect = -1
        self.frames = 0  # TUN writes issued
        self.merged = 0  # packets that went out inside a multi-packet frame
        self._append_segments = fastpath.append_segments if fastpath.enabled() else None
        self._mask_bytes = b""  # _mask as header_len bytes, for the C loop

    def append_run(
        self, src: memoryview, first: int, stride: int, count: int, length: int, csum_start: int, csum_offset: int
    ) -> int:
        """Append in C what :meth:`push`'s fast path would, from ``count`` packets of ``length``
        bytes at ``src[first + i * stride]``; returns how many it took (0 without the C module).

        Stops at the first packet the pending frame cannot take: the caller pushes that one.
        """
        expect = self._expect
        if self._append_segments is None or not self._end or expect < 0 or csum_start != 20 or csum_offset != TCP_CSUM_OFFSET:
            return 0
        header_len = self._header_len
        taken, end, closed, next_seq = self._append_segments(
            self._buf,
            self._end,
            MAX_COALESCED + VNET_HDR_LEN,
            src,
            first,
            stride,
            count,
            length,
            header_len,
            self._segment_size,
            self._mask_bytes,
            expect.to_bytes(header_len, "big"),
            24,
        )
        if taken:
            self._end = end
            self._count += taken
            if closed:
                self._closed = True
                self._expect = -1
            else:
                self._next_seq = next_seq
                self._expect = self._expect_base | next_seq << self._seq_shift
        return taken

    def push(self, buf: bytearray, length: int, csum_start: int, csum_offset: int) -> None:
        """Add the packet at ``buf[VNET_HDR_LEN : VNET_HDR_LEN + length]``."""
        end = self._end
        if end and csum_start == 20 and csum_offset == TCP_CSUM_OFFSET:
            # the common case, the next segment of the pending flow: its headers read as one
            # integer equal the pending frame's except where segments differ by nature (IP total
            # length, id and checksum, TCP checksum, urgent pointer and PSH); the expected
            # sequence number is part of _expect, and _expect is -1 once the frame is closed
            header_len = self._header_len
            size = length - header_len
            if (
                0 < size <= self._segment_size
                and int.from_bytes(buf[VNET_HDR_LEN : VNET_HDR_LEN + header_len], "big") & self._mask == self._expect
                and end + size <= MAX_COALESCED + VNET_HDR_LEN
            ):
                self._buf[end : end + size] = buf[VNET_HDR_LEN + header_len : VNET_HDR_LEN + length]
                self._end = end + size
                self._count += 1
                if buf[VNET_HDR_LEN + 33] & TCP_PSH:
                    self._buf[VNET_HDR_LEN + 33] |= TCP_PSH
                    self._closed = True
                    self._expect = -1
                elif size < self._segment_size:
                    self._closed = True
                    self._expect = -1
                else:
                    self._next_seq = next_seq = (self._next_seq + size) & 0xFFFFFFFF
                    self._expect = self._expect_base | next_seq << self._seq_shift
                return
        self._push_any(buf, length, csum_start, csum_offset)

    def _push_any(self, buf: bytearray, length: int, csum_start: int, csum_offset: int) -> None:
        p = VNET_HDR_LEN
        if csum_start != 20 or csum_offset != TCP_CSUM_OFFSET or length <= 40:
            self.flush()
            self._write_single(buf, length, csum_start, csum_offset)
            return
        (version_ihl, tos, _total, _ip_id, fragment, ttl, protocol, _ip_csum, endpoints, seq, ack, data_offset, flags, window) = (
            _IPV4_TCP.unpack_from(buf, p)
        )
        header_len = 20 + (data_offset >> 4) * 4
        size = length - header_len
        if version_ihl != 0x45 or protocol != IPPROTO_TCP or fragment & 0x3FFF or flags & ~TCP_PSH != TCP_ACK or size <= 0:
            self.flush()
            self._write_single(buf, length, csum_start, csum_offset)
            return
        # everything kernel GRO requires to be equal: TOS, TTL, addresses, ports, ack, window, options
        head = (tos, ttl, endpoints, ack, data_offset, window)
        options = bytes(buf[p + 40 : p + header_len]) if header_len > 40 else b""
        end = self._end
        if (
            end
            and not self._closed
            and seq == self._next_seq
            and head == self._head
            and options == self._options
            and size <= self._segment_size
            and end + size - p <= MAX_COALESCED
        ):
            self._buf[end : end + size] = buf[p + header_len : p + length]
            self._end = end + size
            self._count += 1
            self._next_seq = next_seq = (seq + size) & 0xFFFFFFFF
            if flags & TCP_PSH:
                self._buf[p + 33] |= TCP_PSH
                self._closed = True
            elif size < self._segment_size:
                self._closed = True
            self._expect = -1 if self._closed else self._expect_base | next_seq << self._seq_shift
            return
        self.flush()
        self._buf[p : p + length] = buf[p : p + length]
        self._end = p + length
        self._count = 1
        self._head = head
        self._options = options
        self._header_len = header_len
        self._segment_size = size
        self._next_seq = next_seq = (seq + size) & 0xFFFFFFFF
        self._closed = bool(flags & TCP_PSH)
        bits = 8 * header_len
        if self._mask_bits != bits:
            self._mask_bits = bits
            self._mask = (
                ((1 << bits) - 1)
                ^ sum(((1 << 8 * width) - 1) << (bits - 8 * (at + width)) for at, width in _MERGE_VARIES)
                ^ TCP_PSH << (bits - 8 * 34)
            )
            self._mask_bytes = self._mask.to_bytes(header_len, "big")
            self._seq_shift = bits - 8 * 28
        self._expect_base = int.from_bytes(buf[p : p + header_len], "big") & self._mask & ~(0xFFFFFFFF << self._seq_shift)
        self._expect = -1 if self._closed else self._expect_base | next_seq << self._seq_shift

    def flush(self) -> None:
        """Write the pending frame, if any."""
        if not self._end:
            return
        end, count = self._end, self._count
        self._end = 0
        self._count = 0
        buf = self._buf
        p = VNET_HDR_LEN
        if count == 1:
            self._write_single(buf, end - p, 20, TCP_CSUM_OFFSET)
            return
        length = end - p
        _U16.pack_into(buf, p + 2, length)
        buf[p + 10] = buf[p + 11] = 0
        _U16.pack_into(buf, p + 10, internet_checksum(buf[p : p + 20]))
        # the partial TCP checksum of a GSO frame covers the pseudo-header of the whole frame
        _U16.pack_into(buf, p + 36, pseudo_header_sum(buf[p:], length - 20, IPPROTO_TCP))
        VNET_HDR.pack_into(buf, 0, NEEDS_CSUM, GSO_TCPV4, self._header_len, self._segment_size, 20, TCP_CSUM_OFFSET)
        self.frames += 1
        self.merged += count
        self._write(self._view[:end])

    def _write_single(self, buf: bytearray, length: int, csum_start: int, csum_offset: int) -> None:
        VNET_HDR.pack_into(buf, 0, NEEDS_CSUM if csum_start else 0, GSO_NONE, 0, 0, csum_start, csum_offset)
        self.frames += 1
        self._write(memoryview(buf)[: VNET_HDR_LEN + length])
