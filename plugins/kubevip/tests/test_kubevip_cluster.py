"""kubevip with the k3s plugin on in-process nodes: manifest on masters, EIP as SAN and server."""

from __future__ import annotations

from pathlib import Path

import yaml

from kairos_plugin_k3s import K3sPlugin
from kairos_plugin_k3s.cluster_state import ClusterState
from kairos_testing.k3s import FakeVPN
from kairos_plugin_kubevip import KubeVipPlugin

EIP = "192.168.1.200"
MANIFEST = "var/lib/rancher/k3s/server/manifests/kubevip.yaml"
STATIC = "var/lib/rancher/k3s/agent/pod-manifests/kubevip.yaml"


async def cluster(kairos_network, k3s_kit, kubevip=None, hints=("master", "worker")):
    net = await kairos_network(0)
    k3s = K3sPlugin()
    vpn = FakeVPN()
    for index, hint in enumerate(hints):
        name = f"kv{index}"
        await net.add_node(
            plugins=[k3s, KubeVipPlugin(), vpn],
            name=name,
            overrides=k3s_kit.overrides(
                name,
                p2p={"role": hint, "minimum_nodes": len(hints)},
                kubevip={"eip": EIP, "interface": "eth0", **(kubevip or {})},
            ),
        )
    await net.fully_connected()
    await net.wait_for(lambda: all(k3s.member(n).launch and k3s_kit.calls(n.hostname) for n in net.nodes), timeout=30)
    return net, k3s


async def test_masters_get_the_manifest_and_everyone_uses_the_eip(kairos_network, k3s_kit):
    net, k3s = await cluster(kairos_network, k3s_kit)
    master, worker = net.nodes
    documents = list(yaml.safe_load_all((k3s_kit.root("kv0") / MANIFEST).read_text()))
    assert {d["kind"] for d in documents} == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"}
    env = {e["name"]: e.get("value") for e in documents[-1]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["address"] == EIP and env["vip_interface"] == "eth0"
    assert not (k3s_kit.root("kv1") / MANIFEST).exists()  # workers get no manifest

    server = k3s_kit.calls("kv0")[-1]
    assert EIP in server["config"]["tls-san"] and server["config"]["flannel-iface"] == "edgevpn0"
    assert server["config"]["node-ip"] != EIP  # k3s itself stays on the VPN
    assert k3s_kit.calls("kv1")[-1]["env"]["K3S_URL"] == f"https://{EIP}:6443"
    await net.wait_for(
        lambda: ClusterState(worker.ledger, worker.network_id, lease_holder=worker.lease_holder).master_address == EIP
    )


async def test_static_pod_and_manifest_url(kairos_network, k3s_kit, tmp_path):
    rbac = tmp_path / "rbac.yaml"
    rbac.write_text("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: kube-vip, namespace: kube-system}\n")
    net, _ = await cluster(kairos_network, k3s_kit, kubevip={"static_pod": True}, hints=("master",))
    (pod,) = yaml.safe_load_all((k3s_kit.root("kv0") / STATIC).read_text())
    assert pod["kind"] == "Pod"
    assert pod["spec"]["volumes"][0]["hostPath"]["path"] == str(k3s_kit.root("kv0") / "etc/rancher/k3s/k3s.yaml")
    assert not (k3s_kit.root("kv0") / MANIFEST).exists()

    net2, _ = await cluster(
        kairos_network, k3s_kit.__class__(tmp_path / "kit2"), kubevip={"manifest_url": rbac.as_uri()}, hints=("master",)
    )
    root = net2.nodes[0].config["k3s"]["root"]
    documents = list(yaml.safe_load_all(Path(root, MANIFEST).read_text()))  # closes the file, unlike open().read()
    assert [d["kind"] for d in documents] == ["DaemonSet", "ServiceAccount"]
