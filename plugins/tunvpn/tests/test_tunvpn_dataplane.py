"""The forwarder on loopback UDP, with socket pairs standing in for the TUN devices (no root)."""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import socket
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kairos_plugin_tunvpn import fastpath
from kairos_plugin_tunvpn.crypto import SessionKeys
from kairos_plugin_tunvpn.dataplane import UDP_SEGMENT, WIRE_HEADER, DataPlane
from kairos_plugin_tunvpn.roaming import RoamLimiter
from kairos_plugin_tunvpn.tun import TunDevice, TunUnavailable
from kairos_plugin_tunvpn.vnet import GSO_NONE, GSO_TCPV4, NEEDS_CSUM, VNET_HDR, VNET_HDR_LEN, TsoFrame
from tunvpn_packets import icmp_echo, ipv4_tcp

VIP_A, VIP_B = "10.201.0.1", "10.201.0.2"
SECRET = b"k" * 32


class FakeTun:
    """A socket pair in place of a TUN: the data plane owns one end, the test the other."""

    def __init__(self) -> None:
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.device = TunDevice("fake", [theirs.detach()], vnet_hdr=True, mtu=1420)
        self.ours.settimeout(5)

    def inject(self, packet: bytes, gso_type: int = GSO_NONE, gso_size: int = 0, partial: bool = False) -> None:
        header = VNET_HDR.pack(NEEDS_CSUM if partial else 0, gso_type, 0, gso_size, 20 if partial else 0, 16 if partial else 0)
        self.ours.send(header + packet)

    def receive(self) -> tuple[tuple, bytes]:
        frame = self.ours.recv(70000)
        return VNET_HDR.unpack_from(frame), frame[VNET_HDR_LEN:]

    def close(self) -> None:
        self.device.close()
        self.ours.close()


@pytest.fixture(params=["c", "python"])
def pair(request, monkeypatch):
    """Two data planes joined over loopback UDP: with the C loops, and on the pure-Python path."""
    if request.param == "python":
        monkeypatch.setenv(fastpath.FASTPATH_ENV, "1")
    elif fastpath.GcmKey is None:
        pytest.skip("the C fast path is not built (needs a C compiler and libssl-dev)")
    tuns = FakeTun(), FakeTun()
    planes = [DataPlane(t.device, ("127.0.0.1", 0)) for t in tuns]
    keys_a = SessionKeys.derive(SECRET, "a", "b")
    planes[0].add_peer("b", VIP_B, planes[1].local_address, keys_a)
    planes[1].add_peer("a", VIP_A, planes[0].local_address, keys_a.mirror())
    for plane in planes:
        plane.start()
    try:
        yield tuns, planes, keys_a
    finally:
        for plane in planes:
            plane.stop()
        for tun in tuns:
            tun.close()


def wait_for(predicate, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def craft(keys: SessionKeys, counter: int, packet: bytes, *, epoch: int = 0) -> bytes:
    """A datagram sealed like the data plane does, under ``keys``' send key."""
    header = WIRE_HEADER.pack(1, epoch, 0, 0, keys.send_key_id, counter)
    return header + AESGCM(keys.send_key).encrypt(header[4:], packet, header)


def test_packets_cross_both_ways(pair):
    (tun_a, tun_b), (plane_a, plane_b), _ = pair
    ping = bytes(icmp_echo())
    tun_a.inject(ping)
    header, packet = tun_b.receive()
    assert packet == ping and header[0] == 0
    pong = bytes(icmp_echo(src=bytes([10, 201, 0, 2]), dst=bytes([10, 201, 0, 1])))
    tun_b.inject(pong)
    assert tun_a.receive()[1] == pong
    assert plane_a.counters["tx_packets"] == 1 and plane_b.counters["rx_packets"] == 1
    # the status says which path runs: the C loops, or pure Python
    assert plane_a.counters["fastpath"] == int(plane_a._peers["b"].send.fast is not None)


def test_a_tso_frame_is_sent_as_packets_and_arrives_coalesced(pair):
    (tun_a, tun_b), (plane_a, plane_b), _ = pair
    payload = bytes(range(256)) * 200  # 51,200 bytes: 38 segments of 1368
    tun_a.inject(bytes(ipv4_tcp(payload, flags=0x18)), GSO_TCPV4, 1368, partial=True)
    header, packet = tun_b.receive()
    assert header[1] == GSO_TCPV4 and header[3] == 1368 and header[0] == NEEDS_CSUM
    assert packet[40:] == payload
    assert wait_for(lambda: plane_a.counters["tx_sends"] == 1)  # one GSO train
    assert plane_a.counters["tx_packets"] == 38
    counters_b = plane_b.counters
    assert counters_b["rx_packets"] == 38 and counters_b["tun_writes"] < 38  # coalesced (GRO may split a train)


def test_unknown_peers_bad_tags_garbage_spoofs_and_replays_are_dropped(pair):
    (tun_a, tun_b), (_, plane_b), keys_a = pair
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.1", 0))
    target = plane_b.local_address
    good = bytes(icmp_echo())
    try:
        stranger.sendto(craft(SessionKeys.derive(b"z" * 32, "a", "b"), 0, good), target)  # unknown key id
        forged = SessionKeys(b"f" * 32, keys_a.receive_key, keys_a.send_key_id, keys_a.receive_key_id)
        stranger.sendto(craft(forged, 1, good), target)  # right key id, wrong key
        stranger.sendto(b"\x01garbage", target)
        stranger.sendto(craft(keys_a, 2, bytes(icmp_echo(src=bytes([10, 201, 0, 99])))), target)  # spoofed
        genuine = craft(keys_a, 1000, good)
        stranger.sendto(genuine, target)  # authentic: accepted even from a new address
        stranger.sendto(genuine, target)  # replay
        marker = bytes(icmp_echo(payload=b"marker"))
        stranger.sendto(craft(keys_a, 1001, marker), target)
        assert tun_b.receive()[1] == good
        assert tun_b.receive()[1] == marker  # nothing else came through in between
        counters = plane_b.counters
        assert counters["drop_unknown_peer"] == 1
        assert counters["drop_bad_tag"] == 1
        assert counters["drop_malformed"] == 1
        assert counters["drop_spoofed_source"] == 1
        assert counters["drop_replay"] == 1
        assert counters["rx_packets"] == 2
    finally:
        stranger.close()


def garbage_under(key_id: int, rng: random.Random, body: int = 100) -> bytes:
    """What someone who read ``key_id`` off the wire can send: a plausible header, random bytes."""
    return WIRE_HEADER.pack(1, 0, 0, 0, key_id, rng.getrandbits(40)) + rng.randbytes(body)


def test_a_flood_under_a_real_key_id_from_a_foreign_endpoint_is_dropped_before_any_decryption(pair):
    """The attack of issue #12 (Medium 8a): a non-member floods the data plane's port with
    datagrams carrying a key id read off the wire. They are dropped unopened (counted as
    drop_roam_limited) but for the roaming budget, while the peer's own traffic flows."""
    (tun_a, tun_b), (_, plane_b), keys_a = pair
    # no token ever comes back: what the flood may cost is exactly one source's burst
    plane_b.roam_limiter = RoamLimiter(per_source_rate=0, per_source_burst=4, total_rate=0, total_burst=6)
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.bind(("127.0.0.1", 0))
    target = plane_b.local_address
    rng = random.Random(8)
    flood = 0
    try:
        for turn in range(10):
            for _ in range(100):  # single datagrams
                attacker.sendto(garbage_under(keys_a.send_key_id, rng), target)
            # and a GSO train, which the receiver gets as one GRO train
            train = b"".join(garbage_under(keys_a.send_key_id, rng) for _ in range(40))
            attacker.sendmsg([train], [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", 116))], 0, target)
            flood += 140
            ping = bytes(icmp_echo(payload=bytes([turn]) * 16))
            tun_a.inject(ping)
            assert tun_b.receive()[1] == ping  # the peer's traffic goes through the flood
        assert wait_for(lambda: plane_b.counters["drop_roam_limited"] + plane_b.counters["drop_bad_tag"] == flood)
        counters = plane_b.counters
        assert counters["roam_opens"] == counters["drop_bad_tag"] == 4  # the only decryptions: the burst
        assert counters["drop_roam_limited"] == flood - 4
        assert counters["rx_packets"] == 10 and counters["roams"] == 0
        assert plane_b.source_of("a") == pair[1][0].local_address  # the session did not move
    finally:
        attacker.close()


def test_an_authentic_datagram_from_a_new_endpoint_moves_the_session_within_the_budget(pair):
    (tun_a, tun_b), (plane_a, plane_b), keys_a = pair
    plane_b.roam_limiter = RoamLimiter(per_source_rate=0, per_source_burst=2, total_rate=0, total_burst=3)
    first, second = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    target = plane_b.local_address
    rng = random.Random(9)
    try:
        for sock in (first, second):
            sock.bind(("127.0.0.1", 0))
        for _ in range(3):
            first.sendto(garbage_under(keys_a.send_key_id, rng), target)
        assert wait_for(lambda: plane_b.counters["drop_roam_limited"] == 1)
        assert plane_b.counters["drop_bad_tag"] == 2  # first's burst went on forgeries
        first.sendto(craft(keys_a, 100, bytes(icmp_echo(payload=b"from first"))), target)
        assert wait_for(lambda: plane_b.counters["drop_roam_limited"] == 2)  # authentic, but no token left
        # the peer from a new endpoint: the last token of the total opens it, and the session moves
        second.sendto(craft(keys_a, 101, bytes(icmp_echo(payload=b"roamed"))), target)
        assert tun_b.receive()[1][28:] == b"roamed"
        assert plane_b.source_of("a") == second.getsockname() and plane_b.counters["roams"] == 1
        for counter in range(102, 105):  # from there on no token is needed
            second.sendto(craft(keys_a, counter, bytes(icmp_echo(payload=b"more"))), target)
            assert tun_b.receive()[1][28:] == b"more"
        assert plane_b.counters["roam_opens"] == 3
        # and the endpoint the session left is now a stranger: no token, nothing opened
        tun_a.inject(bytes(icmp_echo()))
        assert wait_for(lambda: plane_b.counters["drop_roam_limited"] == 3)
        assert plane_b.counters["rx_packets"] == 4
    finally:
        first.close()
        second.close()


def test_new_keys_for_a_peer_keep_the_endpoint_it_authenticated_from(pair):
    (tun_a, tun_b), (plane_a, plane_b), keys_a = pair
    roamer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        roamer.bind(("127.0.0.1", 0))
        roamer.sendto(craft(keys_a, 50, bytes(icmp_echo())), plane_b.local_address)
        tun_b.receive()
        assert plane_b.source_of("a") == roamer.getsockname()
        plane_b.add_peer("a", VIP_A, plane_a.local_address, SessionKeys.derive(b"n" * 32, "b", "a"))
        assert plane_b.source_of("a") == roamer.getsockname()
        assert plane_b.source_of("nobody") is None
    finally:
        roamer.close()


def test_fallback_path_carries_sealed_datagrams():
    tun_a, tun_b = FakeTun(), FakeTun()
    plane_a = DataPlane(tun_a.device, ("127.0.0.1", 0))
    plane_b = DataPlane(tun_b.device, ("127.0.0.1", 0))
    keys = SessionKeys.derive(SECRET, "a", "b")
    plane_a.add_peer("b", VIP_B, None, keys)
    plane_b.add_peer("a", VIP_A, None, keys.mirror())
    plane_b.add_peer("c", "10.201.0.3", None, SessionKeys.derive(SECRET, "b", "c"))
    carried: list[bytes] = []
    plane_a.set_fallback("b", carried.append)
    try:
        plane_a.start()
        plane_b.start()
        ping = bytes(icmp_echo())
        tun_a.inject(ping)
        assert wait_for(lambda: carried)
        assert not plane_b.inject_from_fallback("c", carried[0])  # c's stream cannot speak for a
        assert plane_b.inject_from_fallback("a", carried[0])
        assert tun_b.receive()[1] == ping
        assert plane_b.counters["drop_unknown_peer"] == 1
    finally:
        plane_a.stop()
        plane_b.stop()
        tun_a.close()
        tun_b.close()


def test_rekeying_in_flight_keeps_every_packet():
    tun_a, tun_b = FakeTun(), FakeTun()
    plane_a = DataPlane(tun_a.device, ("127.0.0.1", 0), rekey_after_packets=3)
    plane_b = DataPlane(tun_b.device, ("127.0.0.1", 0))
    keys = SessionKeys.derive(SECRET, "a", "b")
    plane_a.add_peer("b", VIP_B, plane_b.local_address, keys)
    plane_b.add_peer("a", VIP_A, plane_a.local_address, keys.mirror())
    try:
        plane_a.start()
        plane_b.start()
        for i in range(10):
            packet = bytes(icmp_echo(payload=bytes([i]) * 8))
            tun_a.inject(packet)
            assert tun_b.receive()[1] == packet
        assert plane_a.counters["rekeys"] == 3
    finally:
        plane_a.stop()
        plane_b.stop()
        tun_a.close()
        tun_b.close()


def test_survives_an_unreachable_peer_and_forwards_again():
    tun_a, tun_b = FakeTun(), FakeTun()
    plane_a = DataPlane(tun_a.device, ("127.0.0.1", 0))
    plane_b = DataPlane(tun_b.device, ("127.0.0.1", 0))
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    dead_end = closed.getsockname()
    closed.close()  # nothing listens there: the kernel answers with ICMP port unreachable
    keys = SessionKeys.derive(SECRET, "a", "b")
    plane_a.add_peer("b", VIP_B, dead_end, keys)
    plane_b.add_peer("a", VIP_A, plane_a.local_address, keys.mirror())
    try:
        plane_a.start()
        plane_b.start()
        for _ in range(5):
            tun_a.inject(bytes(icmp_echo()))
        assert wait_for(lambda: plane_a.counters["tx_packets"] == 5)
        plane_a.set_endpoint("b", plane_b.local_address)
        ping = bytes(icmp_echo(payload=b"after"))
        tun_a.inject(ping)
        assert tun_b.receive()[1] == ping
    finally:
        plane_a.stop()
        plane_b.stop()
        tun_a.close()
        tun_b.close()


def test_peers_with_the_same_vip_are_refused(pair):
    _, (plane_a, _), _ = pair
    with pytest.raises(ValueError):
        plane_a.add_peer("c", ipaddress.IPv4Address(VIP_B), None, SessionKeys.derive(SECRET, "a", "c"))


def test_packets_without_a_route_are_counted(pair):
    (tun_a, tun_b), (plane_a, _), _ = pair
    tun_a.inject(bytes(icmp_echo(dst=bytes([10, 201, 0, 77]))))
    tun_a.inject(bytes(icmp_echo()))
    assert tun_b.receive()[1] == bytes(icmp_echo())
    assert plane_a.counters["drop_no_route"] == 1


def test_a_bug_hit_by_every_packet_is_counted_each_time_and_logged_once(pair, monkeypatch, caplog):
    (tun_a, tun_b), (plane_a, _), _ = pair

    def broken(*args, **kwargs):
        raise RuntimeError("sealing is broken")

    monkeypatch.setattr(plane_a, "_seal_one", broken)
    with caplog.at_level(logging.WARNING, logger="kairos_plugin_tunvpn.dataplane"):
        for _ in range(5):
            tun_a.inject(bytes(icmp_echo()))
        assert wait_for(lambda: plane_a.counters["drop_malformed"] == 5)
        monkeypatch.undo()
        tun_a.inject(bytes(icmp_echo()))
        assert tun_b.receive()[1] == bytes(icmp_echo())  # the thread survived
    dropped = [r for r in caplog.records if r.getMessage().startswith("tunvpn: frame dropped")]
    assert len(dropped) == 1 and dropped[0].exc_info[1].args == ("sealing is broken",)


def test_missing_tun_gives_a_typed_one_line_error(monkeypatch):
    monkeypatch.setattr("kairos_plugin_tunvpn.tun.TUN_PATH", "/nonexistent/tun")
    with pytest.raises(TunUnavailable) as info:
        TunDevice.create("ktest1")
    assert "\n" not in str(info.value) and "/nonexistent/tun" in str(info.value)


def test_peer_queries_and_moving_a_vip_keep_the_session(pair):
    (tun_a, tun_b), (plane_a, plane_b), _ = pair
    assert plane_a.has_peer("b") and not plane_a.has_peer("zz") and plane_a.peer_ids() == ["b"]
    assert plane_a.vip_of("b") == ipaddress.IPv4Address(VIP_B) and plane_a.vip_of("zz") is None
    assert plane_a.endpoint_of("b") == plane_b.local_address and plane_a.endpoint_of("zz") is None
    tun_a.inject(bytes(icmp_echo()))
    tun_b.receive()
    moved = "10.201.0.9"
    plane_a.set_vip("b", moved)
    assert plane_a.vip_of("b") == ipaddress.IPv4Address(moved)
    # the old VIP is no longer b's source; the new one is, and the replay window did not restart
    tun_b.inject(bytes(icmp_echo(src=bytes([10, 201, 0, 2]), dst=bytes([10, 201, 0, 1]))))
    pong = bytes(icmp_echo(src=bytes([10, 201, 0, 9]), dst=bytes([10, 201, 0, 1]), payload=b"moved"))
    tun_b.inject(pong)
    assert tun_a.receive()[1] == pong
    assert plane_a.counters["drop_spoofed_source"] == 1
    # a's send counter went on (re-adding the peer would restart it: b would see replays)
    after = bytes(icmp_echo(dst=bytes([10, 201, 0, 9]), payload=b"after the move"))
    tun_a.inject(after)
    assert tun_b.receive()[1] == after and plane_b.counters["drop_replay"] == 0
    with pytest.raises(KeyError):
        plane_a.set_vip("zz", "10.201.0.50")


def test_set_vip_refuses_another_peers_vip(pair):
    _, (plane_a, _), _ = pair
    plane_a.add_peer("c", "10.201.0.3", None, SessionKeys.derive(SECRET, "a", "c"))
    with pytest.raises(ValueError):
        plane_a.set_vip("c", VIP_B)
    assert plane_a.vip_of("c") == ipaddress.IPv4Address("10.201.0.3")


def test_udp_heard_moves_only_for_authentic_udp_and_last_heard_for_any_path(pair):
    (tun_a, tun_b), (plane_a, plane_b), keys_a = pair
    assert plane_b.udp_heard("a") is None and plane_b.last_heard("a") is None
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        forged = SessionKeys(b"f" * 32, keys_a.receive_key, keys_a.send_key_id, keys_a.receive_key_id)
        stranger.sendto(craft(forged, 0, bytes(icmp_echo())), plane_b.local_address)
        assert wait_for(lambda: plane_b.counters["drop_bad_tag"] == 1)
        assert plane_b.udp_heard("a") is None and plane_b.last_heard("a") is None  # forgeries prove nothing
    finally:
        stranger.close()
    tun_a.inject(bytes(icmp_echo()))
    tun_b.receive()
    heard = plane_b.udp_heard("a")
    assert heard is not None and plane_b.last_heard("a") == heard
    # a datagram carried by the stream moves last_heard only
    delivered = plane_b.inject_batch_from_fallback(
        "a",
        [craft(keys_a, 5000, bytes(icmp_echo(payload=b"s1"))), craft(keys_a, 5001, bytes(icmp_echo(payload=b"s2"))), b"\x01junk"],
    )
    assert delivered == 2
    assert [tun_b.receive()[1][28:] for _ in range(2)] == [b"s1", b"s2"]
    assert plane_b.udp_heard("a") == heard and plane_b.last_heard("a") > heard
    assert plane_b.inject_batch_from_fallback("nobody", [b"x"]) == 0


def _sealed_trains(plane: DataPlane, frame_bytes: bytes, fast: bool) -> list[bytes]:
    """The datagram trains ``plane`` sends for one TSO frame, by the linear or the generic path."""
    trains: list[bytes] = []
    plane._send_train = lambda peer, view, length, size, count: trains.append(bytes(view[:length]))
    header = VNET_HDR.pack(NEEDS_CSUM, GSO_TCPV4, 0, 1368, 20, 16)
    buf = bytearray(VNET_HDR_LEN + 65536 + 64)
    buf[: len(header) + len(frame_bytes)] = header + frame_bytes
    out = bytearray(65507 + 16 + 65536 + 16)
    if fast:
        plane._forward(buf, memoryview(buf), len(header) + len(frame_bytes), VNET_HDR_LEN, out, memoryview(out), {})
    else:
        frame = TsoFrame(memoryview(frame_bytes), 1368, 20, True)
        peer = next(iter(plane._peers.values()))
        plane._seal_and_send(peer, frame.count, frame.write_segment, 20, 16, out, memoryview(out))
    return trains


@pytest.mark.parametrize("segments", [3, 38, 45, 46, 47])
def test_linear_sealing_sends_the_same_bytes_as_segment_by_segment_sealing(segments):
    frame = bytes(ipv4_tcp(bytes(range(256)) * (1368 * segments // 256) + b"tail", flags=0x18, ip_id=5))
    trains = []
    # the linear path in C, the linear path in Python, segment by segment in Python
    for fast, pure_python in ((True, False), (True, True), (False, True)):
        tun = FakeTun()
        try:
            if pure_python:
                os.environ[fastpath.FASTPATH_ENV] = "1"
            plane = DataPlane(tun.device, ("127.0.0.1", 0))
            plane.add_peer("b", VIP_B, ("127.0.0.1", 9), SessionKeys.derive(SECRET, "a", "b"))
            assert (plane._peers["b"].send.fast is None) == (pure_python or fastpath.GcmKey is None)
            assert TsoFrame(memoryview(frame), 1368, 20, True).linear
            trains.append(_sealed_trains(plane, frame, fast) + _sealed_trains(plane, frame, fast))  # counters move on
            plane.stop()
        finally:
            os.environ.pop(fastpath.FASTPATH_ENV, None)
            tun.close()
    assert trains[0] == trains[1] == trains[2] and len(trains[0]) >= 2


def test_a_train_with_replays_forgeries_and_gaps_delivers_each_authentic_counter_once(pair):
    (_, tun_b), (_, plane_b), keys_a = pair
    packets = [bytes(icmp_echo(payload=bytes([i]) * 32)) for i in range(8)]
    forged = SessionKeys(b"f" * 32, keys_a.receive_key, keys_a.send_key_id, keys_a.receive_key_id)
    order = [
        (keys_a, 0),
        (keys_a, 1),
        (keys_a, 1),
        (keys_a, 0),
        (keys_a, 5),
        (forged, 6),
        (keys_a, 3),
        (keys_a, 6),
        (keys_a, 5),
        (keys_a, 7),
    ]
    train = b"".join(craft(keys, counter, packets[counter]) for keys, counter in order)
    size = len(train) // len(order)
    view = memoryview(bytearray(train))
    with plane_b._rx_lock:
        plane_b._open_train(view, len(train), size, ("127.0.0.1", 9), {})
        plane_b._coalescer.flush()
    delivered = [tun_b.receive()[1] for _ in range(6)]
    assert delivered == [packets[i] for i in (0, 1, 5, 3, 6, 7)]
    counters = plane_b.counters
    assert counters["drop_replay"] == 3 and counters["drop_bad_tag"] == 1 and counters["rx_packets"] == 6
    window = plane_b._peers["a"].receive.current.window
    assert window.highest == 7 and not window.check(6) and window.check(2) and window.bits <= window.mask


# Both receive paths: the C loops (when built) and their pure-Python twin.
RECEIVE_PATHS = [
    pytest.param(
        False,
        id="c",
        marks=pytest.mark.skipif(
            fastpath.GcmKey is None, reason="the C fast path is not built (needs a C compiler and libssl-dev)"
        ),
    ),
    pytest.param(True, id="python"),
]
PEER_ENDPOINT = ("127.0.0.1", 9)


def receiving_plane(pure_python: bool) -> tuple[DataPlane, FakeTun, SessionKeys, list[bytes]]:
    """A data plane (not started) with peer "a" at :data:`PEER_ENDPOINT`, on the C or the Python
    path, and the list its TUN writes go to (inner packets, vnet header cut off)."""
    tun = FakeTun()
    if pure_python:
        os.environ[fastpath.FASTPATH_ENV] = "1"
    try:
        plane = DataPlane(tun.device, ("127.0.0.1", 0))
        keys = SessionKeys.derive(SECRET, "b", "a")
        plane.add_peer("a", VIP_A, PEER_ENDPOINT, keys)
    finally:
        os.environ.pop(fastpath.FASTPATH_ENV, None)
    assert (plane._peers["a"].receive.current.fast is None) == (pure_python or fastpath.GcmKey is None)
    written: list[bytes] = []
    # captured rather than read from the socket pair, whose queue holds only a few frames
    plane._coalescer._write = lambda frame: written.append(bytes(frame[VNET_HDR_LEN:]))
    return plane, tun, keys, written


def open_train(plane: DataPlane, body: bytearray, size: int) -> None:
    with plane._rx_lock:
        plane._open_train(memoryview(body), len(body), size, PEER_ENDPOINT, {})
        plane._coalescer.flush()


def drops(plane: DataPlane) -> int:
    return sum(v for k, v in plane.counters.items() if k.startswith("drop_"))


@pytest.mark.parametrize("pure_python", RECEIVE_PATHS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_garbage_trains_under_a_peers_key_id_are_counted_and_never_crash(pure_python, data):
    """What reaches the C loops (or their Python twin) from the network: random bytes behind a
    real key id and epoch, in trains of random datagram sizes with a random tail; empty too."""
    plane, tun, keys, written = receiving_plane(pure_python)
    try:
        prefix = WIRE_HEADER.pack(1, 0, 0, 0, keys.receive_key_id, 0)[:8]
        size = data.draw(st.integers(min_value=1, max_value=1500), label="size")
        n = data.draw(st.integers(min_value=0, max_value=min(65000, size * 50)), label="n")
        body = bytearray(data.draw(st.binary(min_size=n, max_size=n), label="body"))
        for at in range(0, n - 8, size):  # every datagram claims to be the peer's
            body[at : at + 8] = prefix
        # from the session's endpoint, or from another (opened within the roaming budget, or not)
        address = data.draw(st.sampled_from([PEER_ENDPOINT, ("127.0.0.1", 4444)]), label="address")
        before = drops(plane)
        with plane._rx_lock:
            plane._open_train(memoryview(body), n, size, address, {})  # no exception, ever
            plane._coalescer.flush()
        assert plane.counters["rx_packets"] == 0 and not written  # nothing forged gets through
        datagrams = max(1, (n + size - 1) // size)  # an empty datagram is one datagram too
        assert drops(plane) - before == datagrams  # each counted once
    finally:
        plane.stop()
        tun.close()


@st.composite
def inner_packets(draw) -> bytes:
    """An inner packet of 20..200 bytes: IPv4 or another version nibble, from the peer's VIP or not."""
    version = draw(st.sampled_from([4, 4, 6, 0, 5, 15]), label="version")
    source = draw(st.sampled_from([bytes(map(int, VIP_A.split("."))), bytes([10, 201, 0, 99])]), label="source")
    rest = draw(st.binary(min_size=4, max_size=184), label="rest")
    return bytes([version << 4 | 5]) + bytes(11) + source + rest


@pytest.mark.parametrize("pure_python", RECEIVE_PATHS)
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_authentic_trains_deliver_exactly_the_peers_new_ipv4_packets(pure_python, data):
    """Authentic trains (some datagrams forged, replayed or shorter at the end) whose inner
    packets carry any version nibble and the peer's VIP or another address at bytes 12..15:
    both paths deliver each new IPv4 packet from the peer's VIP, once, and nothing else."""
    plane, tun, keys, written = receiving_plane(pure_python)
    try:
        length = data.draw(st.integers(min_value=20, max_value=200), label="length")
        count = data.draw(st.integers(min_value=2, max_value=24), label="count")
        mirror = keys.mirror()
        body = bytearray()
        expected, seen, counted = [], set(), 0
        for index in range(count):
            packet = bytearray(data.draw(inner_packets(), label="packet"))
            last = index == count - 1
            size = data.draw(st.integers(min_value=20, max_value=length), label="tail") if last else length
            packet = (packet * (size // len(packet) + 1))[:size]
            counter = data.draw(st.integers(min_value=0, max_value=30), label="counter")
            datagram = bytearray(craft(mirror, counter, bytes(packet)))
            forged = data.draw(st.booleans(), label="forged") and data.draw(st.booleans())
            if forged:
                datagram[-1] ^= 1
            body += datagram
            counted += 1
            if forged or counter in seen:
                continue
            seen.add(counter)
            if packet[0] >> 4 == 4 and packet[12:16] == bytes(map(int, VIP_A.split("."))):
                expected.append(bytes(packet))
        before = drops(plane)
        open_train(plane, body, length + 32)
        assert written == expected
        assert plane.counters["rx_packets"] == len(expected)
        assert drops(plane) - before == counted - len(expected)  # every other datagram counted once
    finally:
        plane.stop()
        tun.close()


@pytest.mark.parametrize("pure_python", RECEIVE_PATHS)
def test_an_ipv6_packet_whose_bytes_12_to_15_are_the_vip_is_dropped_in_a_train(pure_python):
    plane, tun, keys, written = receiving_plane(pure_python)
    try:
        vip = bytes(map(int, VIP_A.split(".")))
        ipv6 = bytes([0x60]) + bytes(11) + vip + bytes(44)  # bytes 12..15 equal the VIP, and IPv6
        good = bytes([0x45]) + bytes(11) + vip + bytes(44)
        train = bytearray(b"".join(craft(keys.mirror(), c, p) for c, p in enumerate((good, ipv6, good, ipv6))))
        open_train(plane, train, len(train) // 4)
        assert written == [good, good]
        assert plane.counters["drop_spoofed_source"] == 2 and plane.counters["rx_packets"] == 2
    finally:
        plane.stop()
        tun.close()


def test_an_empty_datagram_is_counted_not_raised(pair, caplog):
    (tun_a, tun_b), (_, plane_b), _ = pair
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with caplog.at_level(logging.WARNING, logger="kairos_plugin_tunvpn.dataplane"):
            for _ in range(3):
                stranger.sendto(b"", plane_b.local_address)
            assert wait_for(lambda: plane_b.counters["drop_malformed"] == 3)
            tun_a.inject(bytes(icmp_echo()))
            assert tun_b.receive()[1] == bytes(icmp_echo())
        assert not [r for r in caplog.records if "dropped" in r.getMessage()]  # no exception was caught
    finally:
        stranger.close()
