"""Config files: defaults, validation with paths, plugin sections, Kairos layout, env overrides."""

from __future__ import annotations

import operator
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


def problems_of(text, manager, env=None):
    """The problems a config refuses with, as a set (their order follows the schema's)."""
    with pytest.raises(ConfigError) as exc:
        resolve(text, manager, env)
    return set(exc.value.problems)


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
    text = "election:\n  lease_seconds: 0\nledger:\n  max_value_size: 5000000\np2p:\n  port: 70000\n"
    assert problems_of(text, manager) == {
        "election.lease_seconds: must be at least 0.5, not 0.0",
        "ledger.max_value_size: must be between 1 and 1048576, not 5000000",
        "p2p.port: must be between 0 and 65535, not 70000",
    }


def test_non_finite_numbers_are_refused_with_their_path(manager):
    # .nan compares false with every bound, so it used to pass the range checks: a NaN lease
    # silently stopped the election, a NaN clock drift crashed the ledger.
    text = "election:\n  lease_seconds: .nan\nledger:\n  max_clock_drift: .inf\nmembership:\n  peer_ttl: -.inf\n"
    assert problems_of(text, manager) == {
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
    assert problems_of(text, manager) == {
        "p2p.bootstrap_peers[1]: expected a string, got an integer",
        "p2p.listen[0]: expected a string, got an integer",
        "plugins.disabled[0]: expected a string, got a list",
    }
    # A plugin's list holds what its default holds; an empty default says nothing.
    plugin_manager = make_plugin_manager(autoload=False, extra_plugins=[ListPlugin()])
    assert problems_of("lists:\n  names: [b, 3]\n  ports: [2, x, .nan]\n  free: [1, a, {}]\n", plugin_manager) == {
        "lists.names[1]: expected a string, got an integer",
        "lists.ports[1]: expected an integer, got a string",
    }
    config = resolve("p2p:\n  listen: [/ip4/0.0.0.0/tcp/1]\nlists:\n  free: [1, a]\n", plugin_manager)
    assert config["p2p"]["listen"] == ("/ip4/0.0.0.0/tcp/1",) and config["lists"]["free"] == (1, "a")


def test_the_config_is_read_only_all_the_way_down(manager):
    config = resolve("p2p:\n  bootstrap_peers: [/ip4/1.2.3.4/tcp/1/p2p/x]\nvpn:\n  env: {DHCP: 'false'}\n", manager)
    before = config.as_dict()
    writes = [
        lambda: operator.setitem(config["p2p"], "network_id", "other"),
        lambda: operator.setitem(config["p2p"]["connections"], "low", 0),
        lambda: operator.setitem(config["vpn"]["env"], "DHCP", "true"),
        lambda: config["p2p"]["bootstrap_peers"].append("/ip4/6.6.6.6/tcp/1/p2p/evil"),
        lambda: config["p2p"].pop("network_id"),
        lambda: config["p2p"].update(network_id="other"),
    ]
    for write in writes:
        with pytest.raises((TypeError, AttributeError)):
            write()
    assert config.as_dict() == before and config["p2p"]["network_id"] == "kairos"
    assert config["p2p"]["bootstrap_peers"] == ("/ip4/1.2.3.4/tcp/1/p2p/x",)
    assert config.section("p2p").bootstrap_peers == ("/ip4/1.2.3.4/tcp/1/p2p/x",)
    # the read-only sections still validate as the data they were built from
    assert config.schema["vpn"].read(config["vpn"]).env == {"DHCP": "false"}
    copy = config.as_dict()  # a copy to change is the caller's own
    copy["p2p"]["network_id"] = "other"
    assert config["p2p"]["network_id"] == "kairos"


@pytest.mark.parametrize(
    "text, problem",
    [
        ("p2p:\n  port: " + "9" * 400, "p2p.port: expected an integer of at most 64 bits, got one of 1329 bits"),
        (
            "election:\n  lease_seconds: " + "9" * 400,
            "election.lease_seconds: expected a number of at most 64 bits, got an integer of 1329 bits",
        ),
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
    env = {"KAIROS__P2P__LISTEN": "[" * 20000, "KAIROS__P2P__PORT": "1" * 5000, "KAIROS__VPN__ENV": "{a: " * 40 + "1" + "}" * 40}
    assert problems_of("{}", manager, env) == {
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
    out = subprocess.run(
        [sys.executable, "-m", "kairos_core", "plugins", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    loaded = {row["name"] for row in json.loads(out.stdout)}
    assert not loaded & {"tunvpn", "k3s", "kubevip"}, loaded


# -------------------------------------------------------------------------------------------------
# The schema: every option declared once, with its help
# -------------------------------------------------------------------------------------------------


def _shipped_manager():
    """The core and the three shipped plugins, registered as their entry points name them."""
    from importlib.metadata import entry_points

    plugins = {ep.name: ep.load() for ep in entry_points(group="kairos") if ep.name in ("tunvpn", "k3s", "kubevip")}
    assert set(plugins) == {"tunvpn", "k3s", "kubevip"}, "the shipped plugins are installed in the venv"
    manager = make_plugin_manager(autoload=False)
    for name, plugin in plugins.items():
        manager.register(plugin, name=name)
    return manager


def _options(section, path=""):
    from kairos_core.schema import Section

    for option in section.options:
        where = f"{path}{section.name}.{option.name}"
        if isinstance(option, Section):
            yield from _options(option, f"{path}{section.name}.")
        else:
            yield where, option


def test_every_option_of_the_core_and_the_shipped_plugins_has_help():
    from kairos_core.config import collect_schema
    from kairos_core.schema import NO_HELP

    schema = collect_schema(_shipped_manager())
    assert {"p2p", "node", "ledger", "vpn", "k3s", "k3s-agent", "auto", "kubevip"} <= set(schema)
    missing = [
        path
        for section in schema.values()
        for path, option in _options(section)
        if not option.help.strip() or option.help == NO_HELP
    ]
    missing += [name for name, section in schema.items() if not section.help.strip() or section.help == NO_HELP]
    assert not missing, f"options without help: {', '.join(missing)}"


def test_a_section_declared_by_its_defaults_alone_has_no_help_and_is_typed_by_them(manager):
    from kairos_core.config import collect_schema
    from kairos_core.schema import NO_HELP

    vpn = collect_schema(manager)["vpn"]
    assert [(o.name, o.type, o.help) for o in vpn.options] == [
        ("create", bool, NO_HELP),
        ("interface", str, NO_HELP),
        ("mtu", int, NO_HELP),
        ("env", dict, NO_HELP),
    ]
    assert vpn.aliases == ("p2p.vpn",)


def test_kairos_config_defaults_prints_every_option_with_its_help_and_reads_back(capsys):
    import json

    import yaml

    from kairos_core.cli import main
    from kairos_core.config import collect_defaults

    def run(*argv):
        with pytest.raises(SystemExit) as exc:
            main(["config", "defaults", *argv])
            raise SystemExit(0)
        assert exc.value.code == 0
        return capsys.readouterr().out

    text = run()
    assert "# Seconds without a renewal after which a lease has lapsed" in text
    assert '[one of debug, info, warning, error; Kairos:\n  # p2p.loglevel]\n  log_level: "info"' in text
    assert "  lease_seconds: 15.0" in text
    # the commented YAML is a config: it reads back as the defaults, plugin sections included
    assert yaml.safe_load(text) == collect_defaults(make_plugin_manager())
    schema = {section["name"]: section for section in json.loads(run("--json"))}
    port = next(option for option in schema["p2p"]["options"] if option["name"] == "port")
    assert port == {
        "name": "port",
        "type": "integer",
        "default": 0,
        "minimum": 0,
        "maximum": 65535,
        "help": "TCP port for the default listen addresses; 0 = chosen by the system.",
    }
    connections = next(option for option in schema["p2p"]["options"] if option["name"] == "connections")
    assert connections["type"] == "section" and [o["name"] for o in connections["options"]] == ["low", "high"]


def test_enumerated_options_refuse_unknown_values(manager):
    with pytest.raises(ConfigError) as exc:
        resolve("node:\n  log_level: verbose\np2p:\n  role: boss\n", manager)
    assert exc.value.problems == [
        "p2p.role: 'boss' is not one of \"\", master, worker",
        "node.log_level: 'verbose' is not one of debug, info, warning, error",
    ]
    assert resolve("node:\n  log_level: debug\np2p:\n  role: worker\n", manager)["p2p"]["role"] == "worker"


def test_the_bounded_degree_is_checked_option_by_option_and_across(manager):
    with pytest.raises(ConfigError) as exc:
        resolve("p2p:\n  connections: {low: 0}\n", manager)
    assert exc.value.problems == ["p2p.connections.low: must be at least 1, not 0"]
    with pytest.raises(ConfigError) as exc:
        resolve("p2p:\n  connections: {low: 9, high: 4}\n", manager)
    assert exc.value.problems == ["p2p.connections.high: must be at least low (9), not 4"]
    with pytest.raises(ConfigError) as exc:
        resolve("p2p:\n  connections: 3\n", manager)
    assert exc.value.problems == ["p2p.connections: expected a mapping, got integer"]


def test_sections_are_read_as_typed_frozen_settings(manager):
    import dataclasses

    config = resolve("election:\n  lease_seconds: 4\np2p:\n  listen: [/ip4/0.0.0.0/tcp/1]\n", manager)
    election = config.section("election")
    assert election.lease_seconds == 4.0 and isinstance(election.lease_seconds, float)
    assert election.require_majority is True
    p2p = config.section("p2p")
    assert p2p.listen == ("/ip4/0.0.0.0/tcp/1",) and p2p.connections.low == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        election.lease_seconds = 1.0  # type: ignore[misc]
    assert config.section("vpn").mtu == 1420  # a section declared the old way reads the same
    assert config["election"]["lease_seconds"] == 4.0  # the plain form stays
    with pytest.raises(KeyError, match="no config section 'nope'"):
        config.section("nope")


def test_a_section_read_by_hand_is_checked_strictly():
    from kairos_core.config import CORE_SCHEMA

    election = next(section for section in CORE_SCHEMA if section.name == "election")
    assert election.read({"lease_seconds": 2}).lease_seconds == 2.0  # missing options: defaults
    with pytest.raises(ConfigError) as exc:
        election.read({"lease_seconds": None, "quorum_horizon": -1, "other": 1})
    assert exc.value.problems == [
        "election.lease_seconds: expected a number, got null",
        "election.quorum_horizon: must be at least 0, not -1.0",
        "election.other: unknown key",
    ]


def test_options_may_declare_other_names_and_sections_other_places():
    from kairos_core.schema import Option, Section

    class Aliased:
        @hookimpl
        def kairos_config_schema(self):
            return [Section("box", Option("size", int, 1, "How big.", aliases=("volume",)), help="A box.", aliases=("p2p.box",))]

    plugin_manager = make_plugin_manager(autoload=False, extra_plugins=[Aliased()])
    assert resolve("p2p:\n  box:\n    volume: 3\n", plugin_manager)["box"] == {"size": 3}
    with pytest.raises(ConfigError) as exc:
        resolve("box:\n  size: 2\n  volume: 3\n", plugin_manager)
    assert exc.value.problems == ["box.volume: sets the same option as box.size; give one of them"]


def test_a_declaration_that_contradicts_itself_fails_where_it_is_made():
    from kairos_core.schema import Option, Section

    with pytest.raises(ValueError, match="option mtu: its default is invalid: mtu: must be between 576 and 9000, not 1"):
        Option("mtu", int, 1, "MTU.", minimum=576, maximum=9000)
    with pytest.raises(ValueError, match="'a' is declared twice"):
        Section("s", Option("a", int, 1, "A."), Option("b", int, 1, "B.", aliases=("a",)))
