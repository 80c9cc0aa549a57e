"""Clock drag (hardening, issue #12 Medium 7): an insider's far-ahead version must not move the others.

An insider signs a write stamped now + 59 s, within the drift bound (60 s). Before the fix every
node that merged it jumped its hybrid logical clock 59 s ahead, so its own honest writes carried
that stamp too, and a node whose clock was a few seconds behind refused them as "from the future".
Real nodes on loopback: the forged write may move a clock at most half the bound ahead of its wall
clock, and nodes 1 s and 5 s behind keep accepting the dragged nodes' honest writes at once.
"""

from __future__ import annotations

import asyncio

import pytest

from kairos_core.ledger import Entry, Version
from kairos_core.ledger.clock import wall_clock_ms

pytestmark = pytest.mark.slow

BUCKET = "apps"


def forge_ahead(insider, key: str, ahead_ms: int) -> Entry:
    """The insider signs, with its own identity, a write stamped ``ahead_ms`` into the future and
    gossips it, without merging it itself (as a hostile build of the node would)."""
    version = Version(wall_clock_ms() + ahead_ms, 0, insider.peer_id)
    entry = Entry.signed(insider.identity, BUCKET, key, {"ahead_ms": ahead_ms}, version)
    insider.replicator.batcher.add(entry)
    return entry


def set_clock_behind(node, behind_ms: int) -> None:
    """Make ``node``'s ledger see a wall clock ``behind_ms`` late (its HLC reads the wall through this)."""
    node.ledger.clock._now_ms = lambda: wall_clock_ms() - behind_ms


def lead_ms(node) -> int:
    """How far the node's HLC is ahead of its own wall clock."""
    return node.ledger.clock.last.wall_ms - node.ledger.clock.now_ms()


async def test_a_write_stamped_59_s_ahead_drags_no_clock_and_late_nodes_keep_accepting(kairos_network):
    net = await kairos_network(4)
    await net.fully_connected()
    insider, dragged, late1, late5 = net.nodes
    set_clock_behind(late1, 1_000)
    set_clock_behind(late5, 5_000)
    honest = [dragged, late1, late5]
    drift_ms = dragged.ledger.clock.max_drift_ms
    assert drift_ms == 60_000  # the default ledger.max_clock_drift
    refused_before = {n.peer_id: n.ledger.counters["rejected_future"] for n in honest}

    forge_ahead(insider, "dragging", 59_000)
    await net.wait_for(lambda: dragged.ledger.get_entry(BUCKET, "dragging") is not None, timeout=5)
    # the forged write is within the bound for `dragged` and merged there, but it moved the clock
    # no further than half the bound (before the fix: 59 s)
    for node in honest:
        assert lead_ms(node) <= drift_ms // 2 + 500, f"{node.config['node']['hostname']} was dragged"

    # `dragged` writes at once, while the forged stamp is still 58+ s ahead: the late nodes accept
    # every honest write straight from gossip (before the fix late5 refused them all for 4 s)
    for n in range(20):
        dragged.ledger.set(BUCKET, f"honest-{n}", n)
    await net.wait_for(
        lambda: all(node.ledger.get(BUCKET, f"honest-{n}") == n for node in (late1, late5) for n in range(20)), timeout=3
    )
    late1.ledger.set(BUCKET, "from-late1", 1)
    late5.ledger.set(BUCKET, "from-late5", 5)
    await net.wait_for(
        lambda: all(
            node.ledger.get(BUCKET, "from-late1") == 1 and node.ledger.get(BUCKET, "from-late5") == 5 for node in net.nodes
        ),
        timeout=3,
    )
    # the forged write was refused by the node it was more than 60 s ahead of (maybe more than once:
    # anti-entropy offers it again), and by nobody else
    assert late5.ledger.counters["rejected_future"] > refused_before[late5.peer_id]
    assert dragged.ledger.counters["rejected_future"] == refused_before[dragged.peer_id]

    # a write beyond the bound is refused by everyone and moves nobody's clock
    refused_before = {n.peer_id: n.ledger.counters["rejected_future"] for n in honest}
    forge_ahead(insider, "far-ahead", drift_ms + 1_000)
    await net.wait_for(lambda: all(n.ledger.counters["rejected_future"] > refused_before[n.peer_id] for n in honest), timeout=5)
    await asyncio.sleep(0.2)
    for node in honest:
        assert node.ledger.get_entry(BUCKET, "far-ahead") is None
        assert lead_ms(node) <= drift_ms // 2 + 500
    status = dragged.status()
    assert status["counters"]["ledger_rejected_future"] >= 1 and status["counters"]["ledger_clock_capped"] >= 1
