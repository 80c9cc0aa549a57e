"""Two clusters on one token (``p2p.network_id``): connected and sharing gossip, never each other's members."""

from __future__ import annotations

import asyncio


async def test_two_clusters_sharing_a_token_keep_their_own_members_and_leaders(kairos_network):
    net = await kairos_network(0)
    dev1 = await net.add_node(overrides={"p2p": {"network_id": "dev"}})
    dev2 = await net.add_node(overrides={"p2p": {"network_id": "dev"}})
    prod = await net.add_node(overrides={"p2p": {"network_id": "prod"}})
    await net.wait_for(lambda: set(dev1.members()) == {dev2.peer_id} and set(dev2.members()) == {dev1.peer_id}, timeout=20)
    await net.wait_for(lambda: prod.leader is not None and prod.leader[0] == prod.peer_id, timeout=30)
    await net.wait_for(lambda: dev1.leader is not None and dev1.leader == dev2.leader, timeout=30)
    await asyncio.sleep(4)  # past the join grace after which a connected peer without a usable entry would count
    assert prod.peer_id in dev1.neighbours() | dev2.neighbours()  # they are connected: the test means something
    assert prod.members() == {}
    assert set(dev1.members()) == {dev2.peer_id} and set(dev2.members()) == {dev1.peer_id}
    assert dev1.leader[0] in {dev1.peer_id, dev2.peer_id}
    assert prod.leader[0] == prod.peer_id
