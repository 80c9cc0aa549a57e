"""How k3s is launched: managed VPN/join settings survive every user setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from kairos_plugin_k3s.launch import Join, build_launch, server_url
from kairos_plugin_k3s.paths import K3sPaths
from kairos_plugin_k3s.roles import CLUSTER_INIT, MASTER, MASTER_HA, WORKER
from kairos_plugin_k3s.settings import FlagSet

JOIN = Join("https://10.1.0.1:6443", "K10abc::server:def")


def flags(args=(), env=None, replace_args=False, replace_env=False):
    return FlagSet(True, tuple(args), dict(env or {}), replace_args, replace_env)


def launch(role, user=None, root="/", **kwargs):
    defaults = dict(
        flags=user or flags(),
        binary="/usr/bin/k3s",
        paths=K3sPaths.under(root),
        node_ip="10.1.0.5",
        interface="edgevpn0",
        join=JOIN if role in (MASTER_HA, WORKER) else None,
    )
    defaults.update(kwargs)
    return build_launch(role, **defaults)


def test_clusterinit_server():
    result = launch(CLUSTER_INIT, tls_sans=["10.0.0.100"], plugin_args=["--disable=traefik"])
    assert result.service == "k3s" and result.argv == ("server", "--disable=traefik")
    assert result.config == {
        "node-ip": "10.1.0.5",
        "flannel-iface": "edgevpn0",
        "cluster-init": True,
        "tls-san": ["10.1.0.5", "10.0.0.100"],
    }
    assert result.env == {}


def test_joining_master_and_agent_get_url_and_token():
    ha = launch(MASTER_HA)
    assert ha.env == {"K3S_URL": JOIN.server_url, "K3S_TOKEN": JOIN.token} and "cluster-init" not in ha.config
    agent = launch(WORKER)
    assert agent.service == "k3s-agent" and agent.argv == ("agent", "--with-node-id")
    assert agent.env == {"K3S_URL": JOIN.server_url, "K3S_TOKEN": JOIN.token}
    assert agent.config == {"node-ip": "10.1.0.5", "flannel-iface": "edgevpn0"}
    with pytest.raises(ValueError):
        launch(WORKER, join=None)


def test_user_args_are_appended():
    result = launch(WORKER, user=flags(["--node-label=zone=a"]))
    assert result.argv == ("agent", "--with-node-id", "--node-label=zone=a")


def test_replace_args_drops_defaults_but_never_the_vpn_flags():
    result = launch(WORKER, user=flags(["--node-label=x"], replace_args=True), plugin_args=["--from-plugin"])
    assert result.argv == ("agent", "--from-plugin", "--node-label=x")
    assert result.config["flannel-iface"] == "edgevpn0" and result.config["node-ip"] == "10.1.0.5"
    assert result.env["K3S_URL"] == JOIN.server_url


def test_user_flags_cannot_override_managed_ones_and_tls_sans_merge():
    user = flags(
        ["--node-ip", "192.168.1.9", "--flannel-iface=eth0", "--tls-san=my.host", "--tls-san", "a,b", "--debug"],
        replace_args=True,
    )
    result = launch(CLUSTER_INIT, user=user, tls_sans=["10.0.0.100"])
    assert result.argv == ("server", "--debug")
    assert result.config["node-ip"] == "10.1.0.5" and result.config["flannel-iface"] == "edgevpn0"
    assert result.config["tls-san"] == ["10.1.0.5", "10.0.0.100", "my.host", "a", "b"]
    assert len(result.notes) == 2


def test_external_db_keeps_flannel_and_sans():
    # Kairos dropped --flannel-iface/--tls-san on this path; here they stay.
    db = "mysql://u:p@tcp(db:3306)/k3s"
    origin = launch(CLUSTER_INIT, external_db=db, tls_sans=["10.0.0.100"], user=flags(["--x"], replace_args=True))
    assert origin.config["datastore-endpoint"] == db and "cluster-init" not in origin.config
    assert origin.config["flannel-iface"] == "edgevpn0" and "10.0.0.100" in origin.config["tls-san"]
    ha = launch(MASTER_HA, external_db=db)
    assert ha.env == {"K3S_TOKEN": JOIN.token} and ha.config["datastore-endpoint"] == db


def test_env_layers():
    result = launch(WORKER, user=flags(env={"K3S_URL": "https://evil:6443", "HTTP_PROXY": "http://p:3128"}))
    assert result.env == {"K3S_URL": JOIN.server_url, "K3S_TOKEN": JOIN.token, "HTTP_PROXY": "http://p:3128"}
    assert any("K3S_URL" in note for note in result.notes)
    replaced = launch(WORKER, user=flags(env={"A": "1"}, replace_env=True))
    assert replaced.env == {"A": "1", "K3S_URL": JOIN.server_url, "K3S_TOKEN": JOIN.token}


def test_relocated_root_points_k3s_at_its_files(tmp_path):
    result = launch(MASTER, root=tmp_path)
    assert result.config["data-dir"] == str(tmp_path / "var/lib/rancher/k3s")
    assert result.config["write-kubeconfig"] == str(tmp_path / "etc/rancher/k3s/k3s.yaml")
    assert result.env["K3S_CONFIG_FILE"] == str(tmp_path / "etc/rancher/k3s/config.yaml")
    assert Path(result.env["K3S_CONFIG_FILE"]).parent == K3sPaths.under(tmp_path).config_dir


def test_without_a_vpn_nothing_is_forced():
    result = launch(MASTER, node_ip=None, interface=None, user=flags(["--node-ip=192.168.1.2"]))
    assert "flannel-iface" not in result.config and "node-ip" not in result.config
    assert result.argv == ("server", "--node-ip=192.168.1.2")  # the user's own choice stays


def test_fingerprint_changes_with_the_launch():
    assert launch(WORKER).fingerprint() == launch(WORKER).fingerprint()
    assert launch(WORKER).fingerprint() != launch(WORKER, node_ip="10.1.0.6").fingerprint()


def test_server_url():
    assert server_url("10.1.0.1", 6443) == "https://10.1.0.1:6443"
    assert server_url("fd00::1", 6443) == "https://[fd00::1]:6443"
