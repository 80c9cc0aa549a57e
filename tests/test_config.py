"""Config files: defaults, validation with paths, plugin sections, Kairos layout, env overrides."""

from __future__ import annotations

import pytest

from kairos_core.config import load_config, parse_config_text, resolve_config
from kairos_core.errors import ConfigError
from kairos_core.plugins import hookimpl, make_plugin_manager
from kairos_core.token import generate_token


class VpnLikePlugin:
    @hookimpl
    def kairos_config_defaults(self):
        return {"vpn": {"create": True, "interface": "edgevpn0", "mtu": 1420, "env": {}}}


@pytest.fixture
def manager():
    return make_plugin_manager(autoload=False, extra_plugins=[VpnLikePlugin()])


def resolve(text, manager, env=None):
    return resolve_config(parse_config_text(text), manager, env=env or {})


def test_token_alone_is_enough(manager, tmp_path):
    token = generate_token().encode()
    path = tmp_path / "kairos.yaml"
    path.write_text(f"p2p:\n  network_token: {token}\n")
    config = load_config(path, manager, env={})
    assert config.network_token.encode() == token
    assert config["p2p"]["network_id"] == "kairos"
    assert config["vpn"]["interface"] == "edgevpn0"
    assert config["ledger"]["max_value_size"] == 65536
    assert config.api_socket == config.state_dir / "api.sock"


def test_every_problem_is_reported_with_its_path(manager):
    text = """
p2p:
  minimum_nodes: "three"
  disable_dht: 1
  nonsense: true
vpn:
  mtu: 1420.5
  env: [1]
ledger: 5
other: {}
"""
    with pytest.raises(ConfigError) as exc:
        resolve(text, manager)
    problems = exc.value.problems
    assert "p2p.minimum_nodes: expected an integer, got a string" in problems
    assert "p2p.disable_dht: expected a boolean, got an integer" in problems
    assert "p2p.nonsense: unknown key" in problems
    assert "vpn.mtu: expected an integer, got a number" in problems
    assert "vpn.env: expected a mapping, got a list" in problems
    assert "ledger: expected a mapping, got integer" in problems
    assert "other: unknown section" in problems
    assert len(problems) == 7


def test_kairos_layout_reads_plugin_sections_under_p2p(manager):
    config = resolve("p2p:\n  vpn:\n    mtu: 1300\nvpn:\n  interface: kairos0\n", manager)
    assert config["vpn"] == {"create": True, "interface": "kairos0", "mtu": 1300, "env": {}}


def test_empty_values_keep_defaults_and_ints_fill_floats(manager):
    config = resolve("p2p:\n  network_token:\nelection:\n  lease_seconds: 4\n", manager)
    assert config["p2p"]["network_token"] == ""
    assert config["election"]["lease_seconds"] == 4.0


def test_environment_overrides(manager, tmp_path):
    token = generate_token().encode()
    env = {
        "KAIROS_NETWORK_TOKEN": token,
        "KAIROS_STATE_DIR": str(tmp_path),
        "KAIROS__P2P__MINIMUM_NODES": "3",
        "KAIROS__VPN__CREATE": "false",
    }
    config = resolve("p2p:\n  minimum_nodes: 1\n", manager, env)
    assert config["p2p"]["minimum_nodes"] == 3
    assert config["vpn"]["create"] is False
    assert config.state_dir == tmp_path
    assert config.network_token.encode() == token
    with pytest.raises(ConfigError, match="p2p.minimum_nodes: expected an integer"):
        resolve("{}", manager, {"KAIROS__P2P__MINIMUM_NODES": "many"})


def test_bad_token_in_config_is_a_config_problem(manager):
    with pytest.raises(ConfigError, match="p2p.network_token: token is neither base64 nor YAML"):
        resolve("p2p:\n  network_token: '%%%'\n", manager)


@pytest.mark.parametrize(
    "text, expected",
    [("p2p: [unclosed", "line 1"), ("- a\n- b\n", "must be a mapping"), ("\tp2p: 1", "found character")],
)
def test_unparsable_files(text, expected, manager):
    with pytest.raises(ConfigError, match=expected):
        parse_config_text(text)


def test_missing_file_is_clear(manager, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml", manager)


def test_two_plugins_may_not_claim_one_section():
    manager = make_plugin_manager(autoload=False, extra_plugins=[VpnLikePlugin(), VpnLikePlugin()])
    with pytest.raises(ConfigError, match="declared by both"):
        resolve("{}", manager)


def test_cli_config_check_lists_problems(tmp_path, capsys):
    from kairos_core.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("p2p:\n  role: 5\n  bogus: 1\n")
    with pytest.raises(SystemExit) as exc:
        main(["config", "check", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert f"{path}: p2p.role: expected a string, got an integer" in err
    assert f"{path}: p2p.bogus: unknown key" in err
    path.write_text("p2p:\n  minimum_nodes: 3\n")
    with pytest.raises(SystemExit) as exc:
        main(["config", "check", str(path)])
        raise SystemExit(0)
    assert exc.value.code == 0
    assert "ok" in capsys.readouterr().out


def test_values_out_of_range_are_reported(manager):
    with pytest.raises(ConfigError) as exc:
        resolve("election:\n  lease_seconds: 0\nledger:\n  max_value_size: 5000000\np2p:\n  port: 70000\n", manager)
    assert set(exc.value.problems) == {
        "election.lease_seconds: must be at least 0.5, not 0.0",
        "ledger.max_value_size: must be between 1 and 1048576, not 5000000",
        "p2p.port: must be between 0 and 65535, not 70000",
    }


def test_non_finite_numbers_are_refused_with_their_path(manager):
    # .nan compares false with every bound, so it used to pass the range checks: a NaN lease
    # silently stopped the election, a NaN clock drift crashed the ledger.
    text = "election:\n  lease_seconds: .nan\nledger:\n  max_clock_drift: .inf\nmembership:\n  peer_ttl: -.inf\n"
    with pytest.raises(ConfigError) as exc:
        resolve(text, manager)
    assert set(exc.value.problems) == {
        "election.lease_seconds: expected a finite number, got nan",
        "ledger.max_clock_drift: expected a finite number, got inf",
        "membership.peer_ttl: expected a finite number, got -inf",
    }
    with pytest.raises(ConfigError, match="election.lease_seconds: expected a finite number, got nan"):
        resolve("{}", manager, {"KAIROS__ELECTION__LEASE_SECONDS": ".nan"})


class ListPlugin:
    @hookimpl
    def kairos_config_defaults(self):
        return {"lists": {"names": ["a"], "ports": [1], "free": []}}


def test_list_items_of_the_wrong_type_are_refused(manager):
    # bootstrap_peers: [1, 2] used to kill the bootstrap task silently, listen: [123] was an
    # internal error at start.
    text = "p2p:\n  bootstrap_peers: [/ip4/1.2.3.4/tcp/1, 2]\n  listen: [123]\nplugins:\n  disabled: [[x]]\n"
    with pytest.raises(ConfigError) as exc:
        resolve(text, manager)
    assert set(exc.value.problems) == {
        "p2p.bootstrap_peers[1]: expected a string, got an integer",
        "p2p.listen[0]: expected a string, got an integer",
        "plugins.disabled[0]: expected a string, got a list",
    }
    # A plugin's list holds what its default holds; an empty default says nothing.
    plugin_manager = make_plugin_manager(autoload=False, extra_plugins=[ListPlugin()])
    with pytest.raises(ConfigError) as exc:
        resolve("lists:\n  names: [b, 3]\n  ports: [2, x, .nan]\n  free: [1, a, {}]\n", plugin_manager)
    assert set(exc.value.problems) == {
        "lists.names[1]: expected a string, got an integer",
        "lists.ports[1]: expected an integer, got a string",
    }
    config = resolve("p2p:\n  listen: [/ip4/0.0.0.0/tcp/1]\nlists:\n  free: [1, a]\n", plugin_manager)
    assert config["p2p"]["listen"] == ["/ip4/0.0.0.0/tcp/1"] and config["lists"]["free"] == [1, "a"]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("p2p:\n  port: " + "9" * 400, "p2p.port: expected an integer of at most 64 bits, got one of 1329 bits"),
        ("election:\n  lease_seconds: " + "9" * 400, "election.lease_seconds: expected a number of at most 64 bits, got an integer of 1329 bits"),
        ("lists:\n  ports: [" + "9" * 30 + "]", "lists.ports[0]: expected an integer of at most 64 bits, got one of 100 bits"),
    ],
)
def test_integers_beyond_64_bits_are_refused(text, problem):
    plugin_manager = make_plugin_manager(autoload=False, extra_plugins=[ListPlugin()])
    with pytest.raises(ConfigError) as exc:
        resolve(text, plugin_manager)
    assert exc.value.problems == [problem]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("p2p: " + "[" * 20000, "nested too deeply to parse"),
        ("p2p:\n  listen: " + "[" * 40 + "]" * 40, "p2p.listen: nested more than 32 levels deep"),
        ("a: &a [*a]\n", "a: nested more than 32 levels deep"),
        ("p2p:\n  port: " + "1" * 5000, "an integer over 4300 digits or an impossible date"),
        ("p2p:\n  role: 2024-13-45\n", "an integer over 4300 digits or an impossible date"),
    ],
)
def test_deep_or_unrepresentable_yaml_is_a_config_error(text, expected, manager):
    with pytest.raises(ConfigError, match=expected):
        parse_config_text(text)


def test_cli_gives_one_line_and_exit_2_for_deep_files_and_huge_integers(tmp_path, capsys):
    from kairos_core.cli import main

    for body in ("p2p: " + "[" * 20000, "p2p:\n  port: " + "1" * 5000, "p2p:\n  listen: " + "[" * 40):
        path = tmp_path / "c.yaml"
        path.write_text(body)
        for argv in (["config", "check", str(path)], ["-c", str(path), "status"]):
            with pytest.raises(SystemExit) as exc:
                main(argv)
            err = capsys.readouterr().err
            assert exc.value.code == 2, err
            assert err.count("\n") == 1 and err.startswith(f"kairos: error: {path}: ") and "internal" not in err


def test_deep_or_unrepresentable_environment_values_are_problems(manager):
    with pytest.raises(ConfigError) as exc:
        resolve("{}", manager, {"KAIROS__P2P__LISTEN": "[" * 20000, "KAIROS__P2P__PORT": "1" * 5000,
                                "KAIROS__VPN__ENV": "{a: " * 40 + "1" + "}" * 40})
    assert set(exc.value.problems) == {
        "KAIROS__P2P__LISTEN: nested too deeply to parse",
        "KAIROS__P2P__PORT: holds a value YAML cannot represent (an integer over 4300 digits or an impossible date)",
        "KAIROS__VPN__ENV: nested more than 32 levels deep",
    }


def test_the_environment_disables_plugins_before_the_manager_is_built():
    from kairos_core.config import disabled_plugins

    raw = {"plugins": {"disabled": ["k3s"]}}
    assert disabled_plugins(raw, env={}) == ["k3s"]
    assert disabled_plugins(raw, env={"KAIROS__PLUGINS__DISABLED": "[tunvpn, k3s, kubevip]"}) == ["tunvpn", "k3s", "kubevip"]
    assert disabled_plugins({}, env={"KAIROS__PLUGINS__DISABLED": "[]"}) == []


def test_kairos_plugins_honours_the_disabling_variable(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "KAIROS__PLUGINS__DISABLED": "[tunvpn, k3s, kubevip]"}
    env.pop("KAIROS_DISABLE_PLUGIN_AUTOLOAD", None)
    out = subprocess.run([sys.executable, "-m", "kairos_core", "plugins", "--json"], capture_output=True, text=True,
                         env=env, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    loaded = {row["name"] for row in json.loads(out.stdout)}
    assert not loaded & {"tunvpn", "k3s", "kubevip"}, loaded
