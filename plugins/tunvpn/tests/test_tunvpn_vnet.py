"""TSO splitting and TCP coalescing, checked by parsing the packets they produce."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_plugin_tunvpn.vnet import (
    GSO_NONE,
    GSO_TCPV4,
    NEEDS_CSUM,
    VNET_HDR,
    VNET_HDR_LEN,
    MalformedFrame,
    TcpCoalescer,
    TsoFrame,
    complete_checksum,
    split_tso,
)
from tunvpn_packets import ipv4_header_ok, ipv4_tcp, ipv6_tcp, tcp_checksum_ok

FIN, PSH, ACK, CWR = 0x01, 0x08, 0x10, 0x80
TIMESTAMPS = b"\x01\x01\x08\x0a" + struct.pack("!II", 12345, 678)


def parse_ipv4_tcp(packet: bytes) -> dict:
    ihl = (packet[0] & 15) * 4
    total, ip_id = struct.unpack_from("!HH", packet, 2)
    (seq,) = struct.unpack_from("!I", packet, ihl + 4)
    doff = (packet[ihl + 12] >> 4) * 4
    return {
        "total": total,
        "id": ip_id,
        "seq": seq,
        "flags": packet[ihl + 13],
        "payload": bytes(packet[ihl + doff :]),
        "options": bytes(packet[ihl + 20 : ihl + doff]),
    }


@settings(max_examples=60, deadline=None)
@given(
    payload=st.binary(min_size=1, max_size=9000),
    gso_size=st.integers(min_value=1, max_value=1500),
    flags=st.sampled_from([ACK, ACK | PSH, ACK | PSH | FIN, ACK | CWR | PSH]),
    seq=st.integers(min_value=0, max_value=2**32 - 1),
    partial=st.booleans(),
)
def test_split_ipv4_gives_valid_independent_segments(payload, gso_size, flags, seq, partial):
    frame = ipv4_tcp(payload, seq=seq, flags=flags, ip_id=65530, options=TIMESTAMPS, partial=partial)
    segments = split_tso(memoryview(bytes(frame)), gso_size, 20, partial)
    assert len(segments) == -(-len(payload) // gso_size)
    joined = b""
    for index, segment in enumerate(segments):
        fields = parse_ipv4_tcp(segment)
        assert fields["total"] == len(segment)
        assert fields["id"] == (65530 + index) & 0xFFFF
        assert fields["seq"] == (seq + index * gso_size) & 0xFFFFFFFF
        assert fields["options"] == TIMESTAMPS
        assert len(fields["payload"]) <= gso_size
        last = index == len(segments) - 1
        assert bool(fields["flags"] & (FIN | PSH)) == (last and bool(flags & (FIN | PSH)))
        assert bool(fields["flags"] & CWR) == (index == 0 and bool(flags & CWR))
        assert ipv4_header_ok(segment)
        if partial:  # what the receiving kernel does with NEEDS_CSUM must give a valid checksum
            complete_checksum(segment, 20, 16)
        assert tcp_checksum_ok(segment)
        joined += fields["payload"]
    assert joined == payload


@settings(max_examples=30, deadline=None)
@given(payload=st.binary(min_size=1, max_size=5000), gso_size=st.integers(min_value=100, max_value=1400))
def test_split_ipv6(payload, gso_size):
    frame = ipv6_tcp(payload, partial=True)
    segments = split_tso(memoryview(bytes(frame)), gso_size, 40, True)
    joined = b""
    for segment in segments:
        assert struct.unpack_from("!H", segment, 4)[0] == len(segment) - 40
        complete_checksum(segment, 40, 16)
        assert tcp_checksum_ok(segment)
        joined += bytes(segment[60:])
    assert joined == payload


@pytest.mark.parametrize("frame", [b"\x45" + bytes(10), ipv4_tcp(b"")])
def test_split_refuses_malformed_frames(frame):
    with pytest.raises(MalformedFrame):
        split_tso(memoryview(bytes(frame)), 1000, 20, True)


def test_split_refuses_a_tcp_offset_that_is_not_the_ip_header():
    with pytest.raises(MalformedFrame):
        split_tso(memoryview(bytes(ipv4_tcp(b"x" * 3000))), 1000, 24, True)


class Collector:
    def __init__(self):
        self.frames: list[bytes] = []

    def __call__(self, frame):
        self.frames.append(bytes(frame))


def push(coalescer: TcpCoalescer, packet: bytes, csum_start: int = 20, csum_offset: int = 16) -> None:
    buf = bytearray(VNET_HDR_LEN) + packet
    coalescer.push(buf, len(packet), csum_start, csum_offset)


@settings(max_examples=40, deadline=None)
@given(payload=st.binary(min_size=2, max_size=60000), gso_size=st.integers(min_value=500, max_value=1400))
def test_coalescer_rebuilds_one_gso_frame_from_split_segments(payload, gso_size):
    frame = ipv4_tcp(payload, seq=5, flags=ACK | PSH, options=TIMESTAMPS)
    out = Collector()
    coalescer = TcpCoalescer(out)
    for segment in split_tso(memoryview(bytes(frame)), gso_size, 20, True):
        push(coalescer, bytes(segment))
    coalescer.flush()
    assert len(out.frames) == 1
    flags, gso_type, hdr_len, size, start, offset = VNET_HDR.unpack_from(out.frames[0])
    packet = bytearray(out.frames[0][VNET_HDR_LEN:])
    fields = parse_ipv4_tcp(packet)
    assert fields["payload"] == payload and fields["seq"] == 5 and fields["total"] == len(packet)
    assert fields["flags"] == ACK | PSH
    assert ipv4_header_ok(packet)
    assert (flags, start, offset) == (NEEDS_CSUM, 20, 16)
    if len(payload) > gso_size:
        assert (gso_type, hdr_len, size) == (GSO_TCPV4, 20 + 32, gso_size)
    else:
        assert gso_type == GSO_NONE
    complete_checksum(packet, 20, 16)
    assert tcp_checksum_ok(packet)


def test_coalescer_keeps_flows_gaps_and_non_tcp_apart():
    out = Collector()
    coalescer = TcpCoalescer(out)
    push(coalescer, bytes(ipv4_tcp(b"a" * 100, seq=0, flags=ACK)))
    push(coalescer, bytes(ipv4_tcp(b"b" * 100, seq=100, flags=ACK)))  # merges
    push(coalescer, bytes(ipv4_tcp(b"c" * 100, seq=300, flags=ACK)))  # gap: new frame
    push(coalescer, bytes(ipv4_tcp(b"d" * 100, seq=400, flags=ACK, dst=bytes([10, 201, 0, 9]))))  # other flow
    push(coalescer, bytes(ipv4_tcp(b"e" * 100, seq=500, flags=ACK | FIN)))  # FIN: never merged
    push(coalescer, bytes(ipv4_tcp(b"f" * 10, seq=600, flags=ACK)), 0, 0)  # complete checksum: as is
    coalescer.flush()
    payloads = [parse_ipv4_tcp(frame[VNET_HDR_LEN:])["payload"] for frame in out.frames]
    assert payloads == [b"a" * 100 + b"b" * 100, b"c" * 100, b"d" * 100, b"e" * 100, b"f" * 10]
    assert VNET_HDR.unpack_from(out.frames[-1])[0] == 0  # no NEEDS_CSUM for a complete checksum
    assert coalescer.merged == 2


@settings(max_examples=60, deadline=None)
@given(
    segments=st.integers(min_value=3, max_value=48),
    gso_size=st.integers(min_value=100, max_value=1400),
    seq=st.integers(min_value=0, max_value=2**32 - 1),
    ip_id=st.integers(min_value=0, max_value=0xFFFF),
    flags=st.sampled_from([ACK, ACK | PSH, ACK | CWR | PSH]),
)
def test_middle_segment_headers_advance_by_the_step_unless_a_field_wraps(segments, gso_size, seq, ip_id, flags):
    payload = bytes(gso_size * (segments - 1) + 7)
    frame = TsoFrame(
        memoryview(bytes(ipv4_tcp(payload, seq=seq, ip_id=ip_id, flags=flags, options=TIMESTAMPS))), gso_size, 20, True
    )
    out = bytearray(frame.header_len + gso_size)
    for index in range(frame.count):  # headers() is what write_segment writes
        frame.write_segment(out, 0, index)
        assert frame.headers(index) == bytes(out[: frame.header_len])
    first_middle = int.from_bytes(frame.headers(1), "big")
    advances = [int.from_bytes(frame.headers(i), "big") == first_middle + (i - 1) * frame.step for i in range(1, frame.count - 1)]
    wraps = ip_id + frame.count - 2 > 0xFFFF or seq + (frame.count - 2) * gso_size > 0xFFFFFFFF
    if frame.linear:
        assert all(advances) and not wraps
    else:
        assert not all(advances) or wraps  # only refused when it would have gone wrong, or a field wraps


def test_a_wrapping_ip_id_or_sequence_number_is_not_linear():
    payload = bytes(1000 * 10)
    assert TsoFrame(memoryview(bytes(ipv4_tcp(payload, ip_id=10))), 1000, 20, True).linear
    assert not TsoFrame(memoryview(bytes(ipv4_tcp(payload, ip_id=0xFFFA))), 1000, 20, True).linear
    assert not TsoFrame(memoryview(bytes(ipv4_tcp(payload, seq=2**32 - 3000))), 1000, 20, True).linear
    assert not TsoFrame(memoryview(bytes(ipv4_tcp(payload, partial=False))), 1000, 20, False).linear
    with pytest.raises(ValueError):
        TsoFrame(memoryview(bytes(ipv4_tcp(payload, partial=False))), 1000, 20, False).headers(0)


def _variant(field: str) -> bytes:
    """A packet that would follow the 'a' and 'b' packets of the test below, but for ``field``."""
    options = TIMESTAMPS
    kwargs: dict = {"seq": 200, "flags": ACK, "options": options}
    if field == "options":
        kwargs["options"] = TIMESTAMPS[:-1] + b"\x09"
    if field == "seq gap":
        kwargs["seq"] = 201
    packet = bytearray(ipv4_tcp(b"c" * 100, **kwargs))
    changes = {
        "tos": (1, 4),
        "ttl": (8, 63),
        "fragment": (6, 0x60),
        "ack": (31, 8),
        "window": (35, 1),
        "data offset": None,
        "flags": (33, ACK | 0x20),
    }
    if field in changes and changes[field]:
        at, value = changes[field]
        packet[at] = value
    return bytes(packet)


@pytest.mark.parametrize("field", ["same", "tos", "ttl", "fragment", "ack", "window", "flags", "options", "seq gap"])
def test_coalescer_merges_only_segments_that_match_in_every_field_gro_compares(field):
    out = Collector()
    coalescer = TcpCoalescer(out)
    push(coalescer, bytes(ipv4_tcp(b"a" * 100, seq=0, flags=ACK, options=TIMESTAMPS)))
    push(coalescer, bytes(ipv4_tcp(b"b" * 100, seq=100, flags=ACK, options=TIMESTAMPS, ip_id=78)))
    push(coalescer, _variant(field))
    coalescer.flush()
    payloads = [parse_ipv4_tcp(frame[VNET_HDR_LEN:])["payload"] for frame in out.frames]
    if field == "same":
        assert payloads == [b"a" * 100 + b"b" * 100 + b"c" * 100]
    else:
        assert payloads == [b"a" * 100 + b"b" * 100, b"c" * 100]


def test_coalescer_closes_a_frame_after_psh_or_a_short_segment():
    out = Collector()
    coalescer = TcpCoalescer(out)
    push(coalescer, bytes(ipv4_tcp(b"a" * 100, seq=0, flags=ACK)))
    push(coalescer, bytes(ipv4_tcp(b"b" * 100, seq=100, flags=ACK | PSH)))  # merges, closes
    push(coalescer, bytes(ipv4_tcp(b"c" * 100, seq=200, flags=ACK)))
    push(coalescer, bytes(ipv4_tcp(b"d" * 50, seq=300, flags=ACK)))  # short: merges, closes
    push(coalescer, bytes(ipv4_tcp(b"e" * 50, seq=350, flags=ACK)))
    coalescer.flush()
    frames = [parse_ipv4_tcp(frame[VNET_HDR_LEN:]) for frame in out.frames]
    assert [f["payload"] for f in frames] == [b"a" * 100 + b"b" * 100, b"c" * 100 + b"d" * 50, b"e" * 50]
    assert frames[0]["flags"] == ACK | PSH and frames[1]["flags"] == ACK
