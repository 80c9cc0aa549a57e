"""A node rewrites its `nodes` entry when it changes, and otherwise only to refresh it for the TTL.

Every entry reaches every node: rewriting unchanged ones each round made every node's idle work
grow with the size of the network.
"""

from __future__ import annotations

import asyncio

import pytest

from kairos_core.membership import NODES_BUCKET

pytestmark = pytest.mark.slow


async def test_an_unchanged_entry_is_refreshed_three_times_per_ttl_and_a_change_is_written_at_once(kairos_network):
    # refresh every 3 rounds; no budget, which would stretch that on this tiny network (see below)
    overrides = {"membership": {"announce_interval": 1.0, "peer_ttl": 9.0, "refresh_budget": 0}}
    net = await kairos_network(0)
    a = await net.add_node(overrides=overrides)
    beat = lambda: a.ledger.get(NODES_BUCKET, a.peer_id)["beat"]  # noqa: E731
    start = beat()
    await asyncio.sleep(6.5)
    assert beat() - start in (2, 3)  # not 6: one rewrite per refresh, not per round
    b = await net.add_node(overrides=overrides)  # a new neighbour changes a's entry
    await net.wait_for(lambda: a.ledger.get(NODES_BUCKET, a.peer_id)["neighbours"] == [b.peer_id], timeout=3)
    await net.wait_for(lambda: b.ledger.get(NODES_BUCKET, a.peer_id)["neighbours"] == [b.peer_id], timeout=3)


async def test_the_refresh_budget_stretches_the_refresh_interval(kairos_network):
    """At most ``refresh_budget`` refreshes a second in the whole network: with one entry (and
    ours) and a budget of 0.1/s, a node refreshes every 10 s, not every peer_ttl / 3 = 3 s."""
    overrides = {"membership": {"announce_interval": 1.0, "peer_ttl": 9.0, "refresh_budget": 0.1}}
    net = await kairos_network(0)
    a = await net.add_node(overrides=overrides)
    assert a.membership.refresh_interval() >= 10
    beat = lambda: a.ledger.get(NODES_BUCKET, a.peer_id)["beat"]  # noqa: E731
    start = beat()
    await asyncio.sleep(10.5)
    assert beat() - start in (0, 1, 2)  # 3 or 4 at peer_ttl / 3


async def test_a_change_soon_after_a_write_waits_for_the_spacing(kairos_network):
    """New connections in a forming network come one by one: they rewrite the entry at most once
    per ANNOUNCE_SPACING; a lost connection, or any change after a quiet spell, goes out at once."""
    import time

    from kairos_core.node import ANNOUNCE_SPACING, NEIGHBOUR_ANNOUNCE_DELAY

    net = await kairos_network(0)
    a = await net.add_node()
    loop = asyncio.get_running_loop()
    for handle in ("_announce_pending", "_rtt_announce_pending"):
        if getattr(a, handle) is not None:
            getattr(a, handle).cancel()
            setattr(a, handle, None)
    a._written_at = time.monotonic()  # just written
    a._announce_soon(spaced=True)  # a new connection
    assert a._announce_pending.when() - loop.time() > ANNOUNCE_SPACING - 0.2
    a._announce_soon()  # a lost one: liveness news, brought forward
    assert a._announce_pending.when() - loop.time() <= NEIGHBOUR_ANNOUNCE_DELAY + 0.05
    a._announce_pending.cancel()
    a._announce_pending = None
    a._written_at = time.monotonic() - 60  # quiet for a minute
    a._announce_soon(spaced=True)
    assert a._announce_pending.when() - loop.time() <= NEIGHBOUR_ANNOUNCE_DELAY + 0.05


def _nothing_pending(node) -> None:
    """No announcement pending and no spacing: only the delay a change chooses counts."""
    if node._announce_pending is not None:
        node._announce_pending.cancel()
        node._announce_pending = None
    node._written_at = 0.0


async def _three_vouching_each_other(net):
    """Three nodes with ``low`` = 1 (a network above it), each entry naming the two others: each
    peer is vouched for by the third node too."""
    small = {"p2p": {"connections": {"low": 1, "high": 4}}}
    nodes = [await net.add_node(overrides=small) for _ in range(3)]
    await net.wait_for(
        lambda: all(
            sorted(x.ledger.get(NODES_BUCKET, y.peer_id)["neighbours"]) == sorted(z.peer_id for z in nodes if z is not y)
            for x in nodes
            for y in nodes
        ),
        timeout=20,
    )
    for node in nodes:
        _nothing_pending(node)
    return nodes


async def test_a_connection_to_a_peer_others_vouch_for_is_announced_lazily(kairos_network):
    """On a network above ``p2p.connections.low``, a new connection to a peer that others' entries
    keep alive waits NEIGHBOUR_ADDED_LAZY_DELAY (one write for a burst, with the RTTs); one to a
    peer only we vouch for waits a random moment (others may announce it first), and any on a
    network within ``low`` goes out at once."""
    from kairos_core.node import NEIGHBOUR_ADDED_LAZY_DELAY

    net = await kairos_network(0)
    a, b, c = await _three_vouching_each_other(net)
    loop = asyncio.get_running_loop()

    for node, peer in ((a, b), (b, c)):
        _nothing_pending(node)
        assert node._vouched_without_us(peer.peer_id)
        await node._peer_admitted(peer.peer_id)
        assert node._announce_pending.when() - loop.time() > NEIGHBOUR_ADDED_LAZY_DELAY - 1.0

    # a peer nobody else vouches for: c's entry no longer names b, as if c had just lost it
    entry = dict(a.ledger.get(NODES_BUCKET, c.peer_id))
    a.membership.entry_changed(c.peer_id, {**entry, "neighbours": [a.peer_id]})
    _nothing_pending(a)
    assert not a._vouched_without_us(b.peer_id)
    await a._peer_admitted(b.peer_id)
    assert a._announce_pending is None  # re-checked after a random moment (the test below)

    # within `low` (the default 8 here) every addition goes out at once
    d = await net.add_node()
    await net.wait_for(lambda: len(d.members()) == 3, timeout=20)
    _nothing_pending(d)
    assert not d._vouched_without_us(a.peer_id)


async def test_a_trim_of_a_peer_others_vouch_for_is_announced_lazily_and_a_plain_loss_at_once(kairos_network):
    """A trim is a choice of degree: the peer stays alive through others' entries, so the write
    waits for the lazy one (both ends). A connection that merely went is liveness news."""
    from kairos_core.node import NEIGHBOUR_ADDED_LAZY_DELAY

    net = await kairos_network(0)
    a, b, c = await _three_vouching_each_other(net)
    loop = asyncio.get_running_loop()
    lost_at_c = c.counters["entry_writes_neighbours_lost"]
    a.dial_manager._close(b.peer_id)  # a trims b: notice, then close
    await net.wait_for(lambda: not a.host.is_admitted(b.peer_id) and not b.host.is_admitted(a.peer_id), timeout=15)
    await net.wait_for(lambda: a.counters["trims_announced_lazily"] == 1 and b.counters["trims_announced_lazily"] == 1, timeout=5)
    for node in (a, b):
        assert node._announce_is_lazy
        assert node._announce_pending.when() - loop.time() > NEIGHBOUR_ADDED_LAZY_DELAY - 3.0
    assert b.peer_id in a.ledger.get(NODES_BUCKET, a.peer_id)["neighbours"]  # not rewritten yet
    assert not a.dial_manager.trimmed(b.peer_id)  # answered once

    # c loses b without a trim: written at once
    await c.host.disconnect(b.peer_id)
    await net.wait_for(lambda: c.counters["entry_writes_neighbours_lost"] == lost_at_c + 1, timeout=5)
    assert c.counters["trims_announced_lazily"] == 0


async def test_a_new_unvouched_peer_is_rechecked_after_a_random_moment_and_spared_if_announced_by_then(kairos_network):
    from kairos_core.node import NEIGHBOUR_ANNOUNCE_DELAY, UNVOUCHED_SPREAD

    net = await kairos_network(0)
    a, b, c = await _three_vouching_each_other(net)
    loop = asyncio.get_running_loop()
    # b as if nobody else vouched for it: c's entry (as a sees it) names only a
    entry = dict(a.ledger.get(NODES_BUCKET, c.peer_id))
    a.membership.entry_changed(c.peer_id, {**entry, "neighbours": [a.peer_id]})
    assert not a._vouched_without_us(b.peer_id)
    checks: list[tuple[str, float]] = []
    recheck = a._announce_if_unvouched
    a._announce_if_unvouched = lambda peer: checks.append((peer, loop.time()))  # type: ignore[method-assign]
    admitted_at = loop.time()
    await a._peer_admitted(b.peer_id)
    assert a._announce_pending is None  # not at once: after a random moment
    await asyncio.sleep(UNVOUCHED_SPREAD + 0.3)
    assert [peer for peer, _ in checks] == [b.peer_id]
    assert NEIGHBOUR_ANNOUNCE_DELAY - 0.05 <= checks[0][1] - admitted_at <= UNVOUCHED_SPREAD + 0.1

    # still unvouched at the re-check: announced soon
    recheck(b.peer_id)
    assert not a._announce_is_lazy and a._announce_pending.when() - loop.time() <= NEIGHBOUR_ANNOUNCE_DELAY + 0.05
    a._announce_pending.cancel()
    a._announce_pending = None
    # vouched for by then (c's real entry back): spared, lazily
    a.membership.entry_changed(c.peer_id, entry)
    recheck(b.peer_id)
    assert a.counters["unvouched_announcements_spared"] == 1
    assert a._announce_is_lazy


async def test_lazy_changes_in_a_burst_are_one_write_at_most_the_limit_after_the_first(kairos_network):
    from kairos_core.node import NEIGHBOUR_ADDED_LAZY_DELAY, NEIGHBOUR_ADDED_LAZY_LIMIT

    net = await kairos_network(0)
    small = {"p2p": {"connections": {"low": 1, "high": 4}}}
    a = await net.add_node(overrides=small)
    loop = asyncio.get_running_loop()
    _nothing_pending(a)
    a._announce_lazily()
    first = a._announce_pending.when()
    assert first - loop.time() == pytest.approx(NEIGHBOUR_ADDED_LAZY_DELAY, abs=0.1)
    a._lazy_since = loop.time() - (NEIGHBOUR_ADDED_LAZY_LIMIT - 4)  # the burst began long ago
    a._announce_lazily()  # another change: pushed back, but not past the limit
    assert a._announce_pending.when() - loop.time() == pytest.approx(4, abs=0.1)
    a._announce_soon()  # an urgent change brings it forward and is not lazy
    assert not a._announce_is_lazy and a._announce_pending.when() - loop.time() < 1
    a._announce_lazily()  # a lazy change while an urgent write is pending rides on it
    assert not a._announce_is_lazy and a._announce_pending.when() - loop.time() < 1


async def test_a_first_rtt_alone_waits_for_the_networks_rtt_budget_above_low_and_not_within_it(kairos_network):
    """Above ``low`` a new neighbour's first RTT is an RTT-only rewrite like a move (it costs every
    node); on a small network it goes out at once."""
    import time

    net = await kairos_network(0)
    a, b, c = await _three_vouching_each_other(net)  # low = 1: above it
    d = await net.add_node()  # the default low (8): a small network for d
    for node in (a, d):
        await net.wait_for(lambda node=node: all(link.get("floor_s") for link in node.host.links().values()), timeout=20)
    assert not d._network_above_low() and a._network_above_low()

    def first_rtt_write(node, written_ago: float) -> bool:
        node._published_rtt = {}  # as if no RTT were published yet
        node._written_at = time.monotonic() - written_ago
        before = node.counters["entry_writes_rtt_first"]
        node.announce()
        return node.counters["entry_writes_rtt_first"] == before + 1

    budget = a._rtt_rewrite_interval()
    assert budget >= 10
    assert not first_rtt_write(a, written_ago=budget / 2)
    assert first_rtt_write(a, written_ago=budget + 1)
    assert first_rtt_write(d, written_ago=0)
