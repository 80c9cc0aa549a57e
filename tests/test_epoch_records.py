"""Who led each epoch: every member records it, answers at once, and publishes it later.

Every member writes the leaders it saw confirmed in ``nodes/<peer_id>/epochs`` (what
``lease_holder`` answers for nodes that joined later). Those writes used to go out the moment a
leader was announced — N writes, all at once, competing with the lease itself on its way to the
last nodes. They are now spread over a random wait; these tests check the record is still there
when it is needed: at once on the node itself, in the ledger of every node after the wait, and
on disk after a graceful stop.
"""

from __future__ import annotations

import time

import pytest

from kairos_core import node as node_module
from kairos_core import plugin as api
from kairos_core.membership import NODES_BUCKET

pytestmark = pytest.mark.slow


class _RecordAtAnnouncement:
    """What a node's ledger held of its own record when ``on_leader_elected`` told its plugins."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str | None, object]] = []  # (epoch, lease_holder, published record)

    @api.hookimpl
    def on_leader_elected(self, node: api.NodeView, leader: str, epoch: int) -> None:
        published = node.ledger.get(NODES_BUCKET, f"{node.peer_id}/{node_module.EPOCH_RECORD}")
        self.seen.append((epoch, node.lease_holder(epoch), published))


async def test_members_answer_at_once_and_publish_their_records_after_a_spread_wait(kairos_network):
    net = await kairos_network(0)
    probes = [_RecordAtAnnouncement() for _ in range(3)]
    nodes = [await net.add_node(plugins=[probe], name=f"n{i}") for i, probe in enumerate(probes)]
    await net.wait_for(lambda: len({n.leader for n in nodes}) == 1 and nodes[0].leader is not None, timeout=30)
    leader, epoch = nodes[0].leader
    announced = time.monotonic()
    await net.wait_for(lambda: all(probe.seen for probe in probes), timeout=10)

    for probe in probes:
        seen_epoch, holder, published = probe.seen[-1]
        assert (seen_epoch, holder) == (epoch, leader)  # answered from memory at once
        # ... and not yet written: the write waits at least EPOCH_RECORD_DELAY
        assert not (isinstance(published, dict) and str(epoch) in published)

    # after the wait, every node holds every member's record (what a later joiner reads)
    records = [f"{n.peer_id}/{node_module.EPOCH_RECORD}" for n in nodes]
    await net.wait_for(
        lambda: all((n.ledger.get(NODES_BUCKET, key) or {}).get(str(epoch)) == leader for n in nodes for key in records),
        timeout=node_module.EPOCH_RECORD_DELAY + 3 * node_module.EPOCH_RECORD_SPREAD + 15,
    )
    assert time.monotonic() - announced >= node_module.EPOCH_RECORD_DELAY - 1.0


async def test_a_graceful_stop_publishes_the_pending_record(kairos_network, monkeypatch):
    monkeypatch.setattr(node_module, "EPOCH_RECORD_DELAY", 3600.0)  # never by the timer in this test
    net = await kairos_network(0)
    solo = await net.add_node(name="solo")
    await net.wait_for(lambda: solo.leader is not None, timeout=30)
    leader, epoch = solo.leader
    await net.wait_for(lambda: solo.lease_holder(epoch) == leader, timeout=5)
    key = f"{solo.peer_id}/{node_module.EPOCH_RECORD}"
    assert str(epoch) not in (solo.ledger.get(NODES_BUCKET, key) or {})  # still pending
    await solo.stop()
    again = await net.add_node(name="solo")
    assert (again.ledger.get(NODES_BUCKET, key) or {}).get(str(epoch)) == leader
    assert again.lease_holder(epoch) == leader
