"""The config sections of the k3s plugin, declared once (:data:`SCHEMA`), and the one accessor that reads them.

Kairos users write ``p2p.auto`` (and may write ``p2p.k3s``); the core lifts plugin sections found
under ``p2p:`` to the top level, so they arrive here as ``auto`` and ``k3s``. ``p2p.dynamic_roles``
is ``auto.dynamic_roles``, and ``auto.ha.master_nodes`` counts as Kairos counts it: masters
*besides* the clusterinit one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kairos_core.plugin import Alias, Option, Section

K3S_SECTION = "k3s"
AGENT_SECTION = "k3s-agent"
AUTO_SECTION = "auto"

#: Masters besides the clusterinit one when HA is on and ``master_nodes`` is not given.
DEFAULT_EXTRA_MASTERS = 2

#: How k3s may run (:mod:`.runners` makes each; listed here so the schema needs no runner).
RUNNER_KINDS = ("auto", "systemd", "openrc", "process")


def _flag_options(mode: str) -> tuple[Option, ...]:
    # The options k3s and k3s-agent share, as Kairos names them.
    return (
        Option(
            "args",
            list,
            [],
            f"Extra flags for `k3s {mode}`, appended to the plugin's defaults (or replacing them: replace_args).",
            item_type=str,
        ),
        Option("env", dict, {}, f"Extra environment for `k3s {mode}` (name: value)."),
        Option(
            "replace_args", bool, False, "The flags above replace the plugin's default flags. The VPN and join flags always stay."
        ),
        Option(
            "replace_env", bool, False, "The env above replaces the plugin's default environment. K3S_URL/K3S_TOKEN always stay."
        ),
    )


K3S = Section(
    K3S_SECTION,
    Option("enabled", bool, True, "Run k3s on this node (roles are still scheduled by the leader when this is off)."),
    *_flag_options("server"),
    Option("root", str, "", "Prefix of every path the plugin touches (tests); empty = the real file system."),
    Option("binary", str, "k3s", "The k3s executable: a name looked up on PATH, or a path."),
    Option("runner", str, "auto", "How k3s runs (process: a child supervised by the node).", choices=RUNNER_KINDS),
    Option("systemctl", str, "systemctl", "The systemctl command (a name on PATH or a path)."),
    Option("rc_service", str, "rc-service", "OpenRC's rc-service command (a name on PATH or a path)."),
    Option("rc_update", str, "rc-update", "OpenRC's rc-update command (a name on PATH or a path)."),
    Option("api_port", int, 6443, "The API server port joining nodes dial.", minimum=1, maximum=65535),
    Option("node_ip", str, "", "This node's k3s address; empty = its VPN address, or its own address without a VPN."),
    Option(
        "reconcile_interval", float, 5.0, "Seconds between reconciliations (ledger changes trigger one at once).", minimum=0.05
    ),
    Option(
        "embedded_registry",
        bool,
        False,
        "Start k3s servers with --embedded-registry (Spegel: nodes pull images from each other), as Kairos's "
        "k3s.embedded_registry.",
    ),
    Option(
        "distribution",
        str,
        "k3s",
        "The Kubernetes distribution (Kairos's p2p.distribution, empty meaning k3s there too): this plugin runs "
        "k3s only, so k0s is refused rather than silently run as k3s.",
        choices=("k3s", ""),
        paths=("p2p.distribution",),
    ),
    Option(
        "share_kubeconfig",
        bool,
        False,
        "Also publish the admin kubeconfig (client key included) in the ledger, so every node keeps a copy, as "
        "earlier versions and Kairos did. Off: `kairos get-kubeconfig` fetches it from a master on demand.",
    ),
    help="k3s on this node, and `k3s server` on masters (Kairos: k3s).",
    aliases=(f"p2p.{K3S_SECTION}",),
)
AGENT = Section(
    AGENT_SECTION,
    Option("enabled", bool, True, "Run k3s as an agent when this node is a worker."),
    *_flag_options("agent"),
    Option(
        "embedded_registry",
        bool,
        False,
        "Kairos reads this key only in its k3s section.",
        no_effect="the embedded registry is a k3s server flag: set k3s.embedded_registry",
    ),
    help="Kairos's `k3s-agent` section: flags and environment for `k3s agent` (workers).",
    aliases=(f"p2p.{AGENT_SECTION}",),
)
AUTO = Section(
    AUTO_SECTION,
    Option("enable", bool, True, "The leader assigns roles to nodes without a fixed p2p.role."),
    Option(
        "dynamic_roles",
        bool,
        False,
        "The leader takes the role back from a node that is no longer a member (crashed, gone, cut off), so "
        "that a new node can take its place; the node gets a role anew when it returns (Kairos's "
        "p2p.dynamic_roles).",
        paths=("p2p.dynamic_roles",),
    ),
    Section(
        "ha",
        Option(
            "enable",
            bool,
            None,
            "Several masters on embedded etcd: one master/clusterinit, then master/ha. "
            "Unset: on when master_nodes is given (as in Kairos).",
        ),
        Option(
            "master_nodes",
            int,
            None,
            f"Masters besides the clusterinit one, as Kairos counts them: 2 means 3 masters in all. Unset with "
            f"HA on: {DEFAULT_EXTRA_MASTERS}.",
            minimum=0,
        ),
        Option("external_db", str, "", "A datastore endpoint (e.g. mysql://…): masters use it instead of embedded etcd."),
        help="A highly available control plane.",
        aliases=(
            Alias(
                "p2p.ha", warning="read as p2p.auto.ha (a typo in one Kairos docs example; provider-kairos itself ignores p2p.ha)"
            ),
        ),
    ),
    help="Automatic roles (Kairos: p2p.auto).",
    aliases=(f"p2p.{AUTO_SECTION}",),
)
#: The plugin's sections, as ``kairos_config_schema`` declares them.
SCHEMA = (K3S, AGENT, AUTO)
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {section.name: section.defaults() for section in SCHEMA}


@dataclass(frozen=True)
class FlagSet:
    """User flags and environment for one k3s mode (server or agent)."""

    enabled: bool
    args: tuple[str, ...]
    env: dict[str, str]
    replace_args: bool
    replace_env: bool

    @classmethod
    def from_section(cls, section: Any) -> "FlagSet":
        """From the typed settings of a ``k3s`` or ``k3s-agent`` section; env values are stringified."""
        return cls(
            enabled=section.enabled,
            args=section.args,
            env={str(k): _env_text(v) for k, v in section.env.items()},
            replace_args=section.replace_args,
            replace_env=section.replace_env,
        )


@dataclass(frozen=True)
class K3sSettings:
    """Everything the plugin reads from a node's config."""

    enabled: bool
    server: FlagSet
    agent: FlagSet
    root: str
    binary: str
    runner: str
    systemctl: str
    rc_service: str
    rc_update: str
    api_port: int
    node_ip: str
    reconcile_interval: float
    share_kubeconfig: bool
    embedded_registry: bool
    auto_enable: bool
    dynamic_roles: bool
    ha_enable: bool
    #: masters in all with HA: the clusterinit one and ``auto.ha.master_nodes`` more
    masters_total: int
    external_db: str
    role_hint: str
    minimum_nodes: int

    @classmethod
    def from_config(cls, config: Any) -> "K3sSettings":
        """Read the plugin's sections (and ``p2p.role``, ``p2p.minimum_nodes``) from a node config.

        Types and bounds are the schema's (:data:`SCHEMA`, checked again here for configs built by
        hand: :class:`ConfigError`); nothing is cast or clamped.
        """
        k3s = K3S.read(config[K3S_SECTION])
        auto = AUTO.read(config[AUTO_SECTION])
        p2p = config["p2p"]
        extra = auto.ha.master_nodes
        ha_enable = auto.ha.enable if auto.ha.enable is not None else extra is not None
        return cls(
            enabled=k3s.enabled,
            server=FlagSet.from_section(k3s),
            agent=FlagSet.from_section(AGENT.read(config[AGENT_SECTION])),
            root=k3s.root,
            binary=k3s.binary,
            runner=k3s.runner,
            systemctl=k3s.systemctl,
            rc_service=k3s.rc_service,
            rc_update=k3s.rc_update,
            api_port=k3s.api_port,
            node_ip=k3s.node_ip,
            reconcile_interval=k3s.reconcile_interval,
            share_kubeconfig=k3s.share_kubeconfig,
            embedded_registry=k3s.embedded_registry,
            auto_enable=auto.enable,
            dynamic_roles=auto.dynamic_roles,
            ha_enable=ha_enable,
            masters_total=1 + (DEFAULT_EXTRA_MASTERS if extra is None else extra),
            external_db=auto.ha.external_db,
            # the core's options, validated by its own schema
            role_hint=p2p["role"],
            minimum_nodes=p2p["minimum_nodes"],
        )


def _env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)
