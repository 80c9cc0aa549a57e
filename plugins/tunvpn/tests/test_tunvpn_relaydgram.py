"""Relayed sealed datagrams on loopback UDP: A and B reach each other only through R's data plane,
which forwards their datagrams without their keys (socket pairs stand in for the TUN devices)."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import replace

import pytest

from kairos_plugin_tunvpn import fastpath, keyexchange
from kairos_plugin_tunvpn.crypto import SessionKeys
from kairos_plugin_tunvpn.dataplane import UDP_SEGMENT, DataPlane
from kairos_plugin_tunvpn.plugin import TunVPNPlugin
from kairos_plugin_tunvpn.vpn import RELAY_ASK_DELAY
from kairos_plugin_tunvpn.relaydgram import (
    IDLE_TIMEOUT,
    RELAY_PROTOCOL,
    RelayLimits,
    RelayMessageError,
    RelayTable,
    decode,
    encode,
)
from kairos_plugin_tunvpn.vnet import GSO_TCPV4, NEEDS_CSUM
from test_tunvpn_dataplane import FakeTun, craft, wait_for
from tunvpn_nodes import vpn_config
from tunvpn_packets import icmp_echo, ipv4_tcp

VIP_A, VIP_B, VIP_R = "10.201.0.1", "10.201.0.2", "10.201.0.3"


@pytest.fixture(params=["c", "python"])
def trio_planes(request, monkeypatch):
    """A, B and R: sessions A-R and B-R over UDP, and A-B whose datagrams go to R's endpoint."""
    if request.param == "python":
        monkeypatch.setenv(fastpath.FASTPATH_ENV, "1")
    elif fastpath.GcmKey is None:
        pytest.skip("the C fast path is not built (needs a C compiler and libssl-dev)")
    tuns = {name: FakeTun() for name in "abr"}
    planes = {name: DataPlane(tun.device, ("127.0.0.1", 0)) for name, tun in tuns.items()}
    a, b, r = planes["a"], planes["b"], planes["r"]
    keys_ab = SessionKeys.derive(b"1" * 32, "a", "b")
    keys_ar = SessionKeys.derive(b"2" * 32, "a", "r")
    keys_br = SessionKeys.derive(b"3" * 32, "b", "r")
    a.add_peer("r", VIP_R, r.local_address, keys_ar)
    b.add_peer("r", VIP_R, r.local_address, keys_br)
    r.add_peer("a", VIP_A, a.local_address, keys_ar.mirror())
    r.add_peer("b", VIP_B, b.local_address, keys_br.mirror())
    # the pair's own session: R has no part in it; each end sends to R's endpoint
    a.add_peer("b", VIP_B, r.local_address, keys_ab)
    b.add_peer("a", VIP_A, r.local_address, keys_ab.mirror())
    table = RelayTable(RelayLimits(max_sessions=1, max_bytes=1 << 20, max_duration=60.0))
    r.relay = table
    assert table.open("a", a.local_address, keys_ab.send_key_id, "b", b.local_address, keys_ab.receive_key_id) is None
    for plane in planes.values():
        plane.start()
    try:
        yield tuns, planes, table
    finally:
        for plane in planes.values():
            plane.stop()
        for tun in tuns.values():
            tun.close()


def test_packets_cross_through_the_relay_both_ways_unopened(trio_planes):
    tuns, planes, table = trio_planes
    ping = bytes(icmp_echo())
    tuns["a"].inject(ping)
    assert tuns["b"].receive()[1] == ping
    pong = bytes(icmp_echo(src=bytes([10, 201, 0, 2]), dst=bytes([10, 201, 0, 1])))
    tuns["b"].inject(pong)
    assert tuns["a"].receive()[1] == pong
    relay = planes["r"].counters
    # R forwarded them and opened none: its own receive path never saw them
    # (counted just after the send: the pong can reach A first)
    assert wait_for(lambda: table.counters["relay_forwarded_sends"] == 2)
    assert relay["rx_packets"] == 0 and relay["drop_unknown_peer"] == 0
    assert planes["b"].source_of("a") == planes["r"].local_address  # B follows A's session to R


def test_a_tso_frame_crosses_the_relay_as_trains(trio_planes):
    tuns, planes, table = trio_planes
    payload = bytes(range(256)) * 200  # 38 segments of 1368
    tuns["a"].inject(bytes(ipv4_tcp(payload, flags=0x18)), GSO_TCPV4, 1368, partial=True)
    received = b""
    while len(received) < len(payload):  # one coalesced frame, or a few if a train was split
        header, packet = tuns["b"].receive()
        assert header[0] == NEEDS_CSUM
        received += packet[40:]
    assert received == payload and planes["b"].counters["rx_packets"] == 38
    # GRO hands R trains and R sends each on with one GSO send: fewer sends than datagrams
    # (counted just after each send: B can hold the last train before R counted it)
    assert wait_for(lambda: table.counters["relay_forwarded_sends"] > 0)
    time.sleep(0.2)
    assert table.counters["relay_forwarded_sends"] < 38


def test_a_datagram_the_relay_alters_is_dropped_and_counted_at_the_receiver(trio_planes):
    tuns, planes, table = trio_planes
    honest = table._send

    def tamper(sock, leg, data, size):
        altered = bytearray(data)
        altered[-1] ^= 1  # one bit of the tag
        honest(sock, leg, memoryview(altered), size)

    table._send = tamper
    tuns["a"].inject(bytes(icmp_echo()))
    assert wait_for(lambda: planes["b"].counters["drop_bad_tag"] == 1)
    assert planes["b"].counters["rx_packets"] == 0
    table._send = honest
    marker = bytes(icmp_echo(payload=b"marker"))
    tuns["a"].inject(marker)
    assert tuns["b"].receive()[1] == marker  # the altered one never reached B's TUN


def test_traffic_from_another_source_under_a_routed_key_id_is_not_relayed(trio_planes):
    tuns, planes, table = trio_planes
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.1", 0))
    try:
        # the key id of A's datagrams to B, from an address R has no session route for
        datagram = bytearray(100)
        datagram[0] = 1
        datagram[4:8] = planes["a"].send_key_id("b").to_bytes(4, "big")
        stranger.sendto(bytes(datagram), planes["r"].local_address)
        assert wait_for(lambda: planes["r"].counters["drop_unknown_peer"] == 1)  # R's own path dropped it
        assert table.counters["relay_forwarded_sends"] == 0
    finally:
        stranger.close()


def test_sessions_over_the_limit_are_refused_and_counted(trio_planes):
    _, planes, table = trio_planes
    assert table.open("a", ("127.0.0.1", 1), 7, "c", ("127.0.0.1", 2), 8) == "too many relay sessions"
    assert table.counters["relay_refused_too_many_relay_sessions"] == 1
    assert table.open("c", ("127.0.0.1", 1), 7, "d", ("127.0.0.1", 2), 8) is None  # others are not affected
    assert table.refusal("a", "a") is not None


def test_a_session_over_its_byte_limit_ends(trio_planes):
    tuns, planes, table = trio_planes
    payload = bytes(range(256)) * 200
    for _ in range(25):  # ~1.3 MB, over the 1 MiB limit
        tuns["a"].inject(bytes(ipv4_tcp(payload, flags=0x18)), GSO_TCPV4, 1368, partial=True)
    assert wait_for(lambda: table.counters["relay_ended_bytes"] == 1)
    assert table.sessions() == [] and table.sessions_of("a") == 0


def test_the_session_ends_when_a_peer_leaves_and_nothing_is_forwarded_after(trio_planes):
    tuns, planes, table = trio_planes
    tuns["a"].inject(bytes(icmp_echo()))
    tuns["b"].receive()
    assert wait_for(lambda: table.counters["relay_forwarded_sends"] == 1)
    assert table.end_peer("b", "left") == 1 and table.counters["relay_ended_left"] == 1
    sends = table.counters["relay_forwarded_sends"]
    tuns["a"].inject(bytes(icmp_echo(payload=b"after")))
    assert wait_for(lambda: planes["r"].counters["drop_unknown_peer"] == 1)  # not relayed: R's own path drops it
    assert table.counters["relay_forwarded_sends"] == sends


def test_a_session_ends_when_an_end_moves_or_outlives_its_duration():
    clock = [0.0]
    table = RelayTable(RelayLimits(max_duration=10.0), clock=lambda: clock[0])
    sources = {"a": ("127.0.0.1", 1), "b": ("127.0.0.1", 2)}
    assert table.open("a", sources["a"], 1, "b", sources["b"], 2) is None
    table.check(sources.get)
    assert table.sessions_of("a") == 1
    sources["a"] = ("127.0.0.1", 3)  # A's NAT mapping towards R changed
    table.check(sources.get)
    assert table.sessions_of("a") == 0 and table.counters["relay_ended_moved"] == 1
    assert table.open("a", sources["a"], 1, "b", sources["b"], 2) is None
    clock[0] = 11.0
    table.check(sources.get)
    assert table.sessions() == [] and table.counters["relay_ended_duration"] == 1


def test_a_session_that_forwards_nothing_for_a_minute_ends():
    clock = [0.0]
    table = RelayTable(RelayLimits(), clock=lambda: clock[0])
    sources = {"a": ("127.0.0.1", 1), "b": ("127.0.0.1", 2)}
    assert table.open("a", sources["a"], 1, "b", sources["b"], 2) is None
    clock[0] = IDLE_TIMEOUT - 1
    table.check(sources.get)
    assert table.sessions_of("a") == 1
    clock[0] = IDLE_TIMEOUT + 1
    table.check(sources.get)
    assert table.sessions_of("a") == 0 and table.counters["relay_ended_idle"] == 1


def test_a_pair_asking_again_under_the_same_keys_renews_its_session_and_no_other_pair_takes_its_routes():
    table = RelayTable(RelayLimits())
    sources = {"a": ("127.0.0.1", 1), "b": ("127.0.0.1", 2), "c": ("127.0.0.1", 3)}
    assert table.open("a", sources["a"], 1, "b", sources["b"], 2) is None
    # both ends asked (or the same end again) while the first session still stands
    assert table.open("b", sources["b"], 2, "a", sources["a"], 1) is None
    assert table.sessions_of("a") == 1 and table.counters["relay_ended_renewed"] == 1
    assert table.counters["relay_refused_route_in_use"] == 0
    # a third peer naming one of the pair's routes is refused: it cannot steal A's datagrams
    assert table.open("c", sources["c"], 5, "b", sources["b"], 2) == "route in use"
    assert table.counters["relay_refused_route_in_use"] == 1 and table.sessions_of("c") == 0


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[" * 5000,
        b"null",
        b'{"op": 3}',
        b'{"op": "open", "key": -1}',
        b'{"op": "open", "key": true}',
        b'{"op": "open", "peer": 5}',
        b'{"op": "open", "key": 4294967296}',
        b"\xff\xfe",
    ],
)
def test_garbage_control_messages_are_a_typed_error(data):
    with pytest.raises(RelayMessageError):
        decode(data)


def test_control_messages_round_trip():
    assert decode(encode("open", peer="b", key=7)) == {"op": "open", "peer": "b", "key": 7}


async def test_a_relay_node_refuses_what_its_config_and_limits_do_not_allow_and_counts_it(network, fakes):
    """Four in-process nodes (real libp2p streams, data planes on loopback): R relays for A and B,
    then refuses a second session of A's (``p2p.relay.max_circuits: 1``), a forged offer, garbage
    and everything once ``vpn.relay`` is off — counting each, and serving on."""
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    overrides = {**vpn_config(relay="always"), "p2p": {"relay": {"max_circuits": 1}}}
    nodes = [await network.add_node(plugins=[plugin], overrides=overrides) for _ in range(4)]
    r, a, b, c = (plugin.vpn_of(node) for node in nodes)
    await network.wait_for(
        lambda: (
            all(len(v.links) == 3 for v in (r, a, b, c))
            and all(link.path == "direct" and r.plane.source_of(p) for p, link in r.links.items())
        ),
        timeout=30,
    )
    stream = await nodes[1].open_stream(r.peer_id, RELAY_PROTOCOL)
    await stream.write_frame(b"\xff not json")
    await network.wait_for(lambda: r.counters["vpn_relay_bad_messages"] == 1, timeout=10)
    stream = await nodes[1].open_stream(r.peer_id, RELAY_PROTOCOL)
    await stream.write_frame(b"{" * 4096)  # over the 1 KiB a request may take
    await network.wait_for(lambda: r.counters["vpn_relay_bad_messages"] == 2, timeout=10)
    # Under load a direct path may drop for a moment and a node ask R on its own (every node may
    # relay here): start from an empty table, and count refusals from here on.
    for node in (a, b, c):
        r.relay_table.end_peer(node.peer_id, "test")
    refused_before = r.counters["relay_refused_too_many_relay_sessions"]
    assert await r._relay_open(a.peer_id, b.peer_id, a.plane.send_key_id(b.peer_id)) is None
    assert r.relay_table.sessions_of(a.peer_id) == 1 and b.links[a.peer_id].relay == r.peer_id
    refused = await r._relay_open(a.peer_id, c.peer_id, a.plane.send_key_id(c.peer_id))
    assert refused == "too many relay sessions"
    assert r.counters["relay_refused_too_many_relay_sessions"] == refused_before + 1
    # an offer under a key id that is not the session's: C refuses it (and keeps any relay it
    # has: under load, B may have asked one for a moment of its own)
    relay_before = c.links[b.peer_id].relay
    assert decode(c._relay_offered(r.peer_id, b.peer_id, (b.plane.send_key_id(c.peer_id) + 1) % (1 << 32)))["op"] == "refuse"
    assert c.counters["vpn_relay_offers_refused"] == 1 and c.links[b.peer_id].relay == relay_before
    r.settings = replace(r.settings, relay="off")
    assert await r._relay_open(c.peer_id, b.peer_id, c.plane.send_key_id(b.peer_id)) == "not a relay"
    assert r.counters["relay_refused_not_a_relay"] == 1
    # A leaves R's VPN: its relay session ends
    r._drop_session(a.peer_id, "test")
    assert r.relay_table.sessions() == [] and r.counters["relay_ended_left"] == 1


def test_a_train_of_relayed_datagrams_ending_in_one_of_the_relays_own_delivers_both(trio_planes):
    tuns, planes, table = trio_planes
    keys_ab = SessionKeys.derive(b"1" * 32, "a", "b")
    keys_ar = SessionKeys.derive(b"2" * 32, "a", "r")
    vip = {name: bytes(int(x) for x in address.split(".")) for name, address in (("a", VIP_A), ("b", VIP_B), ("r", VIP_R))}
    relayed = [craft(keys_ab, 100 + i, bytes(icmp_echo(src=vip["a"], dst=vip["b"], payload=b"r%d" % i * 100))) for i in range(2)]
    own = craft(keys_ar, 100, bytes(icmp_echo(src=vip["a"], dst=vip["r"], payload=b"own")))
    assert len(own) < len(relayed[0])
    # one GSO train from A's socket, as the kernel may hand it to R whole: two relayed, then R's own
    ancillary = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("=H", len(relayed[0])))]
    planes["a"]._sock.sendmsg([b"".join(relayed) + own], ancillary, 0, planes["r"].local_address)
    assert {tuns["b"].receive()[1][28:31] for _ in range(2)} == {b"r0r", b"r1r"}
    assert tuns["r"].receive()[1][28:] == b"own"
    # it came as one train: the two relayed datagrams went on with one send
    assert wait_for(lambda: table.counters["relay_forwarded_sends"] == 1) and table.counters["relay_drop_unrouted"] == 0


def test_relayed_datagrams_beside_direct_ones_leave_the_session_where_the_peer_is(trio_planes):
    """B knows A's datagrams from R are relayed: they move relay_heard, never the session's own
    endpoint, and a direct (punched) path next to the relayed one costs no roaming tokens."""
    tuns, planes, table = trio_planes
    a, b, r = planes["a"], planes["b"], planes["r"]
    b.set_relayed_from("a", r.local_address)
    sequence = [r.local_address, b.local_address, r.local_address, b.local_address, r.local_address]
    for number, endpoint in enumerate(sequence):
        a.set_endpoint("b", endpoint)
        marker = bytes(icmp_echo(payload=b"n%d" % number))
        tuns["a"].inject(marker)
        assert tuns["b"].receive()[1] == marker
    assert b.source_of("a") == a.local_address  # where A is: not the relay it was last heard through
    assert b.counters["roams"] == 1 and b.counters["drop_roam_limited"] == 0  # one move, to A's own address
    assert b.relay_heard("a") is not None and b.udp_heard("a") is not None
    assert wait_for(lambda: table.counters["relay_forwarded_sends"] == 3)  # counted just after the send


async def test_a_granted_relay_is_no_path_until_something_comes_through_it(network, fakes):
    """Three in-process nodes: R offers C to relay B's datagrams and forwards nothing (an insider,
    or a relay that broke). C accepts, but its ladder is offered no relayed path, and once the
    grant lapses unused, R's next offer meets the back-off."""
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    nodes = [await network.add_node(plugins=[plugin], overrides=vpn_config(relay="always")) for _ in range(3)]
    r, b, c = (plugin.vpn_of(node) for node in nodes)
    await network.wait_for(
        lambda: all(len(v.links) == 2 and all(link.path == "direct" for link in v.links.values()) for v in (r, b, c)),
        timeout=30,
    )
    offer = decode(c._relay_offered(r.peer_id, b.peer_id, c.plane.receive_key_id(b.peer_id)))
    assert offer["op"] == "accept" and c.links[b.peer_id].relay == r.peer_id
    link = c.links[b.peer_id]
    assert c._relay_paths(b.peer_id, time.monotonic()) == []  # granted, nothing heard through it
    later = link.relay_since + c.settings.udp_timeout + 1
    assert c._relay_paths(b.peer_id, later) == [] and link.relay is None  # given up unused
    again = decode(c._relay_offered(r.peer_id, b.peer_id, c.plane.receive_key_id(b.peer_id)))
    assert again["op"] == "refuse" and "lately" in again["reason"] and link.relay is None


async def test_a_new_link_asks_for_a_relay_only_once_udp_had_time_to_answer(network, fakes):
    """Every link starts on the stream; the side that initiates key exchanges asks a relay only
    once UDP had RELAY_ASK_DELAY to answer its first probes (on a LAN it always does)."""
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    nodes = [await network.add_node(plugins=[plugin], overrides=vpn_config(relay="always")) for _ in range(3)]
    vpns = [plugin.vpn_of(node) for node in nodes]
    await network.wait_for(
        lambda: all(len(v.links) == 2 and all(link.path == "direct" for link in v.links.values()) for v in vpns), timeout=30
    )
    asker, peer = next((a, b) for a in vpns for b in vpns if a is not b and keyexchange.initiates(a.peer_id, b.peer_id))
    link = asker.links[peer.peer_id]
    now = time.monotonic()
    link.keys_installed_at = now  # a link just made, still on the stream
    asker._maybe_ask_relay(peer.peer_id, link, now)
    assert not link.relay_asking
    asker._maybe_ask_relay(peer.peer_id, link, now + RELAY_ASK_DELAY)
    assert link.relay_asking  # the third node relays for the pair
