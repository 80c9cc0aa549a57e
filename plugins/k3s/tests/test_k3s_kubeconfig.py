"""The kubeconfig rewrite and `kairos get-kubeconfig` against a running node's API."""

from __future__ import annotations

import asyncio

import pytest
import yaml
from click.testing import CliRunner

from kairos_core.cli import build_cli
from kairos_core.plugins import make_plugin_manager
from kairos_plugin_k3s import K3sPlugin
from kairos_plugin_k3s.kubeconfig import KubeconfigError, rewrite_kubeconfig

K3S_YAML = """apiVersion: v1
clusters:
- cluster:
    certificate-authority-data: Q0E=
    server: https://127.0.0.1:6443
  name: default
contexts:
- context: {cluster: default, user: default}
  name: default
current-context: default
kind: Config
users:
- name: default
  user: {client-certificate-data: Q0VSVA==, client-key-data: S0VZ}
"""


def test_rewrite_points_every_cluster_at_the_address():
    data = yaml.safe_load(rewrite_kubeconfig(K3S_YAML, "10.1.0.1"))
    assert data["clusters"][0]["cluster"]["server"] == "https://10.1.0.1:6443"
    assert data["clusters"][0]["cluster"]["certificate-authority-data"] == "Q0E="
    assert data["users"][0]["user"]["client-key-data"] == "S0VZ"
    v6 = yaml.safe_load(rewrite_kubeconfig(K3S_YAML, "fd00::5", port=16443))
    assert v6["clusters"][0]["cluster"]["server"] == "https://[fd00::5]:16443"


@pytest.mark.parametrize("text", ["::: not yaml", "just a string", "clusters: 3", "clusters: [7]"])
def test_rewrite_rejects_garbage(text):
    with pytest.raises(KubeconfigError):
        rewrite_kubeconfig(text, "10.1.0.1")


async def test_get_kubeconfig_command_reads_the_ledger_through_the_api(kairos_network):
    net = await kairos_network(1)
    node = net.nodes[0]
    manager = make_plugin_manager(autoload=False, extra_plugins=[K3sPlugin()])
    cli = build_cli(manager)
    socket = str(node.config.api_socket)

    def invoke(*args):
        return CliRunner().invoke(cli, ["get-kubeconfig", "--socket", socket, *args], obj=manager)

    missing = await asyncio.to_thread(invoke)
    assert missing.exit_code != 0 and "no kubeconfig" in str(missing.exception)

    node.ledger.set("kairos", "master-kubeconfig", K3S_YAML)
    node.ledger.set("kairos", "ip-master", "10.1.0.1")
    result = await asyncio.to_thread(invoke)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output)["clusters"][0]["cluster"]["server"] == "https://10.1.0.1:6443"

    explicit = await asyncio.to_thread(invoke, "--address", "192.168.1.50")
    assert yaml.safe_load(explicit.output)["clusters"][0]["cluster"]["server"] == "https://192.168.1.50:6443"
    other = await asyncio.to_thread(invoke, "--network-id", "elsewhere")
    assert other.exit_code != 0
