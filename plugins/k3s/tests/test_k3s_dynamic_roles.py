"""Kairos's p2p.dynamic_roles on a real network: the leader takes back the role of a node that
stopped, and a node that comes later gets a role."""

from __future__ import annotations

from kairos_plugin_k3s import K3sPlugin
from kairos_plugin_k3s.cluster_state import ClusterState
from kairos_testing.k3s import process_alive


def roles_seen_by(node):
    state = ClusterState(node.ledger, node.network_id, lease_holder=node.lease_holder)
    return {peer: record.role for peer, record in state.roles().items()}


async def test_the_leader_takes_back_the_role_of_a_node_that_stopped(kairos_network, k3s_kit):
    net = await kairos_network(0)
    plugin = K3sPlugin()
    # written as Kairos users write it: p2p.dynamic_roles
    dynamic = {"p2p": {"minimum_nodes": 3, "dynamic_roles": True}}
    for i in range(3):
        await net.add_node(plugins=[plugin], name=f"d{i}", overrides=k3s_kit.overrides(f"d{i}", **dynamic))
    await net.fully_connected()
    await net.wait_for(lambda: len(roles_seen_by(net.nodes[0])) == 3, timeout=40)
    leader_id = net.nodes[0].leader[0]
    roles = roles_seen_by(net.nodes[0])
    # a worker that does not lead (of two workers, one at least)
    gone = next(n for n in net.nodes if n.peer_id != leader_id and roles[n.peer_id] == "worker")
    gone_id = gone.peer_id
    await gone.stop()
    # its k3s stopped with it (the shutdown hook could time out under load, and k3s ran on)
    assert [call["pid"] for call in k3s_kit.calls(gone.hostname) if process_alive(call["pid"])] == []
    survivors = net.running()
    await net.wait_for(lambda: all(gone_id not in roles_seen_by(n) for n in survivors), timeout=40)
    assert all(len(roles_seen_by(n)) == 2 for n in survivors)

    newcomer = await net.add_node(plugins=[plugin], name="d3", overrides=k3s_kit.overrides("d3", **dynamic))
    await net.wait_for(lambda: newcomer.peer_id in roles_seen_by(survivors[0]), timeout=40)
    assert roles_seen_by(survivors[0])[newcomer.peer_id] == "worker"  # the master is still there
