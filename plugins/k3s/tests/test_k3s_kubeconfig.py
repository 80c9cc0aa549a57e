"""The kubeconfig rewrite, and `kairos get-kubeconfig` fetching it from a master over a stream."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct

import pytest
import yaml
from click.testing import CliRunner

from kairos_core.cli import build_cli
from kairos_core.plugins import make_plugin_manager
from kairos_plugin_k3s import K3sPlugin, service
from kairos_plugin_k3s.cluster_state import ClusterState
from kairos_plugin_k3s.kubeconfig import KubeconfigError, rewrite_kubeconfig
from kairos_plugin_k3s.service import MAX_REPLY_BYTES as MAX_REPLY, PROTOCOL, KubeconfigUnavailable, request_kubeconfig
from kairos_testing.k3s import FakeVPN

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


def test_rewrite_refuses_an_address_that_is_not_one():
    for bad in ("10.1.0.1/../x", "evil.example:1234@host", "$(touch x)", ""):
        with pytest.raises(KubeconfigError):
            rewrite_kubeconfig(K3S_YAML, bad)


def kubeconfig_anywhere(node, text):
    """Whether any entry of ``node``'s ledger holds the kubeconfig or its client key."""
    key = yaml.safe_load(text)["users"][0]["user"]["client-key-data"]
    return any(key in entry.value_json for entry in node.ledger.entries() if not entry.deleted)


async def two_node_cluster(kairos_network, k3s_kit, **k3s):
    net = await kairos_network(0)
    plugin = K3sPlugin()
    vpn = FakeVPN()
    for name, hint in (("boss", "master"), ("hand", "worker")):
        await net.add_node(
            plugins=[plugin, vpn], name=name, overrides=k3s_kit.overrides(name, p2p={"role": hint, "minimum_nodes": 2}, k3s=k3s)
        )
    await net.fully_connected()
    boss, hand = net.nodes
    kubeconfig = k3s_kit.root("boss") / "etc/rancher/k3s/k3s.yaml"
    await net.wait_for(lambda: plugin.member(hand).launch is not None and kubeconfig.exists(), timeout=30)
    return net, plugin, boss, hand, kubeconfig.read_text()


def cli_invoke(node, *args):
    manager = make_plugin_manager(autoload=False, extra_plugins=[K3sPlugin()])
    return CliRunner().invoke(build_cli(manager), ["get-kubeconfig", "--socket", str(node.config.api_socket), *args], obj=manager)


async def test_get_kubeconfig_fetches_it_from_the_master_over_a_stream(kairos_network, k3s_kit):
    net, plugin, boss, hand, text = await two_node_cluster(kairos_network, k3s_kit)
    await net.wait_for(lambda: ClusterState(hand.ledger, "kairos", lease_holder=hand.lease_holder).node_token is not None)
    assert not any(kubeconfig_anywhere(n, text) for n in net.nodes)  # not replicated by default

    fetched, source = await plugin.member(hand).fetch_kubeconfig()
    assert (fetched, source) == (text, boss.peer_id)
    assert plugin.member(boss).counters["kubeconfig_served"] == 1

    boss_vip = boss.ledger.get("vpn", boss.peer_id)["vip"].split("/")[0]
    result = await asyncio.to_thread(cli_invoke, hand)
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.output)
    assert printed["clusters"][0]["cluster"]["server"] == f"https://{boss_vip}:6443"
    assert printed["users"] == yaml.safe_load(text)["users"]
    assert plugin.member(boss).counters["kubeconfig_served"] == 2
    explicit = await asyncio.to_thread(cli_invoke, hand, "--address", "192.168.1.50")
    assert yaml.safe_load(explicit.output)["clusters"][0]["cluster"]["server"] == "https://192.168.1.50:6443"
    on_master = await asyncio.to_thread(cli_invoke, boss)  # a master answers from its own file
    assert on_master.exit_code == 0 and plugin.member(boss).counters["kubeconfig_served"] == 3  # no stream for itself
    other = await asyncio.to_thread(cli_invoke, hand, "--network-id", "elsewhere")
    assert other.exit_code != 0 and "not 'elsewhere'" in str(other.exception)
    assert not any(kubeconfig_anywhere(n, text) for n in net.nodes)

    # a worker has none to give
    with pytest.raises(KubeconfigUnavailable, match="runs no k3s server"):
        await request_kubeconfig(boss, hand.peer_id)


async def test_share_kubeconfig_puts_it_in_the_ledger_and_off_withdraws_it(kairos_network, k3s_kit):
    net, plugin, boss, hand, text = await two_node_cluster(kairos_network, k3s_kit, share_kubeconfig=True)
    await net.wait_for(lambda: ClusterState(hand.ledger, "kairos", lease_holder=hand.lease_holder).kubeconfig == text)
    assert await plugin.member(hand).fetch_kubeconfig() == (text, "ledger")
    plugin.member(boss).settings = dataclasses.replace(plugin.member(boss).settings, share_kubeconfig=False)
    plugin.member(boss).wake()
    await net.wait_for(lambda: not any(kubeconfig_anywhere(n, text) for n in net.nodes), timeout=15)
    assert await plugin.member(hand).fetch_kubeconfig() == (text, boss.peer_id)


async def test_a_masters_answer_is_bounded_in_size_and_time(kairos_network, k3s_kit, monkeypatch):
    net, plugin, boss, hand, text = await two_node_cluster(kairos_network, k3s_kit)

    async def huge(stream):
        await stream.read_frame(4096)
        await stream.write(struct.pack(">I", 64 * 1024 * 1024))  # announces 64 MiB: never allocated
        await asyncio.sleep(1)

    async def silent(stream):
        await asyncio.sleep(30)

    async def garbage(stream):
        await stream.read_frame(4096)
        await stream.write_frame(json.dumps({"kubeconfig": "just: text"}).encode())

    boss.host.set_stream_handler(PROTOCOL, huge)
    with pytest.raises(KubeconfigUnavailable, match="exceeds the limit"):
        await request_kubeconfig(hand, boss.peer_id)
    boss.host.set_stream_handler(PROTOCOL, garbage)
    with pytest.raises(KubeconfigUnavailable, match="no clusters"):
        await request_kubeconfig(hand, boss.peer_id)
    monkeypatch.setattr(service, "STREAM_TIMEOUT", 0.5)
    boss.host.set_stream_handler(PROTOCOL, silent)
    with pytest.raises(KubeconfigUnavailable, match="no answer within"):
        await request_kubeconfig(hand, boss.peer_id)
    result = await asyncio.to_thread(cli_invoke, hand)
    assert result.exit_code != 0 and "no master sent it" in str(result.exception)

    # the other way round: a peer that asks and then says nothing, or too much, is dropped quietly
    boss.host.set_stream_handler(PROTOCOL, lambda stream: service.serve_stream(plugin.member(boss), stream))
    monkeypatch.setattr(service, "REQUEST_TIMEOUT", 0.3)
    mute = await hand.host.open_stream(boss.peer_id, PROTOCOL)
    assert await mute.read_frame(MAX_REPLY) == b""  # closed after the request timeout, no answer
    loud = await hand.host.open_stream(boss.peer_id, PROTOCOL)
    await loud.write_frame(b"x" * 10_000)
    try:
        reply = await loud.read_frame(MAX_REPLY)
    except Exception:  # reset rather than closed: either way, no answer
        reply = b""
    assert reply == b""
    await net.wait_for(lambda: plugin.member(boss).counters["kubeconfig_bad_requests"] == 2)
    assert boss.host.counters["stream_handler_errors"] == 0
    assert await request_kubeconfig(hand, boss.peer_id) == text  # and the real thing still works


def test_get_kubeconfig_without_a_node(tmp_path):
    manager = make_plugin_manager(autoload=False, extra_plugins=[K3sPlugin()])
    result = CliRunner().invoke(build_cli(manager), ["get-kubeconfig", "--socket", str(tmp_path / "api.sock")], obj=manager)
    assert result.exit_code != 0 and "no node with the k3s plugin is running here" in str(result.exception)
