"""The k3s plugin's own hookspecs: each called as documented, on a real two-node cluster."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from kairos_core.config import resolve_config
from kairos_core.errors import ConfigError
from kairos_core.plugins import hookimpl, make_plugin_manager
from kairos_plugin_k3s import K3sPlugin, hookspecs
from kairos_plugin_k3s.cluster_state import ClusterState

ROOT = Path(__file__).resolve().parents[3]
HOOKS = sorted(name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("k3s_"))


class Extension:
    """A plugin that implements every k3s hook and records the calls."""

    def __init__(self):
        self.calls = []

    @hookimpl(optionalhook=True)
    def k3s_server_args(self, node, role):
        self.calls.append(("server_args", node.hostname, role))
        return ["--disable=traefik"]

    @hookimpl(optionalhook=True)
    async def k3s_agent_args(self, node):
        self.calls.append(("agent_args", node.hostname))
        return ["--node-label=edge=true"]

    @hookimpl(optionalhook=True)
    def k3s_tls_sans(self, node):
        self.calls.append(("tls_sans", node.hostname))
        return ["api.example.test"]

    @hookimpl(optionalhook=True)
    def k3s_server_address(self, node):
        self.calls.append(("server_address", node.hostname))
        return "192.0.2.10"

    @hookimpl(optionalhook=True)
    def k3s_before_start(self, node, role, paths):
        self.calls.append(("before_start", node.hostname, role))
        paths.manifests_dir.mkdir(parents=True, exist_ok=True)
        (paths.manifests_dir / "extension.yaml").write_text(f"# {role}\n")


async def two_node_cluster(kairos_network, k3s_kit, extension):
    net = await kairos_network(0)
    plugin = K3sPlugin()
    for name, hint in (("boss", "master"), ("hand", "worker")):
        await net.add_node(
            plugins=[plugin, extension], name=name, overrides=k3s_kit.overrides(name, p2p={"role": hint, "minimum_nodes": 2})
        )
    await net.fully_connected()
    await net.wait_for(lambda: all(plugin.member(n).launch and k3s_kit.calls(n.hostname) for n in net.nodes), timeout=30)
    return net, plugin


async def test_hook_k3s_server_args(kairos_network, k3s_kit):
    extension = Extension()
    await two_node_cluster(kairos_network, k3s_kit, extension)
    assert ("server_args", "boss", "master") in extension.calls
    assert not any(c[0] == "server_args" and c[1] == "hand" for c in extension.calls)
    assert "--disable=traefik" in k3s_kit.calls("boss")[-1]["argv"]


async def test_hook_k3s_agent_args(kairos_network, k3s_kit):
    extension = Extension()
    await two_node_cluster(kairos_network, k3s_kit, extension)
    assert ("agent_args", "hand") in extension.calls and ("agent_args", "boss") not in extension.calls
    assert k3s_kit.calls("hand")[-1]["argv"][1:] == ["agent", "--node-label=edge=true", "--with-node-id"]


async def test_hook_k3s_tls_sans(kairos_network, k3s_kit):
    extension = Extension()
    await two_node_cluster(kairos_network, k3s_kit, extension)
    assert k3s_kit.calls("boss")[-1]["config"]["tls-san"] == ["127.0.0.1", "api.example.test"]
    assert "tls-san" not in k3s_kit.calls("hand")[-1]["config"]


async def test_hook_k3s_server_address(kairos_network, k3s_kit):
    extension = Extension()
    net, _ = await two_node_cluster(kairos_network, k3s_kit, extension)
    assert k3s_kit.calls("hand")[-1]["env"]["K3S_URL"] == "https://192.0.2.10:6443"
    await net.wait_for(
        lambda: ClusterState(net.nodes[1].ledger, "kairos", lease_holder=net.nodes[1].lease_holder).master_address == "192.0.2.10"
    )


async def test_hook_k3s_before_start(kairos_network, k3s_kit):
    extension = Extension()
    await two_node_cluster(kairos_network, k3s_kit, extension)
    assert ("before_start", "boss", "master") in extension.calls and ("before_start", "hand", "worker") in extension.calls
    assert (k3s_kit.root("boss") / "var/lib/rancher/k3s/server/manifests/extension.yaml").read_text() == "# master\n"


def test_k3s_hookspecs_are_the_designed_set():
    assert set(HOOKS) >= {"k3s_server_args", "k3s_agent_args", "k3s_tls_sans"}


@pytest.mark.parametrize("name", HOOKS)
def test_k3s_hooks_have_docstrings_docs_and_tests(name):
    spec = getattr(hookspecs, name)
    doc = inspect.getdoc(spec) or ""
    assert "Called" in doc and ":return:" in doc
    params = ", ".join(inspect.signature(spec).parameters)
    assert f"{name}({params})" in (ROOT / "plugins/k3s/README.md").read_text()
    sources = [p.read_text() for p in ROOT.glob("plugins/*/tests/**/*.py")]
    assert any(re.search(rf"def test_hook_{name}\b", src) for src in sources), f"no test_hook_{name}"


async def test_a_failing_extension_does_not_stop_k3s(kairos_network, k3s_kit):
    class Broken:
        @hookimpl(optionalhook=True)
        def k3s_server_args(self, node, role):
            raise RuntimeError("boom")

        @hookimpl(optionalhook=True)
        def k3s_tls_sans(self, node):
            return "not a list"

    net = await kairos_network(0)
    plugin = K3sPlugin()
    node = await net.add_node(
        plugins=[plugin, Broken()], name="solo", overrides=k3s_kit.overrides("solo", p2p={"minimum_nodes": 1})
    )
    await net.wait_for(lambda: plugin.member(node).launch is not None and k3s_kit.calls("solo"), timeout=30)
    assert k3s_kit.calls("solo")[-1]["argv"][1:] == ["server"]
    assert plugin.member(node).counters["bad_hook_results"] >= 1


def test_config_values_their_types_let_through_are_refused():
    manager = make_plugin_manager(autoload=False, extra_plugins=[K3sPlugin()])
    assert resolve_config({"k3s": {"runner": "process"}}, manager, env={}, check_token=False)["k3s"]["runner"] == "process"
    with pytest.raises(ConfigError) as info:
        resolve_config(
            {"k3s": {"runner": "sytemd", "api_port": 70000}, "auto": {"ha": {"master_nodes": -1}}},
            manager,
            env={},
            check_token=False,
        )
    assert info.value.problems == [
        "k3s.runner: 'sytemd' is not one of auto, systemd, openrc, process",
        "k3s.api_port: must be between 1 and 65535, not 70000",
        "auto.ha.master_nodes: must be at least 0, not -1",
    ]


def test_node_ip_and_env_names_are_checked_with_the_config_and_share_kubeconfig_is_off_by_default():
    manager = make_plugin_manager(autoload=False, extra_plugins=[K3sPlugin()])
    assert resolve_config({}, manager, env={}, check_token=False)["k3s"]["share_kubeconfig"] is False
    with pytest.raises(ConfigError) as info:
        resolve_config(
            {
                "k3s": {"node_ip": "10.1.0.1; touch /tmp/x", "env": {"A B": "1", "OK_1": "2"}},
                "k3s-agent": {"env": {"X=$(id)": "1"}},
            },
            manager,
            env={},
            check_token=False,
        )
    assert info.value.problems == [
        "k3s.node_ip: '10.1.0.1; touch /tmp/x' is not an IP address",
        "k3s.env: 'A B' is not a valid environment variable name",
        "k3s-agent.env: 'X=$(id)' is not a valid environment variable name",
    ]
