"""Kairos cloud-configs read as is (tests/fixtures/kairos, written from the Kairos docs' examples):
OS sections ignored, every key provider-kairos reads honoured with Kairos's meaning or accepted
with a warning, errors naming the path the user wrote."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from kairos_core.cli import main
from kairos_core.config import load_config, parse_config_text, resolve_config
from kairos_core.errors import ConfigError
from kairos_core.plugins import hookimpl, make_plugin_manager
from kairos_core.schema import Option, Section

FIXTURES = Path(__file__).parent / "fixtures" / "kairos"
CONFIGS = sorted(FIXTURES.glob("*.yaml"))

k3s = pytest.importorskip("kairos_plugin_k3s", reason="the Kairos examples configure k3s")
pytest.importorskip("kairos_plugin_tunvpn", reason="the Kairos examples configure the VPN")
pytest.importorskip("kairos_plugin_kubevip", reason="the Kairos examples configure kube-vip")

from kairos_plugin_k3s.addresses import vpn_in_use  # noqa: E402
from kairos_plugin_kubevip import KubeVipPlugin  # noqa: E402
from kairos_plugin_k3s.launch import build_launch  # noqa: E402
from kairos_plugin_k3s.paths import K3sPaths  # noqa: E402
from kairos_plugin_k3s.roles import CLUSTER_INIT, MASTER_HA, is_server, plan_roles  # noqa: E402
from kairos_plugin_k3s.settings import K3sSettings  # noqa: E402


@pytest.fixture(scope="module")
def manager():
    # the installed plugins, as `kairos` loads them; but not a DNS plugin, which would claim p2p.dns
    # (the warnings below are those of a network without one)
    return make_plugin_manager(disabled=["dns"])


def load(name, manager):
    return load_config(FIXTURES / name, manager, env={})


def resolve(text, manager):
    return resolve_config(parse_config_text(text), manager, env={})


def refused(text, manager):
    """The problems of a config that must be refused."""
    with pytest.raises(ConfigError) as exc:
        resolve(text, manager)
    return exc.value.problems


def masters_planned(settings, nodes=6):
    plan = plan_roles(
        {f"n{i}": "" for i in range(nodes)}, {}, ha=settings.ha_enable, masters=settings.masters_total, minimum_nodes=1
    )
    return sorted(role for role in plan.values() if is_server(role))


def test_the_fixtures_cover_the_docs_examples():
    assert {path.stem for path in CONFIGS} >= {
        "single-node",
        "multi-node-p2p",
        "ha-kubevip",
        "kubevip-every-key",
        "network-id-dev",
        "network-id-prod",
        "static-master",
        "static-worker",
        "ha-typo",
        "vpn-env",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_kairos_config_check_says_ok_for_every_example(path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["config", "check", str(path)])
        raise SystemExit(0)
    captured = capsys.readouterr()
    assert exc.value.code == 0, captured.err
    assert captured.out.startswith(f"{path}: ok")
    # warnings only, each on its own line: never a problem
    assert all(": note: " in line or ": warning: " in line for line in captured.err.splitlines()), captured.err
    with pytest.raises(SystemExit) as exc:
        main(["config", "check", "--json", str(path)])
        raise SystemExit(0)
    report = json.loads(capsys.readouterr().out)
    assert exc.value.code == 0 and report["ok"] is True and report["problems"] == []


def test_os_sections_are_listed_once_as_ignored(manager):
    config = load("ha-typo.yaml", manager)
    assert config.notes == ["ignored (they configure the OS, not the p2p network): install, hostname, users"]


def test_single_node_is_its_own_master(manager):
    config = load("single-node.yaml", manager)
    assert config["p2p"]["role"] == "master" and config["p2p"]["disable_dht"] is True
    assert config.warnings == []


def test_ha_with_kubevip_has_three_masters_and_no_vpn(manager):
    config = load("ha-kubevip.yaml", manager)
    settings = K3sSettings.from_config(config)
    # master_nodes: 2 are two masters *besides* the clusterinit one, as Kairos counts them
    assert settings.ha_enable and settings.masters_total == 3
    assert masters_planned(settings) == [CLUSTER_INIT, MASTER_HA, MASTER_HA]
    assert vpn_in_use(config) is False  # vpn.create: false, vpn.use: false
    assert config["kubevip"]["eip"] == "192.168.1.110" and config["kubevip"]["interface"] == "ens18"
    # what the masters get: a kube-vip DaemonSet (with the built-in RBAC: manifest_url "") on ens18
    spec = KubeVipPlugin().spec(SimpleNamespace(config=config))
    assert (spec.eip, spec.interface) == ("192.168.1.110", "ens18")
    assert KubeVipPlugin().k3s_tls_sans(SimpleNamespace(config=config)) == ["192.168.1.110"]
    assert config["kubevip"]["static_pod"] is False and config.warnings == []


def test_every_key_of_the_kairos_kubevip_block_has_its_meaning(manager):
    config = load("kubevip-every-key.yaml", manager)
    section = config["kubevip"]
    assert section["enable"] is True and section["static_pod"] is True  # `enabled`, newer Kairos's spelling
    spec = KubeVipPlugin().spec(SimpleNamespace(config=config))
    assert (spec.eip, spec.interface, spec.image_ref) == ("192.168.1.110", "ens18", "ghcr.io/kube-vip/kube-vip:v0.8.7")
    assert config.warnings == [
        "kubevip.args: accepted, but has no effect here: this plugin writes kube-vip's manifest itself "
        "(no `kube-vip manifest` command runs): use kubevip.interface, static_pod, version and image"
    ]
    # Kairos: an EIP turns kube-vip on unless enable is false; both spellings at once are refused
    off = resolve("kubevip:\n  eip: 192.168.1.110\n  enable: false\n", manager)
    assert KubeVipPlugin().spec(SimpleNamespace(config=off)) is None
    assert refused("kubevip:\n  enable: true\n  enabled: false\n", manager) == [
        "kubevip.enabled: sets the same option as kubevip.enable; give one of them"
    ]
    assert refused("kubevip:\n  args: --services\n", manager) == ["kubevip.args: expected a list, got a string"]


def test_the_docs_p2p_ha_typo_is_read_as_auto_ha_with_a_warning(manager):
    config = load("ha-typo.yaml", manager)
    settings = K3sSettings.from_config(config)
    # no ha.enable: master_nodes given turns HA on, as in Kairos
    assert settings.ha_enable and settings.masters_total == 3
    assert config.warnings == [
        "p2p.ha: read as p2p.auto.ha (a typo in one Kairos docs example; provider-kairos itself ignores p2p.ha)"
    ]


def test_network_id_names_two_clusters_on_one_token(manager):
    dev, prod = load("network-id-dev.yaml", manager), load("network-id-prod.yaml", manager)
    assert (dev["p2p"]["network_id"], prod["p2p"]["network_id"]) == ("dev", "prod")
    assert K3sSettings.from_config(dev).ha_enable is False
    assert K3sSettings.from_config(prod).masters_total == 3


def test_static_roles_without_auto(manager):
    master, worker = load("static-master.yaml", manager), load("static-worker.yaml", manager)
    assert (K3sSettings.from_config(master).role_hint, K3sSettings.from_config(worker).role_hint) == ("master", "worker")
    assert K3sSettings.from_config(master).auto_enable is False
    assert master["k3s"]["args"] == ("--disable=traefik,servicelb",)
    assert worker["k3s-agent"]["args"] == ("--node-label=zone=edge",)


def test_every_p2p_key_of_the_reference_has_its_kairos_meaning(manager, tmp_path):
    config = load("vpn-env.yaml", manager)
    assert config["node"]["log_level"] == "warning"  # p2p.loglevel: warn (go-log's name)
    assert config["p2p"]["network_id"] == "dev" and config["p2p"]["minimum_nodes"] == 3
    # EdgeVPN's variables set the options they mean
    assert config["vpn"]["address"] == "auto"  # DHCP: "true" (EdgeVPN then ignores ADDRESS)
    assert config["p2p"]["disable_dht"] is True  # EDGEVPNDHT: "false" (over disable_dht: false, as in Kairos)
    assert config["p2p"]["connections"]["high"] == 200  # EDGEVPNMAXCONNS
    settings = K3sSettings.from_config(config)
    assert settings.dynamic_roles is True and settings.embedded_registry is True
    assert settings.ha_enable and settings.masters_total == 3
    assert config["vpn"]["use"] is True and vpn_in_use(config)
    # k3s.embedded_registry reaches the servers' k3s config, not the agents'
    paths = K3sPaths.under(tmp_path)
    server = build_launch(
        CLUSTER_INIT,
        flags=settings.server,
        binary="k3s",
        paths=paths,
        node_ip="10.1.0.2",
        interface="edgevpn0",
        embedded_registry=settings.embedded_registry,
    )
    assert server.config["embedded-registry"] is True
    assert config.warnings == [
        "p2p.vpn.env.ADDRESS: ignored, p2p.vpn.env.DHCP is given too and wins",
        "p2p.vpn.env.EDGEVPNLOWPROFILEVPN: accepted, but has no effect here: tunvpn has no low-profile mode: it "
        "keeps at most p2p.connections.high connections and dials VPN members on demand",
        "p2p.vpn.env.DNSFORWARD: accepted, but has no effect here: DNS needs a DNS plugin (kairos-plugin-dns), "
        "which is not installed",
        "p2p.vpn.env.DNSCACHESIZE: accepted, but has no effect here: DNS needs a DNS plugin (kairos-plugin-dns), "
        "which is not installed",
        "p2p.vpn.env.DNSFORWARDSERVER: accepted, but has no effect here: DNS needs a DNS plugin (kairos-plugin-dns), "
        "which is not installed",
        "p2p.dns: accepted, but has no effect here: DNS needs a DNS plugin (kairos-plugin-dns), which is not installed",
    ]


def test_edgevpn_variables_set_static_addresses_and_unknown_ones_warn(manager):
    config = resolve(
        "p2p:\n  vpn:\n    env:\n      DHCP: 'false'\n      ADDRESS: 10.1.0.30/24\n      IFACE: vpn1\n"
        "      EDGEVPNMTU: '1300'\n      EDGEVPNBOOTSTRAPPEERS: '/ip4/10.0.0.1/tcp/1/p2p/x, /ip4/10.0.0.2/tcp/1/p2p/y'\n"
        "      NOSUCHVAR: '1'\n",
        manager,
    )
    assert (config["vpn"]["address"], config["vpn"]["interface"], config["vpn"]["mtu"]) == ("10.1.0.30/24", "vpn1", 1300)
    assert config["p2p"]["bootstrap_peers"] == ("/ip4/10.0.0.1/tcp/1/p2p/x", "/ip4/10.0.0.2/tcp/1/p2p/y")
    assert config.warnings == ["p2p.vpn.env.NOSUCHVAR: an EdgeVPN variable kairos-plugin-tunvpn does not use, ignored"]
    # what the plugin finds wrong (an address outside vpn.cidr) names both paths as written
    assert refused("p2p:\n  vpn:\n    cidr: 10.1.0.0/24\n    env:\n      ADDRESS: 10.2.0.30/24\n", manager) == [
        "p2p.vpn.env.ADDRESS: 10.2.0.30 is not a host address of p2p.vpn.cidr 10.1.0.0/24"
    ]
    assert refused("vpn:\n  cidr: 10.1.0.0/24\np2p:\n  vpn:\n    env:\n      ADDRESS: 10.2.0.30/24\n", manager) == [
        "p2p.vpn.env.ADDRESS: 10.2.0.30 is not a host address of vpn.cidr 10.1.0.0/24"
    ]


def test_edgevpn_address_outside_our_default_network_gives_the_network(manager):
    # Kairos users write ADDRESS with EdgeVPN's prefix and no cidr of ours: the prefix is the network
    from kairos_plugin_tunvpn.vpn import VPNSettings

    config = resolve("p2p:\n  vpn:\n    env:\n      DHCP: 'false'\n      ADDRESS: 10.2.0.30/24\n", manager)
    assert config["vpn"]["address"] == "10.2.0.30/24" and config["vpn"]["cidr"] == ""
    settings = VPNSettings.from_config(config["vpn"])
    assert (str(settings.static), str(settings.network)) == ("10.2.0.30/24", "10.2.0.0/24")
    # a prefix that leaves no network, or no prefix outside the default, is a clear problem
    env = "p2p:\n  vpn:\n    env:\n      ADDRESS: {}\n"
    assert refused(env.format("10.2.0.30/32"), manager) == [
        "p2p.vpn.env.ADDRESS: 10.2.0.30/32 leaves no VPN network around it: give the VPN's prefix "
        "(10.2.0.30/24, say) or set vpn.cidr"
    ]
    assert refused(env.format("10.2.0.30"), manager) == [
        "p2p.vpn.env.ADDRESS: 10.2.0.30 is not a host address of the default vpn.cidr 10.1.0.0/24"
    ]
    assert refused(env.format("10.2.0.0/24"), manager) == [
        "p2p.vpn.env.ADDRESS: 10.2.0.0 is not a host address of its own network 10.2.0.0/24"
    ]


def test_p2p_distribution_is_k3s_or_refused(manager):
    assert resolve("p2p:\n  distribution: k3s\n", manager)["k3s"]["distribution"] == "k3s"
    assert refused("p2p:\n  distribution: k0s\n", manager) == ["p2p.distribution: 'k0s' is not one of k3s, \"\""]


def test_our_own_names_stay_valid_and_win(manager):
    config = resolve(
        "node:\n  log_level: debug\nvpn:\n  address: 10.1.0.9/24\nauto:\n  ha:\n    master_nodes: 4\n"
        "p2p:\n  loglevel: error\n  vpn:\n    env:\n      ADDRESS: 10.1.0.7/24\n",
        manager,
    )
    assert config["node"]["log_level"] == "debug" and config["vpn"]["address"] == "10.1.0.9/24"
    assert K3sSettings.from_config(config).masters_total == 5
    assert set(config.warnings) == {
        "p2p.loglevel: ignored, node.log_level is given too and wins",
        "p2p.vpn.env.ADDRESS: ignored, vpn.address is given too and wins",
    }


def test_problems_name_the_path_the_user_wrote(manager):
    text = (
        "p2p:\n  loglevel: loud\n  role: boss\n  dynamic_roles: maybe\n  vpn:\n    mtu: 5\n    use: 'yes'\n"
        "    env:\n      EDGEVPNMAXCONNS: many\n      EDGEVPNDHT: perhaps\n  auto:\n    ha:\n      master_nodes: -1\n"
        "k3s:\n  runner: sytemd\n  embedded_registry: 1\n"
    )
    with pytest.raises(ConfigError) as exc:
        resolve(text, manager)
    assert set(exc.value.problems) == {  # every one, each with the path as written
        "p2p.loglevel: 'loud' is not one of debug, info, warning, error",
        "p2p.role: 'boss' is not one of \"\", master, worker",
        "p2p.dynamic_roles: expected a boolean, got a string",
        "p2p.vpn.mtu: must be between 576 and 9000, not 5",
        "p2p.vpn.use: expected a boolean, got a string",
        "p2p.vpn.env.EDGEVPNMAXCONNS: expected an integer, got a string",
        "p2p.vpn.env.EDGEVPNDHT: expected true or false, got 'perhaps'",
        "p2p.auto.ha.master_nodes: must be at least 0, not -1",
        "k3s.runner: 'sytemd' is not one of auto, systemd, openrc, process",
        "k3s.embedded_registry: expected a boolean, got an integer",
    }


def test_p2p_dns_goes_to_a_plugin_that_claims_it():
    class DnsPlugin:
        @hookimpl
        def kairos_config_schema(self):
            return [Section("dns", Option("enable", bool, False, "Serve DNS.", paths=("p2p.dns",)), help="DNS.")]

    claimed = make_plugin_manager(autoload=False, extra_plugins=[DnsPlugin()])
    config = resolve("p2p:\n  dns: true\n", claimed)
    assert config["dns"]["enable"] is True and config.warnings == []
    alone = make_plugin_manager(autoload=False)
    config = resolve("p2p:\n  dns: true\n", alone)
    assert config.warnings == [
        "p2p.dns: accepted, but has no effect here: DNS needs a DNS plugin (kairos-plugin-dns), which is not installed"
    ]
    assert resolve("p2p:\n  dns: false\n", alone).warnings == []


def test_kubevip_without_its_plugin_is_a_warning_and_vpn_without_tunvpn_a_problem():
    without = make_plugin_manager(disabled=["kubevip"])
    config = load_config(FIXTURES / "ha-kubevip.yaml", without, env={})
    assert config.warnings == [
        "kubevip: ignored: kube-vip (a virtual IP for the Kubernetes API) needs kairos-plugin-kubevip, which is not installed"
    ]
    with pytest.raises(ConfigError) as exc:
        resolve("p2p:\n  vpn:\n    use: true\n", make_plugin_manager(disabled=["tunvpn"]))
    assert exc.value.problems == ["p2p.vpn: unknown key (install kairos-plugin-tunvpn, which provides it)"]


def test_config_defaults_shows_the_kairos_paths(capsys):
    with pytest.raises(SystemExit):
        main(["config", "defaults", "--json"])
        raise SystemExit(0)
    schema = {section["name"]: section for section in json.loads(capsys.readouterr().out)}
    options = {option["name"]: option for option in schema["vpn"]["options"]}
    assert options["address"]["kairos_paths"] == ["p2p.vpn.env.DHCP", "p2p.vpn.env.ADDRESS"]
    node = {option["name"]: option for option in schema["node"]["options"]}
    assert node["log_level"]["kairos_paths"] == ["p2p.loglevel"]
    auto = {option["name"]: option for option in schema["auto"]["options"]}
    assert auto["dynamic_roles"]["kairos_paths"] == ["p2p.dynamic_roles"]
    assert auto["ha"]["aliases"] == ["p2p.ha"]
    p2p = {option["name"]: option for option in schema["p2p"]["options"]}
    assert "kairos-plugin-dns" in p2p["dns"]["no_effect"]
