"""mDNS discovery: names per window, the TXT codec, and real multicast between lab namespaces."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_core.discovery.mdns import (
    ANSWER_WINDOW,
    LOOK_LIMIT,
    MAX_ADDRS,
    ROTATION_PACKETS,
    SERVICE_TYPE,
    Announcement,
    MalformedAnnouncement,
    MDNSDiscovery,
    decode_txt,
    encode_txt,
    instance_matches,
    instance_name,
    node_tag,
    pack_txt,
    split_instance,
    unpack_txt,
    usable_multiaddr,
)
from kairos_core.identity import Identity
from kairos_core.keys import KeySchedule
from kairos_core.token import generate_token

from mdns_probe import discover_lan, full_discovery_times


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


PEER = Identity.generate().peer_id
OTHER = Identity.generate().peer_id


def addr(ip: str, peer: str = PEER, port: int = 4001) -> str:
    return f"/ip4/{ip}/tcp/{port}/p2p/{peer}"


def _noop(peer_id: str, addrs: list[str]) -> None:
    pass


# --- instance names ------------------------------------------------------------------------------
def test_instance_name_is_rendezvous_plus_peer_tag() -> None:
    rendezvous = "0123456789abcdef0123456789abcdef"
    name = instance_name(rendezvous, PEER)
    assert name == f"{rendezvous}-{node_tag(PEER)}"
    assert len(node_tag(PEER)) == 12 and node_tag(PEER) != node_tag(OTHER)
    assert split_instance(name) == (rendezvous, node_tag(PEER))
    assert split_instance(f"{name}.{SERVICE_TYPE}") == (rendezvous, node_tag(PEER))


@pytest.mark.parametrize(
    "name",
    [
        "",
        "printer",
        "0123456789abcdef0123456789abcdef",
        "0123456789ABCDEF0123456789ABCDEF-0123456789ab",
        "0123456789abcdef0123456789abcdef-0123456789a",
        "0123456789abcdef0123456789abcdef-0123456789abc",
        "x0123456789abcdef0123456789abcdef-0123456789ab",
        "0123456789abcdef0123456789abcdef-0123456789ab.other",
    ],
)
def test_foreign_instance_names_do_not_split(name: str) -> None:
    assert split_instance(name) is None
    assert not instance_matches(name, ["0123456789abcdef0123456789abcdef"])


def test_a_name_is_accepted_from_the_window_before_to_the_window_after() -> None:
    clock = FakeClock(1_000_000.0)
    schedule = KeySchedule(generate_token(interval=2), clock=clock)
    discovery = MDNSDiscovery(schedule, PEER, [addr("10.0.0.1")], _noop)
    w = schedule.dht_window()
    name = instance_name(schedule.rendezvous(w), OTHER)
    verdicts = {}
    for step in (-2, -1, 0, 1, 2, 3):
        clock.now = 1_000_000.0 + 2 * step
        verdicts[step] = instance_matches(name, discovery.accepted_rendezvous())
    assert verdicts == {-2: False, -1: True, 0: True, 1: True, 2: False, 3: False}


def test_another_token_never_matches() -> None:
    clock = FakeClock(5_000_000.0)
    ours = KeySchedule(generate_token(interval=2), clock=clock)
    theirs = KeySchedule(generate_token(interval=2), clock=clock)
    accepted = set()
    for step in range(10):
        clock.now = 5_000_000.0 + 2 * step
        accepted |= set(ours.current_rendezvous())
    their_names = [instance_name(theirs.rendezvous(theirs.dht_window() - k), OTHER) for k in range(12)]
    assert not any(instance_matches(n, accepted) for n in their_names)


# --- TXT record ----------------------------------------------------------------------------------
def test_txt_round_trip() -> None:
    addrs = [addr("10.0.0.1"), "/ip6/fd00::1/udp/4001/quic-v1/p2p/" + PEER, "/dns4/node.lan/tcp/4001"]
    props = encode_txt(PEER, addrs)
    assert decode_txt(pack_txt(props)) == Announcement(PEER, tuple(addrs))
    assert decode_txt(props) == Announcement(PEER, tuple(addrs))


def test_long_address_lists_are_split_into_short_txt_strings() -> None:
    addrs = [addr(f"10.1.{i}.{i}", port=4000 + i) for i in range(MAX_ADDRS + 5)]
    props = encode_txt(PEER, addrs)
    assert len([k for k in props if k.startswith(b"a")]) > 5
    assert all(len(k) + 1 + len(v) <= 255 for k, v in props.items())
    decoded = decode_txt(pack_txt(props))  # pack_txt itself refuses strings over 255 bytes
    assert decoded.addrs == tuple(addrs[:MAX_ADDRS])


def test_wildcard_addresses_are_never_announced() -> None:
    props = encode_txt(PEER, ["/ip4/0.0.0.0/tcp/4001", addr("10.0.0.7"), "/ip6/::/tcp/4001"])
    assert decode_txt(props).addrs == (addr("10.0.0.7"),)
    with pytest.raises(ValueError):
        encode_txt(PEER, ["/ip4/0.0.0.0/tcp/4001", "/ip6/::/udp/1/quic-v1"])


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"\x05v=1id",  # string runs past the end
        b"\x03v=2\x05id=xy",  # unknown version
        b"\x03v=1\x0ca0=/ip4/1.2.3.4",  # no peer id
        b"\x03v=1\x0bid=notapeer\x14a0=/ip4/1.2.3.4/tcp/1",  # not a peer id
        pack_txt({b"v": b"1", b"id": PEER.encode()}),  # no address
        pack_txt({b"v": b"1", b"id": PEER.encode(), b"a0": "/ip4/1.2.3.4/tcp/1\u00e9".encode()}),  # not ASCII
        pack_txt({b"v": b"1", b"id": PEER.encode(), b"a0": b"/ip4/0.0.0.0/tcp/1"}),  # wildcard only
        pack_txt({b"v": b"1", b"id": PEER.encode(), b"a0": addr("10.0.0.1", peer=OTHER).encode()}),  # someone else's
        pack_txt({b"v": b"1", b"id": PEER.encode(), b"a0": b"ip4/1.2.3.4"}),  # not a multiaddr
        pack_txt({b"v": b"1", b"id": PEER.encode(), b"a1": addr("10.0.0.1").encode()}),  # chunks must start at a0
        b"\xff" * 10_000,  # oversized
    ],
)
def test_malformed_txt_is_rejected(text: bytes) -> None:
    with pytest.raises(MalformedAnnouncement):
        decode_txt(text)


def test_bad_addresses_are_dropped_and_good_ones_kept() -> None:
    chunk = " ".join([addr("10.0.0.1", peer=OTHER), "junk", addr("10.0.0.2"), "/ip4/999.1.1.1/tcp/1"])
    props = {b"v": b"1", b"id": PEER.encode(), b"a0": chunk.encode()}
    assert decode_txt(props).addrs == (addr("10.0.0.2"),)


@pytest.mark.parametrize("text", ["/ip4/10.0.0.1/tcp/1", "/ip6/fd00::2/udp/9/quic-v1", "/dns4/a.b/tcp/1/ws"])
def test_usable_multiaddrs(text: str) -> None:
    assert usable_multiaddr(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ip4/1.2.3.4",
        "/ip4/1.2.3.4/tcp",
        "/ip4/::1/tcp/1",
        "/ip6/0.0.0.0/tcp/1",
        "/ip4/0.0.0.0/tcp/1",
        "/ip4/1.2.3.4/tcp/1 x",
        None,
        42,
    ],
)
def test_unusable_multiaddrs(text: object) -> None:
    assert not usable_multiaddr(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_crash_the_decoder(text: bytes) -> None:
    try:
        result = decode_txt(text)
    except MalformedAnnouncement:
        return
    assert isinstance(result, Announcement)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([b"v", b"id", b"a0", b"a1", b"a2", b"x"]),
        st.one_of(st.none(), st.binary(max_size=80), st.sampled_from([b"1", PEER.encode()])),
    )
)
def test_random_properties_never_crash_the_decoder(props: dict) -> None:
    try:
        decode_txt(props)
    except MalformedAnnouncement:
        pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=255), max_size=30))
def test_unpack_inverts_pack(items: list[bytes]) -> None:
    wire = b"".join(bytes((len(i),)) + i for i in items)
    props = unpack_txt(wire)
    for item in items:
        if item:
            assert item.partition(b"=")[0] in props


async def test_start_refuses_to_announce_wildcards_only() -> None:
    schedule = KeySchedule(generate_token())
    discovery = MDNSDiscovery(schedule, PEER, lambda: ["/ip4/0.0.0.0/tcp/4001"], _noop)
    with pytest.raises(ValueError):
        await discovery.start()
    assert not discovery.running
    await discovery.stop()  # harmless when never started


# --- real multicast in namespaces ----------------------------------------------------------------
@pytest.mark.netns
async def test_five_nodes_find_each_other_and_a_stranger_stays_out(netlab) -> None:
    lab = netlab(6)
    ours, theirs = generate_token().encode(), generate_token().encode()
    tokens = {i: ours for i in range(1, 6)} | {6: theirs}
    results = await discover_lan(lab, tokens, timeout=20, linger=1.5)
    for r in results.values():
        assert r.returncode == 0, r.stderr
    members = range(1, 6)
    ids = {i: results[i].peer_id for i in members}
    stranger = results[6].peer_id
    for i in members:
        others = {ids[j]: [addr(lab.address(j), ids[j])] for j in members if j != i}
        assert results[i].found_addrs == others, f"node {i}"
        assert results[i].counters["foreign"] >= 1  # it did hear the stranger, and ignored it
        assert results[i].counters["malformed"] == 0
    assert results[6].found == {}
    assert results[6].counters["foreign"] >= 5  # the stranger heard all five, and ignored them
    assert all(stranger not in results[i].found for i in members)
    times = full_discovery_times(results, list(members))
    assert times is not None
    print("mdns 5-node full discovery:", json.dumps({k: round(v, 3) for k, v in times.items()}))


@pytest.mark.netns
async def test_garbage_announcements_are_counted_and_harmless(netlab) -> None:
    lab = netlab(3)
    token = generate_token().encode()
    results = await discover_lan(
        lab, {1: token, 2: token, 3: token}, timeout=15, linger=1.0, extra_args={3: ["--garbage"]}, delays={1: 1.0, 2: 1.0}
    )
    for i in (1, 2):
        assert results[i].returncode == 0, results[i].stderr
        assert set(results[i].found) == {results[3 - i].peer_id}
        assert results[i].counters["malformed"] == 4


@pytest.mark.netns
@pytest.mark.slow
async def test_rotation_reregisters_and_late_joiners_find_the_new_name(netlab) -> None:
    lab = netlab(3)
    token = generate_token(interval=2).encode()
    # Node 3 starts after at least two window boundaries: it accepts neither of the names that
    # nodes 1 and 2 registered first, so it can only find them under their rotated names.
    results = await discover_lan(lab, {1: token, 2: token, 3: token}, timeout=20, linger=0.5, poll=0.2, delays={3: 4.5})
    for i in (1, 2, 3):
        r = results[i]
        assert r.returncode == 0, r.stderr
        assert set(r.found) == {results[j].peer_id for j in (1, 2, 3) if j != i}, f"node {i}"
    for i in (1, 2):
        rotations = results[i].counters["rotations"]
        assert rotations >= 2
        assert results[i].counters["registrations"] == rotations + 1
        # zeroconf's 3 announcements at start, then ROTATION_PACKETS a rotation (the last one's
        # second announcement may not have gone out before the stop); unregister and register
        # sent 6
        at_rotations = results[i].counters["broadcasts"] - 3
        assert ROTATION_PACKETS * rotations - 1 <= at_rotations <= ROTATION_PACKETS * rotations, results[i].counters


@pytest.mark.netns
@pytest.mark.slow
async def test_a_peer_whose_clock_runs_ahead_is_found(netlab) -> None:
    lab = netlab(2)
    token = generate_token(interval=4).encode()
    # Node 2 lives 3 s ahead: most of the time its name is one window ahead of node 1's.
    results = await discover_lan(
        lab, {1: token, 2: token}, timeout=20, linger=0.5, poll=0.2, extra_args={2: ["--clock-offset", "3"]}
    )
    for i in (1, 2):
        assert results[i].returncode == 0, results[i].stderr
        assert set(results[i].found) == {results[3 - i].peer_id}, f"node {i}"


@pytest.mark.netns
async def test_a_joiner_has_found_the_lan_by_the_time_discovery_says_it_looked(netlab) -> None:
    """``looked()`` (what tells the election that a node which found nobody is alone) turns true
    once the node's own announcement has come back and the answer window passed: by then a
    joiner has found every node already on the LAN — not by the fallback limit."""
    lab = netlab(5)
    token = generate_token().encode()
    results = await discover_lan(lab, dict.fromkeys(range(1, 6), token), timeout=20, linger=0.5, delays={5: 2.0})
    for i, r in results.items():
        assert r.returncode == 0, r.stderr
        assert r.t_looked is not None and r.t_starting is not None, f"node {i}"
        assert r.counters["own"] >= 1  # it heard itself ...
        assert ANSWER_WINDOW <= r.t_looked - r.t_starting < LOOK_LIMIT, f"node {i}"  # ... and looked so
    joiner = results[5]
    assert joiner.t_looked is not None
    assert len(joiner.found) == 4
    late = {peer: round(t - joiner.t_looked, 3) for peer, t in joiner.found.items() if t > joiner.t_looked}
    assert not late, late
