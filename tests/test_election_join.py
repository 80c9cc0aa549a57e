"""A node joining a network that has a leader never proclaims itself leader meanwhile.

A fresh node that saw no lease claims epoch 1 after ``STARTUP_GRACE`` — right for the first node
of a network, wrong for a joiner whose first sync (which brings the sitting leader's lease) is
still on its way: at N = 100 on 2 cores three joiners in four announced themselves leader before
their claim lost to the sitting leader's. Real in-process nodes on loopback; the syncs are slowed
down, as a busy network slows them.
"""

from __future__ import annotations

import asyncio

from kairos_core import replication
from kairos_core.election import JOIN_WAIT_LEASES, STARTUP_GRACE, candidate_rank
from kairos_core.identity import IDENTITY_FILE, load_or_create_identity
from kairos_core.plugins import hookimpl

SYNC_DELAY = STARTUP_GRACE + 3.0  # seconds


class LeaderEvents:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    @hookimpl
    def on_leader_elected(self, node, leader: str, epoch: int) -> None:
        self.seen.append((leader, epoch))


def _identity_ranked_below(state_dir, other: str) -> str:
    """Create the identity of ``state_dir`` so that it is the election's candidate before ``other``."""
    while True:
        identity = load_or_create_identity(state_dir)
        if candidate_rank(identity.peer_id) < candidate_rank(other):
            return identity.peer_id
        (state_dir / IDENTITY_FILE).unlink()


async def test_a_joiner_with_its_sync_pending_does_not_claim_the_lease(kairos_network, monkeypatch) -> None:
    net = await kairos_network(1)
    (first,) = net.nodes
    await net.wait_for(lambda: first.election.leader == (first.peer_id, 1), timeout=20)

    # every sync session from now on takes SYNC_DELAY before it starts, and every gossip message
    # SYNC_DELAY before it is applied: the joiner learns the sitting leader's lease only then,
    # seconds after its own STARTUP_GRACE ran out
    real_sync, real_gossip = replication.sync_ledgers, replication.Replicator._on_gossip

    async def slow_sync(*args, **kwargs):
        await asyncio.sleep(SYNC_DELAY)
        return await real_sync(*args, **kwargs)

    async def slow_gossip(self, *args, **kwargs):
        await asyncio.sleep(SYNC_DELAY)
        return await real_gossip(self, *args, **kwargs)

    monkeypatch.setattr(replication, "sync_ledgers", slow_sync)
    monkeypatch.setattr(replication.Replicator, "_on_gossip", slow_gossip)
    joiner_id = _identity_ranked_below(net.root / "joiner", first.peer_id)  # it would be the candidate
    events = LeaderEvents()
    joiner = await net.add_node(plugins=[events], name="joiner")
    assert joiner.peer_id == joiner_id
    await net.wait_for(lambda: joiner.election.leader == (first.peer_id, 1), timeout=SYNC_DELAY + 20)
    await net.wait_for(lambda: events.seen, timeout=10)  # (plugins hear of it through a queue)
    await asyncio.sleep(1.0)
    assert events.seen == [(first.peer_id, 1)]
    assert first.election.leader == (first.peer_id, 1)


async def test_a_lone_node_still_leads_after_the_startup_grace(kairos_network) -> None:
    """No peer to sync with and no dial in flight: nothing to wait for."""
    events = LeaderEvents()
    net = await kairos_network(1, plugins=[events])
    (node,) = net.nodes
    await net.wait_for(lambda: node.election.leader == (node.peer_id, 1), timeout=STARTUP_GRACE + 10)
    assert events.seen == [(node.peer_id, 1)]


async def test_a_node_that_cannot_reach_its_peers_yet_is_not_alone(kairos_network) -> None:
    """Its dials fail (a bootstrap peer whose port refuses), so it has no admitted peer and, between
    two dials, none in flight: not alone — it waits JOIN_WAIT_LEASES leases before leading."""
    import socket

    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    absent = "12D3KooWJWoaqZhDaoEFshF7Rh1bpY9ohihFhzcW6d69Lr2NASuP"
    events = LeaderEvents()
    overrides = {"election": {"lease_seconds": 3.0}, "p2p": {"bootstrap_peers": [f"/ip4/127.0.0.1/tcp/{port}/p2p/{absent}"]}}
    net = await kairos_network(1, plugins=[events], overrides=overrides)
    (node,) = net.nodes
    await asyncio.sleep(STARTUP_GRACE + 4.0)
    assert node.election.leader is None and node.dialer.counters["dials_failed"] >= 1
    await net.wait_for(lambda: node.election.leader == (node.peer_id, 1), timeout=JOIN_WAIT_LEASES * 3.0 + 10)


class _DiscoveryStillLooking:
    """A discovery that has not had its look around yet (on a loaded machine mDNS answers can
    take longer than STARTUP_GRACE) until ``done`` is set."""

    def __init__(self) -> None:
        self.done = False

    def looked(self) -> bool:
        return self.done

    async def stop(self) -> None:
        pass


async def test_a_node_that_found_nobody_waits_for_its_discovery_before_it_leads(kairos_network, monkeypatch) -> None:
    """No peer, no dial, nobody to dial — but its discovery has not looked around yet: not alone
    until it has (then at once, not after JOIN_WAIT_LEASES leases)."""
    from kairos_core.node import Node

    discovery = _DiscoveryStillLooking()
    start_discovery = Node._start_discovery

    async def with_a_slow_discovery(self) -> None:
        await start_discovery(self)
        self._discovery.append(discovery)

    monkeypatch.setattr(Node, "_start_discovery", with_a_slow_discovery)
    events = LeaderEvents()
    lease = 5.0  # the cap, JOIN_WAIT_LEASES leases, lies past everything below
    net = await kairos_network(1, plugins=[events], overrides={"election": {"lease_seconds": lease}})
    (node,) = net.nodes
    await asyncio.sleep(STARTUP_GRACE + 3.0)
    assert node.election.leader is None and events.seen == []
    discovery.done = True
    await net.wait_for(lambda: node.election.leader == (node.peer_id, 1), timeout=5.0)
    assert JOIN_WAIT_LEASES * lease > STARTUP_GRACE + 3.0 + 5.0 + 5.0  # (so not by the cap)
