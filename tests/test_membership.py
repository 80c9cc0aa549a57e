"""Membership: joined/left/updated from connections and heartbeats, in order, on our own clock."""

from __future__ import annotations

from kairos_core.membership import Membership


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


async def test_peer_known_only_by_heartbeats_expires_after_ttl():
    membership, clock, events = await make(ttl=30)
    membership.entry_changed("p2", {"hostname": "far"})
    clock.now += 29
    membership.expire()
    assert membership.is_alive("p2")
    membership.entry_changed("p2", {"hostname": "far", "beat": 2})
    clock.now += 29
    membership.expire()
    assert membership.is_alive("p2")
    clock.now += 2
    membership.expire()
    await membership.drain()
    assert events == [("joined", "p2", "far"), ("left", "p2", "far")]
    await membership.stop()


async def test_heartbeat_after_a_drop_keeps_a_peer_alive_through_others():
    membership, clock, events = await make()
    membership.connected("p3")
    membership.entry_changed("p3", {"hostname": "x"})
    clock.now += 1
    membership.disconnected("p3")
    clock.now += 1
    membership.entry_changed("p3", {"hostname": "x", "beat": 9})  # relayed by another node
    await membership.drain()
    assert membership.is_alive("p3")
    assert events == [("joined", "p3", "x"), ("left", "p3", "x"), ("joined", "p3", "x")]
    await membership.stop()


async def test_self_other_networks_and_deletes_are_handled():
    membership, clock, events = await make()
    membership.connected("me")
    membership.entry_changed("me", {"hostname": "self"})
    membership.entry_changed("p4", {"hostname": "other-cluster", "network_id": "elsewhere"})
    assert membership.alive() == {}
    membership.entry_changed("p5", {"hostname": "y"})
    membership.entry_changed("p5", None)
    membership.expire()
    await membership.drain()
    assert events == [("joined", "p5", "y"), ("left", "p5", "y")]
    assert {row["peer_id"] for row in membership.describe()} == {"p5"}
    assert membership.recently_alive(60) == {"p5"}
    clock.now += 61
    assert membership.recently_alive(60) == set()
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
    membership.entry_changed("old", {"hostname": "back"})  # heard from again: now it is alive
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
