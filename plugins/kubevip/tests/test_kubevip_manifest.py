"""The kube-vip manifests parse as Kubernetes YAML and carry the required settings."""

from __future__ import annotations

import pytest
import yaml

from kairos_core.config import resolve_config
from kairos_core.errors import ConfigError
from kairos_core.plugins import make_plugin_manager
from kairos_plugin_kubevip.manifest import KubeVipSpec, daemonset, rbac, render, static_pod
from kairos_plugin_kubevip.plugin import KubeVipPlugin, default_route_interface

SPEC = KubeVipSpec(eip="192.168.1.200", interface="eth1")


def env_of(container):
    return {item["name"]: item.get("value") for item in container["env"]}


def test_daemonset_with_rbac_parses_and_has_the_settings():
    documents = list(yaml.safe_load_all(render(rbac() + [daemonset(SPEC)])))
    assert [d["kind"] for d in documents] == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"]
    for document in documents:
        assert document["apiVersion"] and document["metadata"]["name"]
    ds = documents[-1]
    assert ds["metadata"]["namespace"] == "kube-system"
    pod = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"] == ds["spec"]["template"]["metadata"]["labels"]
    assert pod["hostNetwork"] is True and pod["serviceAccountName"] == documents[0]["metadata"]["name"]
    container = pod["containers"][0]
    assert container["image"] == "ghcr.io/kube-vip/kube-vip:v0.8.7" and container["args"] == ["manager"]
    env = env_of(container)
    assert env["address"] == "192.168.1.200" and env["vip_cidr"] == "32" and env["vip_interface"] == "eth1"
    assert env["vip_arp"] == "true" and env["cp_enable"] == "true" and env["port"] == "6443"
    assert (env["vip_leaderelection"], env["vip_leaseduration"], env["vip_renewdeadline"], env["vip_retryperiod"]) == (
        "true",
        "5",
        "3",
        "1",
    )
    assert all(isinstance(v, str) for v in env.values() if v is not None)  # Kubernetes env values are strings
    assert set(container["securityContext"]["capabilities"]["add"]) >= {"NET_ADMIN", "NET_RAW"}
    binding = documents[2]
    assert binding["roleRef"]["name"] == documents[1]["metadata"]["name"]
    lease_rule = next(r for r in documents[1]["rules"] if "leases" in r["resources"])
    assert "create" in lease_rule["verbs"]


def test_static_pod_parses_and_mounts_the_kubeconfig():
    (pod,) = yaml.safe_load_all(render([static_pod(SPEC, "/etc/rancher/k3s/k3s.yaml")]))
    assert pod["kind"] == "Pod" and pod["apiVersion"] == "v1" and pod["spec"]["hostNetwork"] is True
    container = pod["spec"]["containers"][0]
    assert env_of(container)["address"] == "192.168.1.200"
    assert pod["spec"]["volumes"][0]["hostPath"]["path"] == "/etc/rancher/k3s/k3s.yaml"
    assert container["volumeMounts"][0]["mountPath"] == "/etc/kubernetes/admin.conf"


def test_image_reference():
    assert KubeVipSpec("1.2.3.4", "eth0", image="reg.local/kv", version="v0.9.0").image_ref == "reg.local/kv:v0.9.0"
    assert KubeVipSpec("1.2.3.4", "eth0", image="reg.local:5000/kv:pinned").image_ref == "reg.local:5000/kv:pinned"


def test_default_route_interface(tmp_path):
    table = tmp_path / "route"
    table.write_text("Iface\tDestination\tGateway\nwlan0\t0001A8C0\t00000000\nenp3s0\t00000000\t0101A8C0\n")
    assert default_route_interface(table) == "enp3s0"
    assert default_route_interface(tmp_path / "missing") == "eth0"


def test_config_values_their_types_let_through_are_refused():
    manager = make_plugin_manager(autoload=False, extra_plugins=[KubeVipPlugin()])
    assert resolve_config({"kubevip": {"eip": "192.168.1.10/24"}}, manager, env={}, check_token=False)
    with pytest.raises(ConfigError) as info:
        resolve_config({"kubevip": {"eip": "10.0.0.300", "manifest_url": "ftp://x"}}, manager, env={}, check_token=False)
    assert info.value.problems == [
        "kubevip.eip: '10.0.0.300' is not an IP address",
        "kubevip.manifest_url: only https://, http:// and file:// URLs are supported, not 'ftp://x'",
    ]
