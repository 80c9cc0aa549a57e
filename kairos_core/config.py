"""The config file: one YAML document, a section per part, every option declared once.

The core owns ``p2p`` (Kairos's names), ``node``, ``api``, ``ledger``, ``membership``,
``election`` and ``plugins`` (:data:`CORE_SCHEMA`); each plugin declares its own sections through
``kairos_config_schema`` (or, the old way, a dict of defaults through ``kairos_config_defaults``).
A declaration (:mod:`kairos_core.schema`) gives each option its type, default, help, range or
choices, so unknown keys, wrong types and values out of bounds are reported with their path
(``p2p.minimum_nodes: expected an integer, got a string``). Kairos users write plugin sections
under ``p2p:`` (``p2p.vpn``, ``p2p.kubevip``): a section's aliases say where, and those are read
as the top-level section. A Kairos cloud-config is read as is: its OS sections
(:data:`KAIROS_OS_SECTIONS`) are listed once as ignored (:attr:`Config.notes`), options that Kairos
sets elsewhere declare those places (``Option(paths=…)``: ``p2p.loglevel``, EdgeVPN's
``p2p.vpn.env.*``) and are moved there before the checks, Kairos keys that do nothing here warn
(:attr:`Config.warnings`), and every problem names the path the user wrote.

Validation happens here and nowhere else, so every reader can trust what it gets: numbers are
finite and fit in 64 bits, a list holds items of its declared type, and no value nests more than
``MAX_CONFIG_DEPTH`` levels. What one option cannot say (an option against another) the owner
checks in ``kairos_config_problems``, after the schema's checks pass.

Environment overrides, applied over the file:

- ``KAIROS_NETWORK_TOKEN`` (or EdgeVPN's ``EDGEVPNTOKEN``) → ``p2p.network_token``
- ``KAIROS_STATE_DIR`` → ``node.state_dir``
- ``KAIROS__<SECTION>__<KEY>[__<SUBKEY>…]=<YAML value>``, e.g. ``KAIROS__P2P__MINIMUM_NODES=3``
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import ConfigError, KairosError
from .identity import default_state_dir
from .plugins import hookimpl
from .schema import SKIP, Alias, Option, Section, frozen, section_from_defaults, text_list, text_value, type_name
from .token import NetworkToken, parse_token
from .untrusted import nesting_exceeds

if TYPE_CHECKING:
    from .plugins import KairosPluginManager

MAX_CONFIG_BYTES = 4 * 1024 * 1024
ENV_PREFIX = "KAIROS__"
# Levels of lists and mappings in a whole document (a section's option is level 2). Real configs
# use four or five; the bound keeps copies and plugins clear of RecursionError.
MAX_CONFIG_DEPTH = 32

# Top-level sections of a Kairos cloud-config that configure the OS (kairos-agent, yip, cloud-init),
# not the p2p network: a Kairos file is read as is, and these are listed once at info.
KAIROS_OS_SECTIONS = frozenset(
    {
        "hostname",
        "users",
        "install",
        "stages",
        "runcmd",
        "bootcmd",
        "write_files",
        "k0s",
        "k0s-worker",
        "bundles",
        "reset",
        "upgrade",
        "kairos",
        "debug",
        "strict",
        "name",
        "ssh_authorized_keys",
        "growpart",
        "options",
        "config_url",
        "fail_on_bundles_errors",
        "cloud-init-paths",
        "logs",
        "verify",
        "cosign",
        "cosign-key",
        "eject-cd",
        "arch",
        "squash-no-compression",
        "bind-pcrs",
        "bind-public-pcrs",
        "kcrypt",
        "uki",
        "sysext",
        "env",
        "kairos-agent",
    }
)
# Plugin sections a Kairos file may hold whose plugin adds to a cluster that works without it:
# without the plugin they are a warning, not a problem (vpn, k3s… stay problems, with a hint).
OPTIONAL_PLUGIN_SECTIONS = {"kubevip": ("kairos-plugin-kubevip", "kube-vip (a virtual IP for the Kubernetes API)")}
# EdgeVPN's variables, as Kairos users set them in p2p.vpn.env (strings).
EDGEVPN_ENV = "p2p.vpn.env."
_LOG_LEVELS = ("debug", "info", "warning", "error")
# go-log's names (Kairos's p2p.loglevel) that are not ours.
_KAIROS_LOG_LEVELS = {"warn": "warning", "dpanic": "error", "panic": "error", "fatal": "error"}


def _kairos_log_level(value: Any) -> Any:
    return _KAIROS_LOG_LEVELS.get(value.lower(), value.lower()) if isinstance(value, str) else value


def _edgevpn_flag(value: Any) -> bool:
    value = text_value(value)
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _edgevpn_off(value: Any) -> bool:
    # EdgeVPN's EDGEVPNDHT / EDGEVPNMDNS switch a feature on; our options switch it off.
    return not _edgevpn_flag(value)


# The core's sections, every option once: its type, default, help and bounds (kairos_core.schema).
CORE_SCHEMA: tuple[Section, ...] = (
    Section(
        "p2p",
        Option(
            "network_token",
            str,
            "",
            "The network token (base64 or YAML). Required to run a node.",
            paths=(f"{EDGEVPN_ENV}EDGEVPNTOKEN",),
        ),
        Option(
            "token_grace",
            float,
            86400.0,
            "Seconds after `kairos token rotate` (on the leader) during which every node still accepts "
            "the replaced token besides the new one, so members offline at the rotation get the new "
            "token when they come back; after it a node holding only the old token opens nothing.",
            minimum=10,
        ),
        Option("network_id", str, "kairos", "A namespace inside the ledger, so several clusters can share one token (Kairos)."),
        Option(
            "role",
            str,
            "",
            'Role hint for plugins such as k3s: "" (automatic), master or worker.',
            choices=("", "master", "worker"),
        ),
        Option(
            "dns",
            bool,
            False,
            "Kairos's embedded DNS. A DNS plugin claims this path (an option of its own "
            "declaring paths=('p2p.dns',)); without one it does nothing.",
            no_effect="DNS needs a DNS plugin (kairos-plugin-dns), which is not installed",
        ),
        Option("minimum_nodes", int, 2, "Plugins that build clusters wait for this many members.", minimum=1),
        Option(
            "disable_dht",
            bool,
            False,
            "Switch off WAN discovery through the DHT.",
            paths=(Alias(f"{EDGEVPN_ENV}EDGEVPNDHT", parse=_edgevpn_off),),
        ),
        Option(
            "disable_mdns",
            bool,
            False,
            "Switch off LAN discovery (mDNS).",
            paths=(Alias(f"{EDGEVPN_ENV}EDGEVPNMDNS", parse=_edgevpn_off),),
        ),
        Option(
            "listen",
            list,
            [],
            "Multiaddrs to listen on; empty = every interface address on `port`.",
            item_type=str,
            paths=(Alias(f"{EDGEVPN_ENV}EDGEVPNLISTENMADDRS", parse=text_list),),
        ),
        Option("port", int, 0, "TCP port for the default listen addresses; 0 = chosen by the system.", minimum=0, maximum=65535),
        Option(
            "bootstrap_peers",
            list,
            [],
            "Multiaddrs with /p2p/<peer id>: dialled at start and used to bootstrap the DHT.",
            item_type=str,
            paths=(Alias(f"{EDGEVPN_ENV}EDGEVPNBOOTSTRAPPEERS", parse=text_list),),
        ),
        Section(
            "connections",
            Option(
                "low",
                int,
                8,
                "Below this many connections the node dials more.",
                minimum=1,
                paths=(Alias(f"{EDGEVPN_ENV}EDGEVPN_CONNECTION_LOW_WATER", parse=text_value),),
            ),
            Option(
                "high",
                int,
                16,
                "Above this many it closes connections down to the middle of `low` and `high` (never bootstrap peers nor connections a feature is using); at least `low`.",
                paths=(
                    Alias(f"{EDGEVPN_ENV}EDGEVPNMAXCONNS", parse=text_value),
                    Alias(f"{EDGEVPN_ENV}EDGEVPN_CONNECTION_HIGH_WATER", parse=text_value),
                ),
            ),
            help="Long-lived connections a node keeps. A network of at most `low` nodes is fully connected.",
        ),
        Section(
            "relay",
            Option(
                "enable",
                bool,
                True,
                "Serve as a circuit relay for admitted peers while this node is publicly "
                "reachable (private nodes reserve on such relays).",
            ),
            Option(
                "max_circuits",
                int,
                8,
                "Relayed connections one peer may have through this node at once.",
                minimum=1,
                maximum=1024,
            ),
            Option(
                "max_bytes", int, 1 << 30, "Bytes (both ways) one relayed connection may carry before it is closed.", minimum=1024
            ),
            Option("max_duration", float, 3600.0, "Seconds one relayed connection may last before it is closed.", minimum=1),
            help="Circuit relay for peers behind NAT (only admitted peers; refusals are counted as p2p_relay_refused).",
        ),
        help="The p2p network, with Kairos's names.",
    ),
    Section(
        "node",
        Option(
            "state_dir",
            str,
            None,
            "Identity, ledger database and API socket live here; default "
            "/var/lib/kairos as root, ~/.local/state/kairos otherwise.",
        ),
        Option("hostname", str, None, "Advertised hostname; default: the machine's."),
        Option(
            "log_level",
            str,
            "info",
            "How much `kairos run` logs (Kairos's warn, dpanic, panic and fatal "
            "in p2p.loglevel read as warning, error, error, error).",
            choices=_LOG_LEVELS,
            paths=(Alias("p2p.loglevel", parse=_kairos_log_level),),
        ),
        Option(
            "log_format",
            str,
            "text",
            "How `kairos run` writes log lines: text, or json (one object per line "
            "with time, level, logger, message and fields such as peer; for "
            "journald or a log shipper). --log-format overrides it.",
            choices=("text", "json"),
        ),
        Option("hook_timeout", float, 30.0, "Seconds a plugin hook may run before it is abandoned and logged.", minimum=0.1),
        help="This node.",
    ),
    Section(
        "api",
        Option("enable", bool, True, "Serve the local control API on a unix socket (mode 0600) in the state dir."),
        Option("socket", str, None, "Socket path; default <state_dir>/api.sock."),
        Option(
            "metrics_listen",
            str,
            "",
            "Also serve Prometheus metrics (GET /metrics, nothing else, no "
            "authentication) on this TCP host:port, e.g. 127.0.0.1:9464; "
            "empty = off. The unix socket serves /metrics either way.",
        ),
        Option(
            "http_listen",
            str,
            "",
            "Also serve the web dashboard on this TCP host:port (a port alone means "
            "127.0.0.1:<port>), e.g. 127.0.0.1:8480; empty = off. Every request "
            "there needs the node's dashboard token (`kairos dashboard --url` "
            "prints the URL with it); bind another address than localhost only "
            "on a network you trust, the traffic is plain HTTP. The unix socket "
            "serves the dashboard at / either way, without a token. Needs api.enable.",
        ),
        help="The local control API (`kairos status`, `kairos ledger`, …).",
    ),
    Section(
        "ledger",
        Option(
            "max_value_size", int, 65536, "Largest JSON-encoded value one key may hold, in bytes.", minimum=1, maximum=1024 * 1024
        ),
        Option(
            "tombstone_grace",
            int,
            7 * 24 * 3600,
            "Seconds a tombstone is kept so partitions can heal before it is pruned.",
            minimum=60,
        ),
        Option("sync_interval", float, 30.0, "Seconds between anti-entropy exchanges with a random peer.", minimum=1),
        Option(
            "max_clock_drift",
            float,
            60.0,
            "Remote entries more than this many seconds ahead of our clock are refused (clock bound); one "
            "within it moves our clock at most half of it ahead, so nodes whose clocks differ by less than "
            "half of it accept each other's writes whatever a peer stamps.",
            minimum=1,
        ),
        # The quotas are at most half the network's quota (kairos_core.ledger.policy.NETWORK_QUOTA):
        # a peer still holding older entries of ours may count more than we do, and must not refuse
        # the newer.
        Option(
            "max_keys_per_owner",
            int,
            10_000,
            "Live keys this node's own writes may hold in open buckets (those without a policy of the "
            "core or a plugin); a write past it is refused. Peers' entries are held to twice this, the "
            "same on every node, so one insider cannot fill every node's memory and disk.",
            minimum=1,
            maximum=10_000,
        ),
        Option(
            "max_bytes_per_owner",
            int,
            8 * 1024 * 1024,
            "Bytes of values this node's own writes may hold in open buckets (peers: twice this).",
            minimum=1,
            maximum=8 * 1024 * 1024,
        ),
        Option(
            "max_tombstones_per_owner",
            int,
            10_000,
            "Tombstones this node's own writes may hold in open buckets (peers: twice this).",
            minimum=1,
            maximum=10_000,
        ),
        help="The shared ledger.",
    ),
    Section(
        "membership",
        Option(
            "announce_interval",
            float,
            30.0,
            "Seconds between checks of this node's entry in the `nodes` bucket: it is rewritten when it "
            "changed (and at once when its connections change), else refreshed three times per peer_ttl.",
            minimum=1,
        ),
        Option(
            "peer_ttl",
            float,
            900.0,
            "Seconds an entry vouches for the peers it lists without being refreshed (a live node refreshes "
            "its entry three times in this): a safety net, not how crashes are found — neighbours report those. "
            "Longer on a network too large for refresh_budget.",
            minimum=2,
        ),
        Option(
            "refresh_budget",
            float,
            1 / 30,
            "Refreshes of unchanged `nodes` entries per second the whole network may send (each reaches "
            "every node): on a network of N entries a node refreshes its entry every max(peer_ttl / 3, "
            "N / refresh_budget) seconds and an entry vouches for three times that, so a node's cost of "
            "refreshes stays flat as N grows. 0: every peer_ttl / 3 whatever N (a cost that grows with N).",
            minimum=0,
        ),
        Option(
            "rtt_publish_interval",
            float,
            60.0,
            "Seconds: the least time between rewrites of this node's `nodes` entry for a change of its "
            "published round-trip times alone (a value that moved > 20 % and > 5 ms); each rewrite reaches "
            "every node, so on a network of N members the wait is at least N × 10 s (the whole network "
            "then rewrites for RTTs alone at most once every 10 s). 0: publish them only with the writes "
            "that happen anyway (connections, refreshes).",
            minimum=0,
        ),
        help="Who is in the network.",
    ),
    Section(
        "election",
        Option("eligible", bool, True, "Whether this node may become leader."),
        Option(
            "lease_seconds",
            float,
            15.0,
            "Seconds without a renewal after which a lease has lapsed; renewals come 3 times as often. "
            "A crashed leader is replaced faster than this (see kairos_core/election.py).",
            minimum=0.5,
        ),
        Option(
            "require_majority",
            bool,
            True,
            "Claim and keep the lease only while a majority of recently seen nodes is reachable: in a "
            "partition only the majority side has a leader.",
        ),
        Option(
            "quorum_horizon",
            float,
            300.0,
            "Seconds a node that went away still counts in the electorate of that majority.",
            minimum=0,
        ),
        help="The leader election.",
    ),
    Section(
        "plugins",
        Option("disabled", list, [], "Plugin names never to load (see `kairos plugins`).", item_type=str),
        help="Which plugins load.",
    ),
)

#: Every core option's default, by section (derived from :data:`CORE_SCHEMA`).
CORE_DEFAULTS: dict[str, dict[str, Any]] = {section.name: section.defaults() for section in CORE_SCHEMA}
_CORE_SECTIONS = {section.name: section for section in CORE_SCHEMA}


@hookimpl
def kairos_config_schema() -> Iterable[Section]:
    """The core's own sections."""
    return CORE_SCHEMA


@hookimpl
def kairos_config_problems(config: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What the core's schema cannot say: checks across options."""
    connections = config["p2p"]["connections"]
    low, high = connections["low"], connections["high"]
    return [f"p2p.connections.high: must be at least low ({low}), not {high}"] if high < low else []


class Config(Mapping[str, Mapping[str, Any]]):
    """A validated config: every section filled with its defaults.

    A read-only :class:`~collections.abc.Mapping` of section name → that section's values:
    ``config["vpn"]["mtu"]`` is the plain value, and ``in``, iteration, ``len``, ``keys()``,
    ``items()``, ``values()`` and ``get()`` work as on any mapping. It is read-only all the way
    down: each section is a read-only mapping (:func:`~.schema.frozen`: mappings in it read-only
    too, lists tuples), so a plugin cannot change what the node and the other plugins read.
    ``config.section("election")`` is the section's typed, frozen settings object
    (``.lease_seconds`` a float), built from its schema; :meth:`as_dict` a mutable deep copy.
    """

    def __init__(
        self,
        data: dict[str, dict[str, Any]],
        path: Path | None = None,
        schema: Mapping[str, Section] | None = None,
        warnings: Iterable[str] = (),
        notes: Iterable[str] = (),
    ) -> None:
        self._data = data
        # what readers get: a deeply read-only copy, so no caller can change the node's config
        self._view: dict[str, Mapping[str, Any]] = {name: frozen(values) for name, values in data.items()}
        self.path = path
        #: what was accepted but does nothing here, or is read differently (`kairos run` logs each
        #: once at warning, `kairos config check` prints them)
        self.warnings: list[str] = list(warnings)
        #: what was ignored as not ours, at info (the OS sections of a Kairos cloud-config)
        self.notes: list[str] = list(notes)
        self.schema: dict[str, Section] = {**_CORE_SECTIONS, **(schema or {})}
        self._settings: dict[str, Any] = {}  # a config is never changed once built: read each section once

    def section(self, name: str) -> Any:
        """The typed settings of one section (a plugin's, or a core one), defaults filled in."""
        if name not in self._settings:
            declared = self.schema.get(name)
            if declared is None or name not in self._data:
                raise KeyError(f"no config section {name!r}; is the plugin that declares it installed?")
            self._settings[name] = declared.read(self._data[name])
        return self._settings[name]

    def __getitem__(self, name: str) -> Mapping[str, Any]:
        try:
            return self._view[name]
        except KeyError:
            raise KeyError(f"no config section {name!r}; is the plugin that declares it installed?") from None

    def __contains__(self, name: object) -> bool:
        return name in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

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
        raise ConfigError(f"{origin}: the top level must be a mapping of sections, not a {type_name(data)}")
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


def collect_schema(manager: KairosPluginManager) -> dict[str, Section]:
    """Every section the registered plugins declare (``kairos_config_schema``, then the plain
    dicts of ``kairos_config_defaults``), by name; :class:`ConfigError` names a broken declaration."""
    schema: dict[str, Section] = {}
    owners: dict[str, str] = {}

    def claim(section: Section, plugin: str) -> None:
        if section.name in owners:
            raise ConfigError(f"config section {section.name!r} is declared by both {owners[section.name]} and {plugin}")
        owners[section.name] = plugin
        schema[section.name] = section

    for impl in reversed(manager.pm.hook.kairos_config_schema.get_hookimpls()):
        try:
            declared = list(impl.function() or ())
        except Exception as exc:  # name the plugin: the user cannot fix what they cannot find
            raise ConfigError(f"plugin {impl.plugin_name} could not declare its config: {exc}") from None
        for section in declared:
            if not isinstance(section, Section):
                raise ConfigError(
                    f"plugin {impl.plugin_name}: kairos_config_schema must return Sections, not {type(section).__name__}"
                )
            claim(section, impl.plugin_name)
    for impl in reversed(manager.pm.hook.kairos_config_defaults.get_hookimpls()):
        try:
            declared = impl.function() or {}
        except Exception as exc:
            raise ConfigError(f"plugin {impl.plugin_name} could not declare its config: {exc}") from None
        if not isinstance(declared, Mapping):
            raise ConfigError(f"plugin {impl.plugin_name}: kairos_config_defaults must return a mapping")
        for name, values in declared.items():
            if not isinstance(values, Mapping):
                raise ConfigError(f"plugin {impl.plugin_name}: defaults of section {name!r} must be a mapping")
            try:
                section = section_from_defaults(str(name), values)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"plugin {impl.plugin_name}: section {name!r}: {exc}") from None
            claim(section, impl.plugin_name)
    return schema


def collect_defaults(manager: KairosPluginManager) -> dict[str, dict[str, Any]]:
    """Every section any registered plugin declares, with its defaults."""
    return {name: section.defaults() for name, section in collect_schema(manager).items()}


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
    schema = collect_schema(manager)
    data = copy.deepcopy(dict(raw))
    problems: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    _apply_env(data, os.environ if env is None else env, problems)
    # our path -> the path the user wrote, for every value read from a Kairos place
    origins: dict[str, str] = {}
    _lift_sections(data, schema, origins, warnings)
    _lift_options(data, schema, origins, warnings, problems)
    merged: dict[str, dict[str, Any]] = {}
    ignored = []
    for section in data:
        if section in schema:
            continue
        if section in KAIROS_OS_SECTIONS:
            ignored.append(str(section))
        elif section in OPTIONAL_PLUGIN_SECTIONS:
            name, what = OPTIONAL_PLUGIN_SECTIONS[section]
            warnings.append(f"{section}: ignored: {what} needs {name}, which is not installed")
        else:
            problems.append(f"{section}: unknown section")
    if ignored:
        notes.append(f"ignored (they configure the OS, not the p2p network): {', '.join(ignored)}")
    for name, section in schema.items():
        merged[name] = section.merge(data.get(name), name, problems, warnings=warnings)
    if not problems:
        problems.extend(_plugin_problems(manager, merged))
    if check_token and not problems and merged["p2p"]["network_token"]:
        try:
            parse_token(str(merged["p2p"]["network_token"]))
        except KairosError as exc:
            problems.append(f"p2p.network_token: {exc}")
    problems = [_as_written(line, origins, mentions=True) for line in problems]
    if problems:
        origin = f"config {path}" if path else "config"
        noun = "problem" if len(problems) == 1 else "problems"
        raise ConfigError(f"{origin}: {len(problems)} {noun}: " + "; ".join(problems), problems)
    return Config(merged, path, schema, [_as_written(line, origins) for line in dict.fromkeys(warnings)], notes)


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
        parts = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
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


def _walk(schema: Mapping[str, Section]) -> Iterable[tuple[tuple[str, ...], Option | Section]]:
    # Every declaration with its path, sections before what they hold.
    def visit(path: tuple[str, ...], declared: Option | Section):
        yield path, declared
        if isinstance(declared, Section):
            for option in declared.options:
                yield from visit((*path, option.name), option)

    for name, section in schema.items():
        yield from visit((name,), section)


def _declared_at(schema: Mapping[str, Section], path: tuple[str, ...]) -> Option | Section | None:
    found: Any = schema.get(path[0])
    for part in path[1:]:
        found = found.get(part) if isinstance(found, Section) else None
    return found


def _holder(data: dict[str, Any], parents: tuple[str, ...], create: bool) -> dict[str, Any] | None:
    holder: Any = data
    for part in parents:
        child = holder.get(part) if isinstance(holder, dict) else None
        if child is None and create and isinstance(holder, dict):
            child = holder[part] = {}
        holder = child
    return holder if isinstance(holder, dict) else None


def _lift_sections(data: dict[str, Any], schema: Mapping[str, Section], origins: dict[str, str], warnings: list[str]) -> None:
    # Kairos puts vpn/kubevip/auto… inside p2p: a section's aliases name where, and it is read from
    # there as the section itself. The section's own key wins key by key when both are given; an
    # alias that is an option of the section it sits in is that option, never lifted. Outer
    # sections first, so that p2p.auto is auto before auto.ha's aliases are looked for.
    for target, section in _walk(schema):
        if not isinstance(section, Section):
            continue
        for alias in section.aliases:
            *parents, key = alias.split(".")
            if not parents:
                continue
            holder = _holder(data, tuple(parents), create=False)
            if holder is None or not isinstance(holder.get(key), dict):
                continue
            owner = _declared_at(schema, tuple(parents))
            if isinstance(owner, Section) and owner.get(key) is not None:
                continue
            into = _holder(data, target[:-1], create=True)
            if into is None:
                continue
            lifted = holder.pop(key)
            top = into.get(target[-1])
            own = top if isinstance(top, dict) else {}
            into[target[-1]] = {**lifted, **own}
            written = _as_written(alias, origins)
            for name in lifted:
                if name not in own:
                    origins[".".join((*target, str(name)))] = f"{written}.{name}"
            if alias in section.alias_warnings:
                warnings.append(f"{written}: {section.alias_warnings[alias]}")


def _as_ours(path: str, schema: Mapping[str, Section]) -> str | None:
    # Where a Kairos path lands once sections are lifted: p2p.vpn.env.X is vpn.env.X.
    best = None
    for target, section in _walk(schema):
        if isinstance(section, Section):
            for alias in section.aliases:
                if path.startswith(alias + ".") and (best is None or len(alias) > len(best[0])):
                    best = (alias, ".".join(target))
    return None if best is None else best[1] + path[len(best[0]) :]


def _lift_options(
    data: dict[str, Any], schema: Mapping[str, Section], origins: dict[str, str], warnings: list[str], problems: list[str]
) -> None:
    # Options that Kairos sets elsewhere (p2p.loglevel, p2p.vpn.env.ADDRESS): each value is moved
    # to its option, so the option's checks apply, and problems name the place it came from.
    for target, option in _walk(schema):
        if not isinstance(option, Option) or not option.paths:
            continue
        target_path = ".".join(target)
        into = _holder(data, target[:-1], create=False)
        own = into.get(target[-1]) if into is not None else None
        # Kairos (Go, omitempty) cannot tell `disable_dht: false` from no key: a default written
        # out does not hide EdgeVPN's EDGEVPNDHT, as it does not in Kairos.
        set_by = _as_written(target_path, origins) if own is not None and own != option.default else None
        for alias in (path if isinstance(path, Alias) else Alias(path) for path in option.paths):
            for candidate in (alias.path, _as_ours(alias.path, schema)):
                if candidate is None:
                    continue
                *parents, key = candidate.split(".")
                holder = _holder(data, tuple(parents), create=False)
                if holder is None or key not in holder:
                    continue
                declared = _declared_at(schema, tuple(candidate.split(".")))
                if isinstance(declared, Option) and not declared.no_effect:
                    continue  # a real option of its own section, not a Kairos place
                value = holder.pop(key)
                written = _as_written(candidate, origins)
                if alias.warning:
                    warnings.append(f"{written}: {alias.warning}")
                if value is None:
                    break
                if alias.parse is not None:
                    try:
                        value = alias.parse(value)
                    except ValueError as exc:
                        problems.append(f"{written}: {exc}")
                        break
                    if value is SKIP:
                        break
                if set_by is not None:
                    warnings.append(f"{written}: ignored, {set_by} is given too and wins")
                    break
                into = _holder(data, target[:-1], create=True)
                if into is None:
                    break  # a parent is not a mapping: the merge reports it
                into[target[-1]] = value
                origins[target_path] = set_by = written
                break


def _as_written(line: str, origins: Mapping[str, str], mentions: bool = False) -> str:
    """``line`` (a problem or warning starting with a path) naming the path the user wrote.

    With ``mentions``, other whole paths in the line are named so too (a problem's ``... of
    vpn.cidr 10.1.0.0/24``); not in warnings, whose explanations name our options on purpose.
    """
    best = ""
    for ours in origins:
        if len(ours) > len(best) and line.startswith(ours) and line[len(ours) : len(ours) + 1] in ("", ":", ".", "[", " "):
            best = ours
    head, rest = "", line
    if best:
        head, rest = origins[best], line[len(best) :]
    # other paths the line mentions (`... of vpn.cidr 10.1.0.0/24`) as the user wrote them too
    for ours, written in origins.items() if mentions else ():
        if ours != written and ours in rest:
            rest = re.sub(rf"(?<![\w.-]){re.escape(ours)}(?![\w-])", written, rest)
    return head + rest
