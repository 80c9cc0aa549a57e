"""What idle gossip costs: traffic counters, one delivery per message, no signed records, batched
yamux window updates (kairos_core/p2p/traffic.py, traps 13-15), no connection a stream or a PRUNE
opened by itself (trap 17) — on real hosts over loopback."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

import pytest

from kairos_core.p2p import traps
from kairos_testing.hosts import HostFactory, collector, publish_until_received, until

TOPIC = "traffic-test"
MESHSUB = "/meshsub/1.1.0"


async def _full_mesh(factory: HostFactory, n: int):
    made = [await factory.host() for _ in range(n)]
    received: collections.Counter = collections.Counter()
    for index, host in enumerate(made):

        async def handler(peer: str, data: bytes, index=index) -> None:
            received[(index, data)] += 1

        host.subscribe(TOPIC, handler)
    for i in range(n):
        for j in range(i + 1, n):
            await made[j].connect(made[i].addresses())
    return made, received


async def _pair(factory: HostFactory):
    """Two connected hosts on TOPIC whose mesh carries messages (a publishes, b's inbox collects)."""
    a, b = await factory.host(), await factory.host()
    inbox, handler = collector()
    b.subscribe(TOPIC, handler)
    a.subscribe(TOPIC, lambda peer, data: None)
    await b.connect(a.addresses())
    await publish_until_received(a, TOPIC, inbox, b"first")
    await asyncio.sleep(0.5)
    return a, b, inbox


async def test_counters_say_bytes_and_streams_per_protocol_and_what_gossip_rpcs_hold(hosts):
    a, b, inbox = await _pair(hosts)
    sent_before, got_before = a.counters[f"out_bytes:{MESHSUB}"], b.counters[f"in_bytes:{MESHSUB}"]
    messages_before = a.counters["gossip_out_messages"]
    for i in range(10):
        await a.publish(TOPIC, bytes([i]) * 1000)
    for _ in range(10):
        await asyncio.wait_for(inbox.get(), 10)
    await asyncio.sleep(0.2)
    sent = a.counters[f"out_bytes:{MESHSUB}"] - sent_before
    assert a.counters["gossip_out_messages"] - messages_before == 10
    assert 10_000 < sent < 12_000  # payloads plus a small envelope each
    assert b.counters[f"in_bytes:{MESHSUB}"] - got_before == sent  # what one side wrote, the other read
    assert a.counters[f"streams:{MESHSUB}"] >= 1 and a.counters["out_bytes:/kairos/admit/1.0.0"] > 0
    # py-libp2p put a ~210-byte signed peer record on each of these RPCs (trap 14)
    assert a.counters["gossip_out_sender_record_bytes"] == 0 and a.counters["gossip_out_rpcs"] >= 10


async def test_each_message_is_delivered_once_and_forwarded_at_most_once_per_peer(hosts):
    made, received = await _full_mesh(hosts, 4)
    await asyncio.sleep(3)  # meshes graft on the first heartbeats
    before = [host.counters["gossip_out_messages"] for host in made]
    payloads = [bytes([i]) * 300 for i in range(10)]
    for payload in payloads:
        await made[0].publish(TOPIC, payload)
    deadline = asyncio.get_running_loop().time() + 10
    while not all((index, p) in received for index in (1, 2, 3) for p in payloads):
        assert asyncio.get_running_loop().time() < deadline, "not every message arrived"
        await asyncio.sleep(0.1)
    await asyncio.sleep(1)
    assert all(received[(index, p)] == 1 for index in (1, 2, 3) for p in payloads)
    forwarded = [host.counters["gossip_out_messages"] - b for host, b in zip(made, before)]
    assert forwarded[0] <= 3 * len(payloads)  # the publisher: once to each peer
    assert all(f <= 2 * len(payloads) for f in forwarded[1:])  # everyone else: never back to its source


async def test_copies_of_one_message_that_arrive_together_are_validated_once():
    validated = []
    release = asyncio.Event()
    seen: set[bytes] = set()
    refuse_from = {"a"}  # the first copy's forwarder is refused (not admitted yet, say)

    class Pubsub:
        @staticmethod
        def _msg_id_constructor(msg):
            return msg

        async def push_msg(self, forwarder, msg):  # libp2p's: seen check, validators, then mark seen
            if msg in seen:
                return
            validated.append((forwarder, msg))
            await release.wait()
            if forwarder not in refuse_from:
                seen.add(msg)

    pubsub, counters = Pubsub(), collections.Counter()
    traps.validate_each_message_once(pubsub, counters, event=asyncio.Event)
    copies = [asyncio.ensure_future(pubsub.push_msg(forwarder, b"id-1")) for forwarder in "abcd"]
    other = asyncio.ensure_future(pubsub.push_msg("b", b"id-2"))
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(*copies, other)
    # a's copy was refused, so b's was validated after it; c's and d's then met the seen-cache
    assert validated == [("a", b"id-1"), ("b", b"id-2"), ("b", b"id-1")]
    assert counters["gossip_duplicates_in_flight"] == 3 and seen == {b"id-1", b"id-2"}


async def test_small_gossip_messages_cost_no_yamux_window_updates(hosts, monkeypatch):
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    updates = collections.Counter()
    original = YamuxStream.send_window_update

    async def counted(self, increment, skip_lock=False):
        updates[increment] += 1
        return await original(self, increment, skip_lock)

    monkeypatch.setattr(YamuxStream, "send_window_update", counted)
    a, b, inbox = await _pair(hosts)
    updates.clear()
    for i in range(50):
        await a.publish(TOPIC, bytes([i]) * 500)
    for _ in range(50):
        await asyncio.wait_for(inbox.get(), 10)
    # 25 KB read: far less than half a 256 KiB window, so no update (py-libp2p sent 2-3 per message)
    assert sum(updates.values()) == 0
    # a large transfer still gets its window back: the stream does not stall
    for i in range(8):
        await a.publish(TOPIC, bytes([100 + i]) * 60_000)
    for _ in range(8):
        await asyncio.wait_for(inbox.get(), 20)
    assert sum(updates.values()) >= 1


async def test_the_sender_record_is_built_rarely_and_subscriptions_still_carry_a_valid_one(hosts):
    # _pair's first message arrives only if b accepted a's subscription RPC, whose sender record
    # libp2p parses (an unparsable one drops the RPC, subscriptions and all)
    a, b, inbox = await _pair(hosts)
    calls = collections.Counter()
    libp2p_host = a._host
    original = libp2p_host.get_addrs

    def counted_get_addrs():
        calls["get_addrs"] += 1
        return original()

    libp2p_host.get_addrs = counted_get_addrs
    got = set()
    try:
        for i in range(50):
            await a.publish(TOPIC, b"record-%d" % i)
        while len(got) < 50:
            _, data = await asyncio.wait_for(inbox.get(), 10)
            got.add(data)
    finally:
        libp2p_host.get_addrs = original
    assert got == {b"record-%d" % i for i in range(50)}
    # libp2p built the record (a pass over the listen addresses) for each of the 50 RPCs; reused
    # for SENDER_RECORD_REUSE seconds, it is built at most once or twice in this second
    assert calls["get_addrs"] <= 3, calls


async def test_a_stream_to_a_peer_with_no_connection_does_not_dial_it(hosts):
    # libp2p's new_stream dials a peer it is not connected to (trap 17): pubsub, the DHT's table
    # pings and syncs racing a trim reopened connections the connection manager had closed
    from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL
    from libp2p.network.exceptions import SwarmException
    from libp2p.peer.id import ID

    a, b = await hosts.host(), await hosts.host()
    await a.connect(b.addresses())
    await until(lambda: b.is_admitted(a.peer_id), "b admits a")
    admitted_before = b.counters["admission_ok"]
    await a.disconnect(b.peer_id)
    await until(lambda: not b.is_admitted(a.peer_id), "b sees a gone")

    async def open_on_a_libp2p(protocol: str) -> Any:
        return await a._host.new_stream(ID.from_base58(b.peer_id), [protocol])

    with pytest.raises(SwarmException, match="streams do not dial"):
        await a._bridge.call(open_on_a_libp2p, "/meshsub/1.1.0")
    assert a.counters["implicit_dials_refused"] == 1
    assert not a.is_admitted(b.peer_id) and b.counters["admission_ok"] == admitted_before
    # Kademlia's walks must reach peers beyond the neighbours: its streams still dial
    with contextlib.suppress(Exception):  # (b's answer to an empty stream does not matter)
        await a._bridge.call(open_on_a_libp2p, str(KAD_PROTOCOL))
    await until(lambda: b.is_admitted(a.peer_id), "a Kademlia stream dialled b and was admitted")
    assert a.counters["implicit_dials_refused"] == 1


async def test_gossipsub_dials_none_of_the_peers_a_prune_names(hosts):
    # peer exchange would dial, past our dialler, whatever peers an insider's PRUNE listed
    import multiaddr
    from libp2p.peer.id import ID
    from libp2p.pubsub.pb import rpc_pb2

    a, b, c = await hosts.host(), await hosts.host(), await hosts.host()
    await a.connect(b.addresses())
    await until(lambda: a.is_admitted(b.peer_id), "a admits b")

    async def prune_naming_c() -> None:
        a._host.get_peerstore().add_addrs(ID.from_base58(c.peer_id), [multiaddr.Multiaddr(x) for x in c.addresses()], 3600)
        prune = rpc_pb2.ControlPrune(topicID="anything", peers=[rpc_pb2.PeerInfo(peerID=ID.from_base58(c.peer_id).to_bytes())])
        await a._pubsub.router.handle_prune(prune, ID.from_base58(b.peer_id))

    await a._bridge.call(prune_naming_c)
    await asyncio.sleep(1.0)  # (a dial on loopback would be admitted well within this)
    assert not a.is_admitted(c.peer_id) and c.counters["admission_ok"] == 0


async def test_libp2p_s_auto_connector_dials_nobody(hosts):
    # with our watermarks it would dial peerstore peers up to 150 connections every 30 s (trap 18)
    import multiaddr
    from libp2p.peer.id import ID

    a, b = await hosts.host(), await hosts.host()

    async def b_in_the_peerstore_then_a_round() -> None:
        network = a._host.get_network()
        network.peerstore.add_addrs(ID.from_base58(b.peer_id), [multiaddr.Multiaddr(x) for x in b.addresses()], 3600)
        await network.auto_connector.maybe_connect()

    await a._bridge.call(b_in_the_peerstore_then_a_round)
    await asyncio.sleep(1.0)  # (a dial on loopback would be admitted well within this)
    assert not a.is_admitted(b.peer_id) and b.counters["admission_ok"] == 0
