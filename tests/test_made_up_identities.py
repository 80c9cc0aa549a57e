"""Made-up identities cannot steer membership or the election (hardening: an insider with the token).

An insider node signs ``nodes`` entries and leases for identities it generated but never connected,
and gossips them like its own writes. Real nodes on loopback must not count them: not as members,
voters or candidates, and their leases never win — whatever epoch they name.
"""

from __future__ import annotations

import asyncio

import pytest

from kairos_core.election import LEADER_BUCKET, MAX_EPOCH, lease_key
from kairos_core.identity import Identity
from kairos_core.ledger.entry import Entry
from kairos_core.membership import NODES_BUCKET

pytestmark = pytest.mark.slow


def forge(node, identity: Identity, bucket: str, key: str, value) -> None:
    """Sign an entry as ``identity`` and gossip it from ``node``, as an insider's tool would."""
    version = node.ledger.clock.tick()
    entry = Entry.signed(identity, bucket, key, value, type(version)(version.wall_ms, version.counter, identity.peer_id), False)
    node.ledger.apply_remote([entry])
    node.replicator.batcher.add(entry)


def fake_node_entry(node, identity: Identity, beat: int, neighbours=()) -> None:
    forge(
        node,
        identity,
        NODES_BUCKET,
        identity.peer_id,
        {
            "network_id": node.network_id,
            "hostname": f"fake-{identity.peer_id[-4:]}",
            "addresses": [],
            "version": "0.1.0",
            "role": "",
            "eligible": True,
            "neighbours": list(neighbours),
            "beat": beat,
        },
    )


def fake_lease(node, identity: Identity, epoch: int) -> None:
    version = node.ledger.clock.tick()
    forge(
        node,
        identity,
        LEADER_BUCKET,
        lease_key(node.network_id, epoch, identity.peer_id)
        if epoch <= MAX_EPOCH
        else f"{node.network_id}:{epoch}:{identity.peer_id}",
        {"peer": identity.peer_id, "epoch": epoch, "state": "held", "claimed": [version.wall_ms - 10_000, 0]},
    )


async def test_fake_leaders_fake_voters_and_fake_candidates_are_ignored(kairos_network):
    net = await kairos_network(4)
    await net.fully_connected()
    await net.wait_for(lambda: len({n.leader for n in net.nodes}) == 1 and net.nodes[0].leader is not None)
    leader, epoch = net.nodes[0].leader
    insider = next(n for n in net.nodes if n.peer_id != leader)
    honest = [n for n in net.nodes if n is not insider]

    fakes = [Identity.generate() for _ in range(10)]
    # the lowest-ranked fake would be "the candidate" if fakes counted; all vouch for each other
    for beat in range(3):
        for fake in fakes:
            fake_node_entry(insider, fake, beat, neighbours=[f.peer_id for f in fakes if f is not fake])
        await asyncio.sleep(0.2)
    fake_lease(insider, fakes[4], epoch)  # the current epoch, claimed earlier than the leader
    fake_lease(insider, fakes[0], epoch + 1)  # the next epoch
    fake_lease(insider, fakes[1], epoch + 1000)  # a jump
    fake_lease(insider, fakes[2], MAX_EPOCH)  # the parsers' limit
    fake_lease(insider, fakes[3], 10**12)  # beyond it
    await net.wait_for(lambda: all(n.ledger.get(NODES_BUCKET, fakes[-1].peer_id) for n in net.nodes))
    await net.wait_for(
        lambda: all(n.ledger.get_entry(LEADER_BUCKET, lease_key(n.network_id, epoch + 1, fakes[0].peer_id)) for n in net.nodes)
    )
    await asyncio.sleep(1.5)  # a few election rounds

    fake_ids = {f.peer_id for f in fakes}
    for node in net.nodes:
        assert node.leader == (leader, epoch), "a forged lease won"
        assert not fake_ids & set(node.members()), "a made-up identity counts as a member"
        assert not fake_ids & node.membership.recently_alive(300), "a made-up identity counts as a voter"
        assert node.election.chain_top() == epoch + 1  # the jumps never extend the chain
        # what plugins fence by (k3s role assignments): the attested leader, never a made-up one
        assert node.lease_holder(epoch) == leader
        assert node.lease_holder(epoch + 1) is None

    # fail-over still works with the fakes around: kill the leader, one honest node takes over
    await next(n for n in net.nodes if n.peer_id == leader).stop()
    survivors = [n for n in net.nodes if n.peer_id != leader]
    await net.wait_for(
        lambda: len({n.leader for n in survivors}) == 1 and survivors[0].leader is not None and survivors[0].leader[0] != leader,
        timeout=30,
    )
    new_leader, new_epoch = survivors[0].leader
    assert new_leader in {n.peer_id for n in survivors}
    assert new_epoch == epoch + 2  # past the forged epoch+1 (epochs never go back), not past the jumps
    await net.wait_for(lambda: all(n.lease_holder(new_epoch) == new_leader for n in survivors))
    assert all(n.lease_holder(epoch) == leader for n in survivors)  # history is kept once the leader is gone
    assert honest  # (the insider may lead too: it is a real node; only the fakes must not)
