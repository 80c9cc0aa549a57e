"""Whole clusters on in-process nodes: roles from the leader, k3s (fake) on the VPN, fail-over."""

from __future__ import annotations

import pytest

from kairos_plugin_k3s import CLUSTER_INIT, MASTER_HA, WORKER, K3sPlugin
from kairos_plugin_k3s.cluster_state import ClusterState, cluster_bucket
from kairos_testing.k3s import FakeVPN

HA = {"auto": {"ha": {"enable": True, "master_nodes": 2}}, "p2p": {"minimum_nodes": 4}}  # 3 masters in all


def started(kit, plugin, nodes):
    """Every node's k3s has been launched and the fake recorded the start."""
    return all(plugin.member(n) and plugin.member(n).launch and kit.calls(n.hostname) for n in nodes)


async def rounds_pass(net, plugin, nodes, count=3):
    """Wait until every node reconciled ``count`` more times (no sleeping on a clock)."""
    base = {n: plugin.member(n).counters["rounds"] for n in nodes}
    await net.wait_for(lambda: all(plugin.member(n).counters["rounds"] >= base[n] + count for n in nodes))


def role_entries(node):
    return {k: v for k, v in node.ledger.items(cluster_bucket(node.network_id)).items() if "/role/" in k}


@pytest.mark.slow
async def test_ha_cluster_assembles_and_keeps_roles_when_the_leader_dies(kairos_network, k3s_kit):
    net = await kairos_network(0)
    plugin = K3sPlugin()
    vpn = FakeVPN()
    for i in range(4):
        await net.add_node(plugins=[plugin, vpn], name=f"ha{i}", overrides=k3s_kit.overrides(f"ha{i}", **HA))
    await net.fully_connected()
    await net.wait_for(lambda: started(k3s_kit, plugin, net.nodes), timeout=40)

    roles = {n.peer_id: plugin.member(n).role for n in net.nodes}
    assert sorted(roles.values()) == sorted([CLUSTER_INIT, MASTER_HA, MASTER_HA, WORKER])
    init = next(n for n in net.nodes if roles[n.peer_id] == CLUSTER_INIT)
    init_vip = init.ledger.get("vpn", init.peer_id)["vip"].split("/")[0]
    token = (k3s_kit.root(init.hostname) / "var/lib/rancher/k3s/server/node-token").read_text().strip()
    await net.wait_for(
        lambda: all(ClusterState(n.ledger, n.network_id, lease_holder=n.lease_holder).node_token == token for n in net.nodes)
    )

    for node in net.nodes:
        vip = node.ledger.get("vpn", node.peer_id)["vip"].split("/")[0]
        call = k3s_kit.calls(node.hostname)[-1]
        role = roles[node.peer_id]
        assert call["argv"][1] == ("agent" if role == WORKER else "server")
        assert call["config"]["node-ip"] == vip and call["config"]["flannel-iface"] == "edgevpn0"
        assert call["config"].get("cluster-init", False) is (role == CLUSTER_INIT)
        if role == CLUSTER_INIT:
            assert "K3S_URL" not in call["env"]
        else:
            assert call["env"]["K3S_URL"] == f"https://{init_vip}:6443"
            assert call["env"]["K3S_TOKEN"] == token
        if role != WORKER:
            assert vip in call["config"]["tls-san"]

    old_leader, old_epoch = net.nodes[0].leader
    starts_before = {n: plugin.member(n).counters["starts"] for n in net.nodes}
    await next(n for n in net.nodes if n.peer_id == old_leader).stop()
    survivors = net.running()
    await net.wait_for(lambda: all(n.leader and n.leader[0] != old_leader for n in survivors), timeout=30)
    assert survivors[0].leader[1] > old_epoch
    await rounds_pass(net, plugin, survivors)

    for node in survivors:
        state = ClusterState(node.ledger, node.network_id, lease_holder=node.lease_holder)
        assert {peer: r.role for peer, r in state.roles().items()} == roles  # sticky: nothing reassigned
        assert sum(1 for v in role_entries(node).values() if v["role"] == CLUSTER_INIT) == 1
        assert len(role_entries(node)) == 4  # the new leader wrote nothing
        assert plugin.member(node).counters["starts"] == starts_before[node]  # k3s not restarted


async def test_roles_wait_for_minimum_nodes(kairos_network, k3s_kit):
    net = await kairos_network(0)
    plugin = K3sPlugin()
    three = {"p2p": {"minimum_nodes": 3}}
    for i in range(2):
        await net.add_node(plugins=[plugin], name=f"m{i}", overrides=k3s_kit.overrides(f"m{i}", **three))
    await net.fully_connected()
    await net.wait_for(lambda: all(n.leader for n in net.nodes), timeout=20)
    await rounds_pass(net, plugin, net.nodes)
    assert not role_entries(net.nodes[0]) and all(plugin.member(n).role is None for n in net.nodes)

    await net.add_node(plugins=[plugin], name="m2", overrides=k3s_kit.overrides("m2", **three))
    await net.wait_for(lambda: started(k3s_kit, plugin, net.nodes), timeout=30)
    assert sorted(plugin.member(n).role for n in net.nodes) == ["master", "worker", "worker"]
    # Without a VPN the node's own address is used, and no flannel interface is forced.
    master = next(n for n in net.nodes if plugin.member(n).role == "master")
    assert k3s_kit.calls(master.hostname)[-1]["config"]["node-ip"] == "127.0.0.1"
    assert "flannel-iface" not in k3s_kit.calls(master.hostname)[-1]["config"]


async def test_a_restarted_node_keeps_its_role(kairos_network, k3s_kit):
    net = await kairos_network(0)
    plugin = K3sPlugin()
    two = {"p2p": {"minimum_nodes": 2}}
    for i in range(2):
        await net.add_node(plugins=[plugin], name=f"r{i}", overrides=k3s_kit.overrides(f"r{i}", **two))
    await net.fully_connected()
    await net.wait_for(lambda: started(k3s_kit, plugin, net.nodes), timeout=30)
    before = {n.hostname: plugin.member(n).role for n in net.nodes}
    leader_id = net.nodes[0].leader[0]
    victim = next(n for n in net.nodes if n.peer_id != leader_id)
    await victim.stop()
    back = await net.add_node(plugins=[plugin], name=victim.hostname, overrides=k3s_kit.overrides(victim.hostname, **two))
    assert back.peer_id == victim.peer_id  # same state dir: same identity
    await net.wait_for(lambda: plugin.member(back).launch is not None and len(k3s_kit.calls(back.hostname)) >= 2, timeout=30)
    assert plugin.member(back).role == before[victim.hostname]
    assert len([k for k in role_entries(back) if f"/role/{back.peer_id}/" in k]) == 1
    calls = k3s_kit.calls(back.hostname)
    assert calls[-1]["argv"] == calls[0]["argv"] and calls[-1]["config"] == calls[0]["config"]  # same launch again
