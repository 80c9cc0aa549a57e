"""Bounded degree: the connection manager's choices, and a network of real nodes that is not a full mesh."""

from __future__ import annotations

import asyncio
import random

import pytest

from kairos_core import connections as connections_module
from kairos_core import dial_manager as dial_manager_module
from kairos_core.connections import ConnectionManager, xor_distance
from kairos_core.identity import Identity


class FakeHost:
    def __init__(self) -> None:
        self.peers: set[str] = set()

    def admitted_peers(self) -> set[str]:
        return set(self.peers)

    async def disconnect(self, peer_id: str) -> None:
        self.peers.discard(peer_id)


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def ids(n: int) -> list[str]:
    return [Identity.generate().peer_id for _ in range(n)]


def manager(low=3, high=5, **kwargs):
    host, clock, dialled = FakeHost(), Clock(), []
    me = Identity.generate().peer_id
    cm = ConnectionManager(
        me, host, lambda peer: dialled.append(peer) or True, low=low, high=high, clock=clock, rng=random.Random(7), **kwargs
    )
    return cm, host, clock, dialled


def test_below_low_it_dials_the_missing_half_by_xor_distance_half_at_random():
    cm, host, clock, dialled = manager(low=4)
    pool = set(ids(20))
    picks = cm.to_dial(pool)
    assert len(picks) == 4
    closest = sorted(pool, key=lambda p: xor_distance(cm.self_id, p))[:2]
    assert set(closest) <= set(picks)
    host.peers = set(picks)
    assert cm.to_dial(pool) == []  # at low: no more dials


def test_dials_in_flight_count_towards_low_once():
    in_flight: set[str] = set()
    cm, host, clock, dialled = manager(low=4, dialling=lambda: set(in_flight))
    pool = set(ids(20))
    host.peers = set(sorted(pool)[:1])
    first = cm.to_dial(pool)
    assert len(first) == 3 and cm.short()
    in_flight |= set(first)  # the dials run: the next pass must not dial three more
    assert not cm.short()
    # (it asks for the running ones again: the dialler tries only addresses they do not)
    assert sorted(cm.to_dial(pool)) == sorted(first)
    landed = first[0]
    host.peers.add(landed)
    in_flight.discard(landed)
    failed = first[1]
    in_flight.discard(failed)  # one dial failed: one more is wanted, not the one in flight
    picks = cm.to_dial(pool)
    assert first[2] in picks  # still running: asked for again (new addresses only)
    assert len([peer for peer in picks if peer not in in_flight]) == 1  # and one new dial, not two


def test_an_overlay_with_slow_dials_settles_without_overshooting():
    # 50 simulated nodes whose dials take 2-30 s (a loaded machine), the real connection manager
    # deciding. Counting only landed connections, each node dialled again on every pass until
    # they landed: 1,500-1,700 connection changes before the overlay settled, and trims still
    # running after it. Each change rewrites two entries that every node receives.
    from kairos_testing.overlaysim import Overlay

    report = Overlay(50, dial_delay=(2.0, 30.0), publish_lag=10.0, seed=2).run(settle=30, quiet=120)
    assert report["formation_s"] is not None and report["one_piece"]
    assert report["changes_until_quiet"] < 50 * 8, report  # about one dial per connection, a few trims
    assert report["quiet_changes_per_s"] == {"dial": 0.0, "trim": 0.0, "loss": 0.0}, report
    low, median, high = report["degree_min_median_max"]
    assert 8 <= low and high <= 16


def test_a_small_network_is_fully_connected():
    cm, host, clock, dialled = manager(low=8, high=16)
    pool = set(ids(5))
    assert set(cm.to_dial(pool)) == pool


def test_pinned_peers_are_always_dialled_and_never_trimmed():
    cm, host, clock, dialled = manager(low=2, high=3)
    pinned, *others = ids(8)
    cm.pin(pinned)
    host.peers = set(others[:2])
    assert cm.to_dial({pinned, *others}) == [pinned]
    host.peers = {pinned, *others}
    for peer in host.peers:
        cm.connected(peer)
    clock.now += 60
    trimmed = cm.to_trim()
    assert pinned not in trimmed and len(host.peers) - len(trimmed) == 2


def test_a_trim_leaves_the_middle_of_low_and_high_not_low():
    cm, host, clock, dialled = manager(low=8, high=16)
    peers = ids(17)
    host.peers = set(peers)
    for peer in peers:
        cm.connected(peer)
    clock.now += 60
    assert len(cm.to_trim()) == 17 - 12  # five peers one short, not nine


def test_above_high_it_trims_to_the_middle_keeping_half_by_xor_distance():
    cm, host, clock, dialled = manager(low=4, high=5)
    peers = ids(10)
    host.peers = set(peers)
    for peer in peers:
        cm.connected(peer)
    clock.now += 60
    kept = set(peers) - set(cm.to_trim())
    assert len(kept) == 4
    assert set(sorted(peers, key=lambda p: xor_distance(cm.self_id, p))[:2]) <= kept


def test_a_trim_closes_the_best_connected_peers_not_those_it_would_leave_short():
    degrees: dict[str, int] = {}
    cm, host, clock, dialled = manager(low=8, high=16, degree=degrees.get)
    peers = ids(20)
    host.peers = set(peers)
    for index, peer in enumerate(peers):
        cm.connected(peer)
        degrees[peer] = 8 if index % 2 else 20  # half would drop below low without us
    clock.now += 60
    by_xor = set(sorted(peers, key=lambda p: xor_distance(cm.self_id, p))[:6])
    trimmed = cm.to_trim()
    assert len(trimmed) == 20 - 12
    assert not by_xor & set(trimmed)
    # of the rest, six are kept: those this trim would leave short go last
    others = sorted(degrees[peer] for peer in set(peers) - by_xor)
    assert sorted(degrees[peer] for peer in trimmed) == others[6:]
    assert [degrees[peer] for peer in trimmed].count(20) == min(8, others.count(20))


def test_above_high_it_trims_but_keeps_protected_and_young_connections():
    cm, host, clock, dialled = manager(low=3, high=4)
    peers = ids(9)
    host.peers = set(peers)
    for peer in peers[:7]:
        cm.connected(peer)
    clock.now += 60
    for peer in peers[7:]:
        cm.connected(peer)  # just arrived: within the grace period
    cm.protect(peers[0], "vpn")
    trimmed = set(cm.to_trim())
    kept = set(peers) - trimmed
    assert kept == {peers[0], *peers[7:]}  # the protected one and the two young ones fill the target (3)
    cm.unprotect(peers[0], "vpn")
    assert not cm.is_protected(peers[0])


def test_within_high_nothing_is_trimmed():
    cm, host, clock, dialled = manager(low=3, high=5)
    host.peers = set(ids(5))
    clock.now += 60
    assert cm.to_trim() == []


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        ConnectionManager("me", FakeHost(), lambda p: True, low=0, high=4)
    with pytest.raises(ValueError):
        ConnectionManager("me", FakeHost(), lambda p: True, low=5, high=4)


@pytest.mark.slow
async def test_nine_nodes_with_degree_two_to_four_still_form_one_network(kairos_network, monkeypatch):
    monkeypatch.setattr(connections_module, "GRACE", 1.0)
    monkeypatch.setattr(dial_manager_module, "REPAIR_INTERVAL", 2.0)
    net = await kairos_network(0)
    overrides = {"p2p": {"connections": {"low": 2, "high": 4}}}
    seed = await net.add_node(overrides=overrides)
    for _ in range(8):  # everyone joins through the seed only; the managers spread them out
        node = await net.add_node(overrides=overrides, connect=False)
        await node.connect(seed.host.addresses())
    nodes = net.nodes
    # membership is attested: every node counts the eight others without being connected to them
    await net.wait_for(lambda: all(len(n.members()) == 8 for n in nodes), timeout=40)
    await net.wait_for(lambda: all(len(n.neighbours()) <= 4 for n in nodes), timeout=40)
    assert any(len(n.neighbours()) < 8 for n in nodes)  # not a full mesh
    assert sum(n.counters["connections_trimmed"] for n in nodes) > 0

    nodes[3].ledger.set("apps", "web", {"replicas": 3})
    await net.wait_for(lambda: all(n.ledger.get("apps", "web") == {"replicas": 3} for n in nodes), timeout=20)
    await net.wait_for(lambda: len({n.leader for n in nodes}) == 1 and nodes[0].leader is not None, timeout=30)

    victim = nodes[5]
    await victim.stop()
    survivors = [n for n in nodes if n is not victim]
    await net.wait_for(lambda: all(victim.peer_id not in n.members() for n in survivors), timeout=20)
    # at degree 2 the victim may have been the only way between two parts: repair dials join them
    await net.wait_for(lambda: all(len(n.members()) == 7 for n in survivors), timeout=20)
    nodes[0].ledger.set("apps", "web", {"replicas": 4})
    await net.wait_for(lambda: all(n.ledger.get("apps", "web") == {"replicas": 4} for n in survivors), timeout=20)


def test_a_trim_never_closes_a_bridge():
    peers = ids(8)
    bridge = peers[0]
    cm, host, clock, dialled = manager(low=2, high=4, bridges=lambda candidates: {bridge} & candidates)
    host.peers = set(peers)
    for peer in peers:
        cm.connected(peer)
    clock.now += 60
    for _ in range(20):  # whatever the random half picks
        assert bridge not in cm.to_trim()
    assert len(cm.to_trim()) == 8 - 3


@pytest.mark.slow
async def test_an_overlay_that_split_at_full_degree_finds_itself_again(kairos_network, monkeypatch):
    # Two triangles joined by one connection, every node at its degree (low 2): nobody dials. Both
    # ends close that connection at once, as two trims counting on each other's bridge could: each
    # triangle sees the other's members lost, and a repair dial joins them again.
    monkeypatch.setattr(dial_manager_module, "REPAIR_INTERVAL", 1.0)
    net = await kairos_network(0)
    overrides = {"p2p": {"connections": {"low": 2, "high": 3}}}
    a1, a2, a3, b1, b2, b3 = [await net.add_node(overrides=overrides, connect=False) for _ in range(6)]
    for x, y in ((a1, a2), (a1, a3), (a2, a3), (b1, b2), (b1, b3), (b2, b3), (a1, b1)):
        await x.connect(y.host.addresses())
    nodes = net.nodes
    await net.wait_for(lambda: all(len(n.members()) == 5 for n in nodes), timeout=30)
    assert sorted(len(n.neighbours()) for n in nodes) == [2, 2, 2, 2, 3, 3]
    assert sum(n.counters["repair_dials"] for n in nodes) == 0  # nothing lost: no repair

    await asyncio.gather(a1.host.disconnect(b1.peer_id), b1.host.disconnect(a1.peer_id))
    side_a, side_b = {a1, a2, a3}, {b1, b2, b3}
    # the split is real: the A side counts the B side gone (until a repair dial gets through)
    await net.wait_for(lambda: any(len(n.members()) == 2 for n in nodes), timeout=10)

    await net.wait_for(lambda: all(len(n.members()) == 5 for n in nodes), timeout=30)
    assert sum(n.counters["repair_dials"] for n in nodes) >= 1
    assert any(peer in {n.peer_id for n in side_b} for a in side_a for peer in a.neighbours())
    a2.ledger.set("apps", "web", {"replicas": 2})
    b3.ledger.set("apps", "db", {"replicas": 1})
    await net.wait_for(
        lambda: all(n.ledger.get("apps", "web") == {"replicas": 2} and n.ledger.get("apps", "db") for n in nodes), timeout=20
    )
