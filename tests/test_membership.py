"""Membership: joined/left/updated from connections and heartbeats, in order, on our own clock."""

from __future__ import annotations

from kairos_core.identity import Identity
from kairos_core.membership import MAX_NEIGHBOURS, Membership


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def make(ttl: float = 30.0):
    clock = Clock()
    events = []

    async def emit(event):
        events.append((event.kind, event.peer_id, event.info.get("hostname")))

    membership = Membership("me", emit, ttl=ttl, clock=clock)
    membership.start()
    return membership, clock, events


async def test_connection_then_entry_then_disconnect():
    membership, clock, events = await make()
    membership.connected("p1")
    membership.entry_changed("p1", {"hostname": "a", "beat": 1})
    membership.entry_changed("p1", {"hostname": "a", "beat": 2})  # heartbeat only: no event
    membership.entry_changed("p1", {"hostname": "b", "beat": 3})
    membership.disconnected("p1")  # nothing heard since: gone at once, no TTL wait
    await membership.drain()
    assert events == [("joined", "p1", "a"), ("updated", "p1", "b"), ("left", "p1", "b")]
    assert membership.alive() == {}
    await membership.stop()


async def test_a_connected_peer_without_entry_joins_after_a_grace():
    membership, clock, events = await make()
    membership.connected("p0")
    membership.expire()
    assert not membership.is_alive("p0")
    clock.now += 2.5
    membership.expire()
    await membership.drain()
    assert events == [("joined", "p0", None)] and membership.is_alive("p0")
    await membership.stop()


def peers(n: int) -> list[str]:
    return [Identity.generate().peer_id for _ in range(n)]


async def test_an_identity_nobody_vouches_for_is_never_a_member():
    membership, clock, events = await make()
    fake, real = peers(2)
    membership.entry_changed(fake, {"hostname": "made-up", "neighbours": [real]})  # signs only its own entry
    membership.expire()
    await membership.drain()
    assert not membership.is_alive(fake) and events == []
    assert membership.recently_alive(300) == set()
    await membership.stop()


async def test_a_peer_vouched_for_by_a_neighbour_lives_while_the_voucher_does():
    membership, clock, events = await make(ttl=30)
    near, far = peers(2)
    membership.connected(near)
    membership.entry_changed(near, {"hostname": "near", "neighbours": [far]})
    membership.entry_changed(far, {"hostname": "far", "neighbours": [near]})
    await membership.drain()
    assert membership.is_alive(far)  # never connected to us: reached through near
    clock.now += 29
    membership.entry_changed(near, {"hostname": "near", "neighbours": [far], "beat": 2})
    clock.now += 29
    membership.expire()
    assert membership.is_alive(far)
    membership.entry_changed(near, {"hostname": "near", "neighbours": [], "beat": 3})  # near lost it
    await membership.drain()
    assert not membership.is_alive(far) and membership.is_alive(near)
    assert events == [("joined", near, "near"), ("joined", far, "far"), ("left", far, "far")]
    await membership.stop()


async def test_vouchers_chain_and_a_stale_entry_vouches_for_nobody():
    membership, clock, events = await make(ttl=30)
    a, b, c = peers(3)
    membership.connected(a)
    membership.entry_changed(a, {"hostname": "a", "neighbours": [b]})
    membership.entry_changed(b, {"hostname": "b", "neighbours": [a, c]})
    membership.entry_changed(c, {"hostname": "c", "neighbours": [b]})
    membership.expire()
    assert membership.alive().keys() == {a, b, c}
    clock.now += 20
    membership.entry_changed(a, {"hostname": "a", "neighbours": [b], "beat": 2})
    clock.now += 15  # b's entry is 35 s old: it vouches for nobody any more
    membership.expire()
    assert membership.alive().keys() == {a, b}
    await membership.stop()


async def test_a_crashed_node_leaves_as_soon_as_its_neighbours_say_so():
    membership, clock, events = await make()
    a, b, crashed = peers(3)
    for peer in (a, b):
        membership.connected(peer)
    membership.entry_changed(a, {"hostname": "a", "neighbours": [b, crashed]})
    membership.entry_changed(b, {"hostname": "b", "neighbours": [a, crashed]})
    membership.entry_changed(crashed, {"hostname": "x", "neighbours": [a, b]})
    assert membership.is_alive(crashed)
    membership.entry_changed(a, {"hostname": "a", "neighbours": [b]})
    assert membership.is_alive(crashed)  # b still vouches
    membership.entry_changed(b, {"hostname": "b", "neighbours": [a]})
    assert not membership.is_alive(crashed)  # at once, no TTL
    await membership.stop()


async def test_a_voucher_naming_too_many_peers_vouches_for_none():
    membership, clock, events = await make()
    liar, *crowd = peers(MAX_NEIGHBOURS + 2)
    membership.connected(liar)
    membership.entry_changed(liar, {"hostname": "liar", "neighbours": crowd})
    for peer in crowd:
        membership.entry_changed(peer, {"hostname": "fake", "neighbours": [liar]})
    membership.entry_changed(liar, {"hostname": "liar", "neighbours": ["not-a-peer-id"]})
    assert membership.alive().keys() == {liar}
    assert membership.bad_vouchers == 2
    await membership.stop()


async def test_heartbeat_after_a_drop_keeps_a_peer_alive_through_others():
    membership, clock, events = await make()
    p3, relay = peers(2)
    membership.connected(p3)
    membership.entry_changed(p3, {"hostname": "x"})
    membership.connected(relay)
    membership.entry_changed(relay, {"hostname": "r"})
    await membership.drain()
    clock.now += 1
    membership.disconnected(p3)
    clock.now += 1
    membership.entry_changed(relay, {"hostname": "r", "neighbours": [p3], "beat": 2})  # relay still has it
    await membership.drain()
    assert membership.is_alive(p3)
    assert events == [("joined", p3, "x"), ("joined", relay, "r"), ("left", p3, "x"), ("joined", p3, "x")]
    await membership.stop()


async def test_self_other_networks_and_deletes_are_handled():
    membership, clock, events = await make()
    p4, p5 = peers(2)
    membership.connected("me")
    membership.entry_changed("me", {"hostname": "self"})
    membership.entry_changed(p4, {"hostname": "other-cluster", "network_id": "elsewhere"})
    assert membership.alive() == {}
    membership.connected(p5)
    membership.entry_changed(p5, {"hostname": "y"})
    membership.disconnected(p5)
    membership.entry_changed(p5, None)
    membership.expire()
    await membership.drain()
    assert events == [("joined", p5, "y"), ("left", p5, "y")]
    assert {row["peer_id"] for row in membership.describe()} == {p5}
    assert membership.recently_alive(60) == {p5}
    clock.now += 61
    assert membership.recently_alive(60) == set()
    await membership.stop()


async def test_a_node_of_another_network_id_is_never_a_member_even_connected():
    # Two clusters may share one token (p2p.network_id): they connect and gossip to each other,
    # but a node of the other cluster must not join, vouch or vote here.
    membership, clock, events = await make()
    prod, dev, dev_friend = peers(3)
    membership.connected(prod)
    membership.entry_changed(prod, {"hostname": "prod", "network_id": "prod", "neighbours": [dev_friend]})
    membership.entry_changed(dev_friend, {"hostname": "friend"})  # named only by the foreign entry
    clock.now += 5  # past the join grace
    membership.expire()
    assert membership.alive() == {} and membership.recently_alive(60) == set()
    membership.connected(dev)
    membership.entry_changed(dev, {"hostname": "dev", "neighbours": [prod]})  # our node vouches for prod
    membership.expire()
    assert set(membership.alive()) == {dev}
    membership.entry_changed(dev, {"hostname": "dev", "network_id": "prod"})  # dev moved to the other cluster
    membership.expire()
    await membership.drain()
    assert events == [("joined", dev, "dev"), ("left", dev, "dev")]
    assert membership.alive() == {} and {row["peer_id"] for row in membership.describe()} == {dev_friend}
    membership.remember(prod, {"hostname": "prod", "network_id": "prod"})  # from disk: not worth a dial
    assert prod not in membership.worth_dialling(300)
    await membership.stop()


async def test_a_failing_emitter_does_not_stop_delivery():
    clock = Clock()
    seen = []

    async def emit(event):
        if event.peer_id == "bad":
            raise RuntimeError("plugin bug")
        seen.append(event.peer_id)

    membership = Membership("me", emit, clock=clock)
    membership.start()
    membership.connected("bad")
    membership.connected("good")
    clock.now += 5
    membership.expire()
    await membership.drain()
    assert seen == ["good"]
    await membership.stop()


async def test_entries_from_disk_are_remembered_not_alive():
    membership, clock, events = await make()
    membership.remember("old", {"hostname": "gone"})
    membership.expire()
    await membership.drain()
    assert events == [] and not membership.is_alive("old")
    assert membership.recently_alive(300) == set()
    assert membership.worth_dialling(300) == {"old"}
    clock.now += 301
    assert membership.worth_dialling(300) == set()
    membership.entry_changed("old", {"hostname": "back"})  # heard from, but vouched for by nobody
    assert not membership.is_alive("old")
    membership.connected("old")
    await membership.drain()
    assert events == [("joined", "old", "back")]
    await membership.stop()


def test_only_peer_ids_are_node_keys():
    from kairos_core.identity import Identity
    from kairos_core.membership import is_node_key

    peer = Identity.generate().peer_id
    assert is_node_key(peer)
    assert not is_node_key(f"{peer}/extra")
    assert not is_node_key("not-a-peer")
    assert not is_node_key("")


async def test_expire_walks_the_vouchers_only_when_an_entry_reaches_its_ttl(monkeypatch):
    membership, clock, events = await make(ttl=30)
    near, far = peers(2)
    membership.connected(near)
    membership.entry_changed(near, {"hostname": "near", "neighbours": [far]})
    membership.entry_changed(far, {"hostname": "far", "neighbours": [near]})
    walks = []
    original = membership.vouched
    monkeypatch.setattr(membership, "vouched", lambda: walks.append(clock.now) or original())
    for _ in range(29):  # the node calls expire every second
        clock.now += 1
        membership.expire()
    assert walks == [] and membership.is_alive(far)  # nothing can have changed by time alone
    clock.now += 1.5  # near's entry, the one vouching for far, is 30.5 s old now
    membership.expire()
    await membership.drain()
    assert len(walks) == 1 and not membership.is_alive(far) and membership.is_alive(near)
    assert events[-1] == ("left", far, "far")
    await membership.stop()


async def test_bridges_are_the_connections_some_member_is_reached_through_only():
    # us - a - b - c, and us - d (entries list peers only, not us); then d lists a as well
    membership, clock, events = await make()
    a, b, c, d = peers(4)
    for peer in (a, d):
        membership.connected(peer)
    membership.entry_changed(a, {"neighbours": [b, d]})
    membership.entry_changed(b, {"neighbours": [a, c]})
    membership.entry_changed(c, {"neighbours": [b]})
    membership.entry_changed(d, {"neighbours": []})
    assert set(membership.alive()) == {a, b, c, d}
    assert membership.bridges({a, d}) == {a}  # without a, b and c are reached through nobody
    membership.entry_changed(d, {"neighbours": [a]})  # now d reaches a as well
    assert membership.bridges({a, d}) == set()
    assert membership.bridges(set()) == set()
    leaf = peers(1)[0]  # connected to us only, listed by nobody: closing it would leave it alone
    membership.connected(leaf)
    membership.entry_changed(leaf, {"neighbours": []})
    assert membership.bridges({a, d, leaf}) == {leaf}
    await membership.stop()


async def test_members_on_the_far_side_of_a_split_are_lost_not_crashed_yet():
    membership, clock, events = await make()
    a, b = peers(2)
    membership.connected(a)
    membership.entry_changed(a, {"neighbours": [b]})
    membership.entry_changed(b, {"neighbours": [a]})
    assert membership.lost(300) == set()
    membership.entry_changed(a, {"neighbours": []})  # a closed its connection to b: the overlay split
    await membership.drain()
    assert ("left", b, None) in events and membership.lost(300) == {b}
    clock.now += 301
    assert membership.lost(300) == set()  # past the quorum horizon: nobody tries it any more
    await membership.stop()


async def test_on_a_large_network_entries_are_refreshed_and_trusted_within_the_refresh_budget():
    clock = Clock()

    async def emit(event):
        pass

    budget = 1 / 30  # the whole network refreshes at most one entry every 30 s
    membership = Membership("me", emit, ttl=900, refresh_budget=budget, clock=clock)
    membership.start()
    near, *others = peers(40)
    membership.connected(near)
    membership.entry_changed(near, {"hostname": "near", "neighbours": others})
    # one entry (plus ours): the floor, a third of peer_ttl
    assert membership.refresh_interval() == 300 and membership.entry_ttl() == 900
    for peer in others:
        membership.entry_changed(peer, {"hostname": peer[-4:], "neighbours": [near]})
    # 40 entries and ours: 41 refreshes per 41 / budget seconds
    assert membership.refresh_interval() == 41 / budget
    assert membership.entry_ttl() == 3 * 41 / budget
    clock.now += 1000  # past peer_ttl, within the stretched TTL: near still vouches for the far peers
    membership.expire()
    assert set(others) <= set(membership.alive())
    clock.now += 3 * 41 / budget  # past it: they are reached through nobody now
    membership.expire()
    assert set(membership.alive()) == {near}
    # without a budget the TTL is peer_ttl whatever the size
    fixed = Membership("me", emit, ttl=900, clock=clock)
    for peer in others:
        fixed.entry_changed(peer, {"hostname": peer[-4:], "neighbours": []})
    assert fixed.refresh_interval() == 300 and fixed.entry_ttl() == 900
    await membership.stop()
