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
