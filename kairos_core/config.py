"""The config file: one YAML document, a section per part, every option with a default.

The core owns ``p2p`` (Kairos's names), ``node``, ``api``, ``ledger``, ``election`` and
``plugins``; each plugin declares its own sections through ``kairos_config_defaults``. The type of
a default is the type an option must have, so unknown keys and wrong types are reported with their
path (``p2p.minimum_nodes: expected an integer, got a string``). Kairos users write plugin
sections under ``p2p:`` (``p2p.vpn``, ``p2p.kubevip``); those are read as the top-level section.

Validation happens here and nowhere else, so every reader can trust what it gets: numbers are
finite and fit in 64 bits, a list holds items of its declared type (the core's lists of
multiaddrs and names hold strings; a plugin's list holds what its default's first item is, and
an empty default allows anything), and no value nests more than ``MAX_CONFIG_DEPTH`` levels.

Environment overrides, applied over the file:

- ``KAIROS_NETWORK_TOKEN`` (or EdgeVPN's ``EDGEVPNTOKEN``) → ``p2p.network_token``
- ``KAIROS_STATE_DIR`` → ``node.state_dir``
- ``KAIROS__<SECTION>__<KEY>[__<SUBKEY>…]=<YAML value>``, e.g. ``KAIROS__P2P__MINIMUM_NODES=3``
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import ConfigError, KairosError
from .identity import default_state_dir
from .plugins import hookimpl
from .token import NetworkToken, parse_token
from .untrusted import nesting_exceeds

if TYPE_CHECKING:
    from .plugins import KairosPluginManager

MAX_CONFIG_BYTES = 4 * 1024 * 1024
ENV_PREFIX = "KAIROS__"
# Levels of lists and mappings in a whole document (a section's option is level 2). Real configs
# use four or five; the bound keeps copies and plugins clear of RecursionError.
MAX_CONFIG_DEPTH = 32
# Numbers must fit where they go: int64 fields, timers, ports. Anything larger is a typo.
MAX_CONFIG_INT = 2**63 - 1

CORE_DEFAULTS: dict[str, dict[str, Any]] = {
    "p2p": {
        # The network token (base64 or YAML). Required to run a node.
        "network_token": "",
        # A namespace inside the ledger, so several clusters can share one token (Kairos).
        "network_id": "kairos",
        # Role hint for plugins such as k3s: "" (automatic), "master" or "worker".
        "role": "",
        # Kairos compatibility: accepted, reserved for the DNS plugin.
        "dns": False,
        # Plugins that build clusters wait for this many members.
        "minimum_nodes": 2,
        # Switch discovery mechanisms off.
        "disable_dht": False,
        "disable_mdns": False,
        # Multiaddrs to listen on; empty = every interface address on `port`.
        "listen": [],
        # TCP port for the default listen addresses; 0 = chosen by the system.
        "port": 0,
        # Multiaddrs with /p2p/<peer id>: dialled at start and used to bootstrap the DHT.
        "bootstrap_peers": [],
        # Long-lived connections a node keeps: it dials more below `low` and closes the extra
        # above `high` (never bootstrap peers nor connections a feature is using). A network of
        # at most `low` nodes is fully connected.
        "connections": {"low": 8, "high": 16},
    },
    "node": {
        # Identity, ledger database and API socket live here; default /var/lib/kairos as root,
        # ~/.local/state/kairos otherwise.
        "state_dir": None,
        # Advertised hostname; default: the machine's.
        "hostname": None,
        # debug | info | warning | error
        "log_level": "info",
        # Seconds a plugin hook may run before it is abandoned and logged.
        "hook_timeout": 30.0,
    },
    "api": {
        # Serve the local control API on a unix socket (mode 0600) in the state dir.
        "enable": True,
        # Socket path; default <state_dir>/api.sock.
        "socket": None,
    },
    "ledger": {
        # Largest JSON-encoded value one key may hold, in bytes.
        "max_value_size": 65536,
        # Seconds a tombstone is kept so partitions can heal before it is pruned.
        "tombstone_grace": 7 * 24 * 3600,
        # Seconds between anti-entropy exchanges with a random peer.
        "sync_interval": 30.0,
        # Remote entries more than this many seconds ahead of our clock are refused (clock bound);
        # one within it moves our clock at most half of it ahead, so nodes whose clocks differ by
        # less than half of it accept each other's writes whatever a peer stamps.
        "max_clock_drift": 60.0,
        # The most this node's own writes may hold in open buckets (the user buckets, to which
        # neither the core nor a plugin gives a policy): live keys, bytes of values, tombstones; a
        # write past one is refused with an error. Peers' entries are held to twice these, the
        # same on every node, so one insider cannot fill every node's memory and disk. At most
        # these defaults.
        "max_keys_per_owner": 10_000,
        "max_bytes_per_owner": 8 * 1024 * 1024,
        "max_tombstones_per_owner": 10_000,
    },
    "membership": {
        # Seconds between rewrites of this node's entry in the `nodes` bucket (its heartbeat).
        "announce_interval": 30.0,
        # Seconds a peer we are not connected to stays alive on its last heartbeat.
        "peer_ttl": 95.0,
    },
    "election": {
        # Whether this node may become leader.
        "eligible": True,
        # Seconds without a renewal after which a lease has lapsed; renewals come 3 times as often.
        # A crashed leader is replaced faster than this: see kairos_core/election.py.
        "lease_seconds": 15.0,
        # Claim and keep the lease only while a majority of recently seen nodes is reachable:
        # in a partition only the majority side has a leader.
        "require_majority": True,
        # Seconds a node that went away still counts in the electorate of that majority.
        "quorum_horizon": 300.0,
    },
    "plugins": {
        # Plugin names never to load (see `kairos plugins`).
        "disabled": [],
    },
}


@hookimpl
def kairos_config_defaults() -> Mapping[str, Mapping[str, Any]]:
    """The core's own sections."""
    return CORE_DEFAULTS


class Config:
    """A validated config: every section filled with its defaults."""

    def __init__(self, data: dict[str, dict[str, Any]], path: Path | None = None) -> None:
        self._data = data
        self.path = path

    def section(self, name: str) -> dict[str, Any]:
        """One section (a plugin's, or a core one) with defaults filled in."""
        try:
            return self._data[name]
        except KeyError:
            raise KeyError(f"no config section {name!r}; is the plugin that declares it installed?") from None

    def __getitem__(self, name: str) -> dict[str, Any]:
        return self.section(name)

    def __contains__(self, name: str) -> bool:
        return name in self._data

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """A deep copy of the whole config."""
        return copy.deepcopy(self._data)

    @property
    def network_token(self) -> NetworkToken:
        """The parsed token; :class:`KairosError` when the config has none."""
        raw = self._data["p2p"]["network_token"]
        if not raw:
            raise KairosError("no network token: set p2p.network_token (make one with `kairos token new`)")
        return parse_token(raw)

    @property
    def state_dir(self) -> Path:
        """Where this node keeps its files."""
        configured = self._data["node"]["state_dir"]
        return Path(configured).expanduser() if configured else default_state_dir()

    @property
    def api_socket(self) -> Path:
        """The local API's unix socket."""
        configured = self._data["api"]["socket"]
        return Path(configured).expanduser() if configured else self.state_dir / "api.sock"


def read_config_file(path: Path | str | None) -> dict[str, Any]:
    """Read the raw YAML mapping of a config file (``None`` or ``-``-less empty → ``{}``)."""
    if path is None:
        return {}
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config {path}: file is too large ({size} bytes)")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config {path}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {path}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"config {path}: {exc.strerror}") from None
    return parse_config_text(text, str(path))


def parse_config_text(text: str, origin: str = "config") -> dict[str, Any]:
    """Parse config YAML; a cloud-config with a top-level ``p2p`` works too."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{origin}: {problem}{where}") from None
    except (RecursionError, ValueError) as exc:
        raise ConfigError(f"{origin}: {_unparsable(exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, not a {_type_name(data)}")
    if nesting_exceeds(data, MAX_CONFIG_DEPTH):
        raise ConfigError(f"{origin}: {_too_deep_at(data)}: nested more than {MAX_CONFIG_DEPTH} levels deep")
    return data


def _unparsable(exc: RecursionError | ValueError) -> str:
    # What PyYAML raises besides YAMLError: its parser recurses once per level, and its
    # constructors let int() and date() refuse values (int() stops at 4300 digits).
    if isinstance(exc, RecursionError):
        return "nested too deeply to parse"
    return "holds a value YAML cannot represent (an integer over 4300 digits or an impossible date)"


def _too_deep_at(data: dict[str, Any]) -> str:
    # Name the option (section.key) that nests too deeply, or the section when that is the value.
    for section, value in data.items():
        if isinstance(value, dict) and nesting_exceeds(value, MAX_CONFIG_DEPTH - 1):
            for key, option in value.items():
                if nesting_exceeds(option, MAX_CONFIG_DEPTH - 2):
                    return f"{section}.{key}"
        if nesting_exceeds(value, MAX_CONFIG_DEPTH - 1):
            return str(section)
    return "config"


def disabled_plugins(raw: Mapping[str, Any], env: Mapping[str, str] | None = None) -> list[str]:
    """The plugin names a raw config blocks, ``KAIROS__PLUGINS__DISABLED`` taking precedence as it
    does for every option (read before the plugin manager exists, so before the config is resolved)."""
    env = os.environ if env is None else env
    names: Any = None
    if f"{ENV_PREFIX}PLUGINS__DISABLED" in env:
        try:
            names = yaml.safe_load(env[f"{ENV_PREFIX}PLUGINS__DISABLED"])
        except (yaml.YAMLError, RecursionError, ValueError):
            names = None  # resolving the config reports it with the variable's name
    if names is None:
        section = raw.get("plugins") or {}
        names = section.get("disabled", []) if isinstance(section, dict) else []
    return [str(name) for name in names] if isinstance(names, list) else []


def collect_defaults(manager: KairosPluginManager) -> dict[str, dict[str, Any]]:
    """Every section any registered plugin declares, with its defaults."""
    defaults: dict[str, dict[str, Any]] = {}
    owners: dict[str, str] = {}
    for impl in reversed(manager.pm.hook.kairos_config_defaults.get_hookimpls()):
        try:
            declared = impl.function() or {}
        except Exception as exc:  # name the plugin: the user cannot fix what they cannot find
            raise ConfigError(f"plugin {impl.plugin_name} could not declare its config: {exc}") from None
        if not isinstance(declared, Mapping):
            raise ConfigError(f"plugin {impl.plugin_name}: kairos_config_defaults must return a mapping")
        for section, values in declared.items():
            if section in owners:
                raise ConfigError(
                    f"config section {section!r} is declared by both {owners[section]} and {impl.plugin_name}"
                )
            if not isinstance(values, Mapping):
                raise ConfigError(f"plugin {impl.plugin_name}: defaults of section {section!r} must be a mapping")
            owners[section] = impl.plugin_name
            defaults[section] = copy.deepcopy(dict(values))
    return defaults


def resolve_config(
    raw: Mapping[str, Any],
    manager: KairosPluginManager,
    env: Mapping[str, str] | None = None,
    path: Path | None = None,
    check_token: bool = True,
) -> Config:
    """Merge a raw config over every declared default, after environment overrides.

    Raises :class:`ConfigError` listing every problem with its path.
    """
    defaults = collect_defaults(manager)
    data = copy.deepcopy(dict(raw))
    problems: list[str] = []
    _apply_env(data, os.environ if env is None else env, problems)
    _lift_p2p_sections(data, defaults)
    merged: dict[str, dict[str, Any]] = {}
    for section, value in data.items():
        if section not in defaults:
            problems.append(f"{section}: unknown section")
    for section, section_defaults in defaults.items():
        merged[section] = _merge(section_defaults, data.get(section), section, problems)
    if not problems:
        problems.extend(_range_problems(merged))
    if not problems:
        problems.extend(_plugin_problems(manager, merged))
    if check_token and not problems and merged["p2p"]["network_token"]:
        try:
            parse_token(str(merged["p2p"]["network_token"]))
        except KairosError as exc:
            problems.append(f"p2p.network_token: {exc}")
    if problems:
        origin = f"config {path}" if path else "config"
        noun = "problem" if len(problems) == 1 else "problems"
        raise ConfigError(f"{origin}: {len(problems)} {noun}: " + "; ".join(problems), problems)
    return Config(merged, path)


def _plugin_problems(manager: KairosPluginManager, merged: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What plugins find wrong with their sections (``kairos_config_problems``), each line once."""
    problems: list[str] = []
    for impl in reversed(manager.pm.hook.kairos_config_problems.get_hookimpls()):
        arguments = {"config": copy.deepcopy(dict(merged))}
        try:
            found = impl.function(**{name: arguments[name] for name in impl.argnames})
            lines = [str(line) for line in found or ()]
        except Exception as exc:  # name the plugin: its check is broken, not the user's file
            lines = [f"plugin {impl.plugin_name} could not check its config: {exc}"]
        problems.extend(line for line in lines if line not in problems)
    return problems


# Core options whose type is not enough: (section, option, lowest, highest or None).
_RANGES = (
    ("p2p", "port", 0, 65535),
    ("p2p", "minimum_nodes", 1, None),
    ("node", "hook_timeout", 0.1, None),
    ("ledger", "max_value_size", 1, 1024 * 1024),
    ("ledger", "tombstone_grace", 60, None),
    ("ledger", "sync_interval", 1, None),
    ("ledger", "max_clock_drift", 1, None),
    # At most half the network's quota (kairos_core.ledger.policy.NETWORK_QUOTA): a peer still
    # holding older entries of ours may count more than we do, and must not refuse the newer.
    ("ledger", "max_keys_per_owner", 1, 10_000),
    ("ledger", "max_bytes_per_owner", 1, 8 * 1024 * 1024),
    ("ledger", "max_tombstones_per_owner", 1, 10_000),
    ("membership", "announce_interval", 1, None),
    ("membership", "peer_ttl", 2, None),
    ("election", "lease_seconds", 0.5, None),
    ("election", "quorum_horizon", 0, None),
)


def _range_problems(merged: Mapping[str, Mapping[str, Any]]) -> list[str]:
    problems = []
    for section, option, lowest, highest in _RANGES:
        value = merged.get(section, {}).get(option)
        if value is None:
            continue
        if value < lowest or (highest is not None and value > highest):
            bound = f"between {lowest} and {highest}" if highest is not None else f"at least {lowest}"
            problems.append(f"{section}.{option}: must be {bound}, not {value}")
    connections = merged.get("p2p", {}).get("connections", {})
    low, high = connections.get("low"), connections.get("high")
    if isinstance(low, int) and low < 1:
        problems.append(f"p2p.connections.low: must be at least 1, not {low}")
    elif isinstance(low, int) and isinstance(high, int) and high < low:
        problems.append(f"p2p.connections.high: must be at least low ({low}), not {high}")
    return problems


def load_config(path: Path | str | None, manager: KairosPluginManager, env: Mapping[str, str] | None = None) -> Config:
    """Read, override, validate and complete a config file."""
    raw = read_config_file(path)
    return resolve_config(raw, manager, env=env, path=Path(path) if path else None)


def _apply_env(data: dict[str, Any], env: Mapping[str, str], problems: list[str]) -> None:
    token = env.get("KAIROS_NETWORK_TOKEN") or env.get("EDGEVPNTOKEN")
    if token:
        _set_path(data, ["p2p", "network_token"], token, problems, "KAIROS_NETWORK_TOKEN")
    if env.get("KAIROS_STATE_DIR"):
        _set_path(data, ["node", "state_dir"], env["KAIROS_STATE_DIR"], problems, "KAIROS_STATE_DIR")
    for name, text in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or len(name) <= len(ENV_PREFIX):
            continue
        parts = [part.lower() for part in name[len(ENV_PREFIX):].split("__")]
        if any(not part for part in parts) or len(parts) < 2:
            problems.append(f"{name}: expected {ENV_PREFIX}<SECTION>__<KEY>")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        except (RecursionError, ValueError) as exc:
            problems.append(f"{name}: {_unparsable(exc)}")
            continue
        if nesting_exceeds(value, MAX_CONFIG_DEPTH - len(parts)):
            problems.append(f"{name}: nested more than {MAX_CONFIG_DEPTH} levels deep")
            continue
        _set_path(data, parts, value, problems, name)


def _set_path(data: dict[str, Any], parts: list[str], value: Any, problems: list[str], origin: str) -> None:
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            problems.append(f"{origin}: {'.'.join(parts)} crosses a value that is not a mapping")
            return
        node = child
    node[parts[-1]] = value


def _lift_p2p_sections(data: dict[str, Any], defaults: Mapping[str, Any]) -> None:
    # Kairos puts vpn/kubevip/auto… inside p2p; read them as the plugin's own section. The
    # top-level section wins key by key when both are given.
    p2p = data.get("p2p")
    if not isinstance(p2p, dict):
        return
    for key in list(p2p):
        if key in defaults and key not in defaults["p2p"] and isinstance(p2p[key], dict):
            lifted = p2p.pop(key)
            top = data.get(key)
            data[key] = {**lifted, **top} if isinstance(top, dict) else lifted


def _merge(defaults: Mapping[str, Any], given: Any, path: str, problems: list[str]) -> dict[str, Any]:
    merged = copy.deepcopy(dict(defaults))
    if given is None:
        return merged
    if not isinstance(given, dict):
        problems.append(f"{path}: expected a mapping, got {_type_name(given)}")
        return merged
    for key, value in given.items():
        key_path = f"{path}.{key}"
        if key not in defaults:
            problems.append(f"{key_path}: unknown key")
            continue
        default = defaults[key]
        if value is None:  # `key:` with nothing after it means "not set": keep the default
            continue
        if isinstance(default, dict) and default:
            merged[key] = _merge(default, value, key_path, problems)
            continue
        problem = _type_problem(default, value)
        if problem is None and isinstance(value, list):
            problem = _item_problem(key_path, default, value)
            if problem:
                problems.append(problem)
                continue
        if problem:
            problems.append(f"{key_path}: {problem}")
        else:
            merged[key] = float(value) if isinstance(default, float) else value
    return merged


# Lists of the core whose default is empty, so the default cannot say what they hold.
_LIST_ITEMS: dict[str, type] = {
    "p2p.listen": str,
    "p2p.bootstrap_peers": str,
    "plugins.disabled": str,
}


def _item_problem(key_path: str, default: list[Any], value: list[Any]) -> str | None:
    """The first item of ``value`` that is not of the list's item type, as a problem with its index."""
    item_type = _LIST_ITEMS.get(key_path) or (type(default[0]) if default else None)
    if item_type not in _TYPE_NAMES or item_type in (list, dict):
        return None  # nothing declared, or nested lists: the owner checks those
    for index, item in enumerate(value):
        problem = _type_problem(item_type(), item)
        if problem:
            return f"{key_path}[{index}]: {problem}"
    return None


def _type_problem(default: Any, value: Any) -> str | None:
    if default is None:  # optional scalar: any plain value
        return None if not isinstance(value, (dict, list)) else f"expected a single value, got {_type_name(value, article=True)}"
    checks = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list),
        dict: lambda v: isinstance(v, dict),
    }
    check = checks.get(type(default))
    if check is None:
        return None
    if not check(value):
        return f"expected {_type_name(default, article=True)}, got {_type_name(value, article=True)}"
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        return _number_problem(default, value)
    return None


def _number_problem(default: int | float, value: int | float) -> str | None:
    # NaN passes every range check (each comparison is false) and infinity every lower bound;
    # integers beyond 64 bits overflow float() or the int64 fields they end up in.
    if isinstance(value, float):
        return None if math.isfinite(value) else f"expected a finite number, got {value}"
    if abs(value) <= MAX_CONFIG_INT:
        return None
    if isinstance(default, float):
        return f"expected a number of at most 64 bits, got an integer of {value.bit_length()} bits"
    return f"expected an integer of at most 64 bits, got one of {value.bit_length()} bits"


_TYPE_NAMES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", dict: "mapping"}


def _type_name(value: Any, article: bool = False) -> str:
    name = _TYPE_NAMES.get(type(value), type(value).__name__)
    if not article:
        return name
    return ("an " if name[0] in "aeiou" else "a ") + name
