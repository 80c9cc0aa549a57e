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
    overrides = {"membership": {"announce_interval": 1.0, "peer_ttl": 9.0}}  # refresh every 3 rounds
    net = await kairos_network(0)
    a = await net.add_node(overrides=overrides)
    beat = lambda: a.ledger.get(NODES_BUCKET, a.peer_id)["beat"]  # noqa: E731
    start = beat()
    await asyncio.sleep(6.5)
    assert beat() - start in (2, 3)  # not 6: one rewrite per refresh, not per round
    b = await net.add_node(overrides=overrides)  # a new neighbour changes a's entry
    await net.wait_for(lambda: a.ledger.get(NODES_BUCKET, a.peer_id)["neighbours"] == [b.peer_id], timeout=3)
    await net.wait_for(lambda: b.ledger.get(NODES_BUCKET, a.peer_id)["neighbours"] == [b.peer_id], timeout=3)
