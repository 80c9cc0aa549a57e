"""The C loops (``_fastpath``) against the reference: AES-GCM from ``cryptography`` and the
pure-Python data plane."""

from __future__ import annotations

import os
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_plugin_tunvpn.crypto import SendState, SessionKeys
from kairos_plugin_tunvpn.fastpath import FASTPATH_ENV
from kairos_plugin_tunvpn.vnet import VNET_HDR_LEN, TcpCoalescer
from tunvpn_packets import ipv4_tcp

fastpath = pytest.importorskip(
    "kairos_plugin_tunvpn._fastpath", reason="the C fast path is not built (needs a C compiler and libssl-dev)"
)

KEY = bytes(range(32))
HEADER = struct.Struct("!BBBBIQ")
SIZE = 16 + 60 + 16  # wire header, a 60-byte inner packet, tag
VIP = bytes([10, 1, 0, 2])
PSH, ACK = 0x08, 0x10


def inner(source: bytes = VIP, fill: int = 0) -> bytes:
    return bytes([0x45]) + bytes(11) + source + bytes([10, 1, 0, 1]) + bytes([fill]) * 40


def sealed(counter: int, packet: bytes, key: bytes = KEY, key_id: int = 7, epoch: int = 0) -> bytes:
    header = HEADER.pack(1, epoch, 0, 0, key_id, counter)
    return header + AESGCM(key).encrypt(header[4:], packet, header)


def train(*datagrams: bytes) -> bytearray:
    return bytearray(b"".join(datagrams))


def test_seal_run_writes_what_aesgcm_writes_for_each_segment():
    key = fastpath.GcmKey(KEY)
    headers = HEADER.pack(1, 3, 20, 16, 99, 1000) + bytes(range(52))
    step = (1 << 8 * 52) + 1368  # counter + 1, and (say) a sequence number + 1368 at the end
    payload = os.urandom(1368 * 5 + 10)
    slot = len(headers) + 1368 + 16
    out = bytearray(7 + 5 * slot + 3)
    key.seal_run(out, 7, slot, 5, headers, step.to_bytes(len(headers), "big"), payload, 10, 1368)
    current = int.from_bytes(headers, "big")
    for i in range(5):
        h = current.to_bytes(len(headers), "big")
        plain = h[16:] + payload[10 + i * 1368 : 10 + (i + 1) * 1368]
        expected = h[:16] + AESGCM(KEY).encrypt(h[4:16], plain, h[:16])
        assert bytes(out[7 + i * slot : 7 + (i + 1) * slot]) == expected
        current += step
    assert out[:7] == bytes(7) and out[-3:] == bytes(3)  # nothing written outside the run


@pytest.mark.parametrize(
    "args",
    [
        (0, 100, 1, b"x" * 15, b"x" * 15, b"p" * 10, 0, 10),  # headers shorter than the wire header
        (0, 100, 1, b"x" * 20, b"x" * 19, b"p" * 10, 0, 10),  # step of another length
        (0, 40, 1, b"x" * 20, b"x" * 20, b"p" * 10, 0, 10),  # slot too small for headers + data + tag
        (0, 100, 2, b"x" * 20, b"x" * 20, b"p" * 10, 0, 10),  # payload too short for two segments
        (950, 100, 1, b"x" * 20, b"x" * 20, b"p" * 10, 0, 10),  # past the end of out
    ],
)
def test_seal_run_refuses_arguments_out_of_range(args):
    with pytest.raises(ValueError):
        fastpath.GcmKey(KEY).seal_run(bytearray(1000), *args)


def test_a_key_must_be_32_bytes():
    with pytest.raises(ValueError):
        fastpath.GcmKey(b"short")


def test_open_run_opens_an_in_order_train_in_place():
    buf = train(*(sealed(c, inner(fill=c)) for c in (5, 6, 8)))
    status, last, run = fastpath.GcmKey(KEY).open_run(buf, 3, SIZE, bytes(buf[:8]), 4, VIP)
    assert status == bytes(3) and last == 8
    assert int.from_bytes(run, "little") == 0b1101  # counters 8, 6, 5 (bit k = counter 8 - k)
    for i, c in enumerate((5, 6, 8)):
        assert bytes(buf[i * SIZE + 16 : i * SIZE + 76]) == inner(fill=c)


def test_open_run_marks_forgeries_and_foreign_sources_and_stops_at_replays_and_strangers():
    forged = bytearray(sealed(2, inner()))
    forged[30] ^= 1
    other_key = sealed(4, inner(), key_id=8)  # another peer's key id: not this train's prefix
    buf = train(sealed(1, inner()), bytes(forged), sealed(3, inner(source=bytes([10, 1, 0, 9]))), other_key, sealed(9, inner()))
    status, last, run = fastpath.GcmKey(KEY).open_run(buf, 5, SIZE, bytes(buf[:8]), -1, VIP)
    assert status == bytes([0, 1, 2]) and last == 3 and int.from_bytes(run, "little") == 0b101
    assert bytes(buf[3 * SIZE :]) == other_key + sealed(9, inner())  # left for the slow path, untouched
    replayed = train(sealed(3, inner()), sealed(4, inner()))
    status, last, run = fastpath.GcmKey(KEY).open_run(replayed, 2, SIZE, bytes(replayed[:8]), 3, VIP)
    assert status == b"" and last == 3 and run == b""


def test_open_run_gives_a_packet_that_is_not_ipv4_to_the_caller_even_when_bytes_12_to_15_are_the_vip():
    ipv6 = bytes([0x60]) + inner()[1:]  # the VIP where an IPv4 source would be
    empty_version = bytes([0x05]) + inner()[1:]
    buf = train(sealed(1, inner()), sealed(2, ipv6), sealed(3, empty_version))
    status, last, _ = fastpath.GcmKey(KEY).open_run(buf, 3, SIZE, bytes(buf[:8]), -1, VIP)
    assert status == bytes([0, 2, 2]) and last == 3  # authentic, but for the caller to judge (and drop)


def test_open_run_refuses_arguments_out_of_range():
    key = fastpath.GcmKey(KEY)
    with pytest.raises(ValueError):
        key.open_run(bytearray(SIZE), 2, SIZE, bytes(8), -1, VIP)  # two datagrams in one's room
    with pytest.raises(ValueError):
        key.open_run(bytearray(SIZE), 1, SIZE, bytes(7), -1, VIP)
    with pytest.raises(ValueError):
        key.open_run(bytearray(40), 1, 40, bytes(8), -1, VIP)  # too small to hold a packet


def test_the_pure_python_path_can_be_chosen(monkeypatch):
    keys = SessionKeys.derive(b"s" * 32, "a", "b")
    assert SendState(keys).fast is not None
    monkeypatch.setenv(FASTPATH_ENV, "1")
    assert SendState(keys).fast is None


# ----- the coalescer's run in C against its Python fast path ------------------------------------

SEGMENT = 700
TIMESTAMPS = b"\x01\x01\x08\x0a" + struct.pack("!II", 12345, 678)


class Frames(list):
    def __call__(self, frame) -> None:
        self.append(bytes(frame))


def coalesce(packets: list[bytes], with_runs: bool, taken_by_runs: list[int] | None = None) -> list[bytes]:
    """Feed equal-length packets laid out `stride` apart, as the data plane does after open_run."""
    length = len(packets[0])
    stride = length + 32
    src = bytearray(stride * len(packets))
    for i, packet in enumerate(packets):
        src[i * stride + 16 : i * stride + 16 + length] = packet
    view = memoryview(src)
    frames = Frames()
    coalescer = TcpCoalescer(frames)
    if not with_runs:
        coalescer._append_segments = None  # push() alone: the Python fast path
    index = 0
    while index < len(packets):
        taken = coalescer.append_run(view, index * stride + 16, stride, len(packets) - index, length, 20, 16)
        if taken:
            index += taken
            if taken_by_runs is not None:
                taken_by_runs.append(taken)
            continue
        coalescer.push(view[index * stride + 16 - VNET_HDR_LEN :], length, 20, 16)
        index += 1
    coalescer.flush()
    return frames


@settings(max_examples=60, deadline=None)
@given(
    segments=st.integers(min_value=2, max_value=80),
    dropped=st.sets(st.integers(min_value=0, max_value=79), max_size=4),
    swapped=st.sets(st.integers(min_value=0, max_value=78), max_size=2),
    push_at=st.sets(st.integers(min_value=0, max_value=79), max_size=2),
    other_flow_at=st.sets(st.integers(min_value=0, max_value=79), max_size=3),
)
def test_runs_appended_in_c_give_the_frames_push_gives(segments, dropped, swapped, push_at, other_flow_at):
    packets = []
    for i in range(segments):
        flags = ACK | PSH if i in push_at else ACK
        packets.append(
            bytes(ipv4_tcp(bytes([i % 251]) * SEGMENT, seq=1000 + i * SEGMENT, flags=flags, ip_id=i, options=TIMESTAMPS))
        )
        if i in other_flow_at:
            packets.append(bytes(ipv4_tcp(b"o" * SEGMENT, seq=7, flags=ACK, options=TIMESTAMPS, src=bytes([10, 9, 9, 9]))))
    packets = [p for i, p in enumerate(packets) if i not in dropped] or packets[:1]
    for i in sorted(swapped):
        if i + 1 < len(packets):
            packets[i], packets[i + 1] = packets[i + 1], packets[i]
    assert coalesce(packets, with_runs=True) == coalesce(packets, with_runs=False)


def test_a_run_stops_where_a_frame_would_outgrow_its_limit():
    packets = [bytes(ipv4_tcp(b"x" * 1368, seq=i * 1368, flags=ACK, options=TIMESTAMPS)) for i in range(60)]
    runs: list[int] = []
    frames = coalesce(packets, with_runs=True, taken_by_runs=runs)
    assert frames == coalesce(packets, with_runs=False) and len(frames) == 2
    assert sum(runs) == 58  # all but the first packet of each frame, which push() starts
    assert sum(len(f) - VNET_HDR_LEN - 52 for f in frames) == 60 * 1368


def test_runs_too_long_to_be_real_are_refused_before_any_arithmetic_on_them():
    key = fastpath.GcmKey(KEY)
    with pytest.raises(ValueError):
        key.seal_run(bytearray(100), 0, 2**40, 2**30, b"x" * 20, b"x" * 20, b"p" * 10, 0, 10)
    with pytest.raises(ValueError):
        key.open_run(bytearray(SIZE), 2**62, SIZE, bytes(8), -1, VIP)
    with pytest.raises(ValueError):
        fastpath.append_segments(bytearray(100), 60, 100, b"p" * 100, 0, 2**40, 2**30, 52, 52, 1368, bytes(52), bytes(52), 24)
