"""The config sections of the k3s plugin and the one accessor that reads them.

Kairos users write ``p2p.auto`` (and may write ``p2p.k3s``); the core lifts plugin sections found
under ``p2p:`` to the top level, so they arrive here as ``auto`` and ``k3s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

K3S_SECTION = "k3s"
AGENT_SECTION = "k3s-agent"
AUTO_SECTION = "auto"

CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    K3S_SECTION: {
        # Run k3s on this node (roles are still scheduled by the leader when this is off).
        "enabled": True,
        # Extra flags for `k3s server`, appended to the defaults (or replacing them, below).
        "args": [],
        # Extra environment for k3s server.
        "env": {},
        # The flags above replace the plugin's default flags. The VPN and join flags always stay.
        "replace_args": False,
        # The env above replaces the plugin's default environment. K3S_URL/K3S_TOKEN always stay.
        "replace_env": False,
        # Prefix of every path the plugin touches (tests); empty = the real file system.
        "root": "",
        # The k3s executable: a name looked up on PATH, or a path.
        "binary": "k3s",
        # How k3s runs: auto | systemd | openrc | process (a child supervised by the node).
        "runner": "auto",
        # Service manager commands (a name on PATH or a path).
        "systemctl": "systemctl",
        "rc_service": "rc-service",
        "rc_update": "rc-update",
        # The API server port joining nodes dial.
        "api_port": 6443,
        # This node's k3s address; empty = its VPN address, or its own address without a VPN.
        "node_ip": "",
        # Seconds between reconciliations (ledger changes trigger one at once).
        "reconcile_interval": 5.0,
        # Also publish the admin kubeconfig (client key included) in the ledger, so every node
        # keeps a copy, as earlier versions and Kairos did. Off: `kairos get-kubeconfig` fetches
        # it from a master on demand.
        "share_kubeconfig": False,
    },
    AGENT_SECTION: {
        # Kairos's `k3s-agent` section: flags and environment for `k3s agent` (workers).
        "enabled": True,
        "args": [],
        "env": {},
        "replace_args": False,
        "replace_env": False,
    },
    AUTO_SECTION: {
        # The leader assigns roles to nodes without a fixed p2p.role.
        "enable": True,
        "ha": {
            # Several masters on embedded etcd: one master/clusterinit, then master/ha.
            "enable": False,
            # Masters in total (the clusterinit one included).
            "master_nodes": 3,
            # A datastore endpoint (e.g. mysql://…): masters use it instead of embedded etcd.
            "external_db": "",
        },
    },
}


@dataclass(frozen=True)
class FlagSet:
    """User flags and environment for one k3s mode (server or agent)."""

    enabled: bool
    args: tuple[str, ...]
    env: dict[str, str]
    replace_args: bool
    replace_env: bool

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> "FlagSet":
        """Read a ``k3s`` or ``k3s-agent`` section; non-string env values are stringified."""
        return cls(
            enabled=bool(section.get("enabled", True)),
            args=tuple(str(arg) for arg in section.get("args") or ()),
            env={str(k): _env_text(v) for k, v in (section.get("env") or {}).items()},
            replace_args=bool(section.get("replace_args", False)),
            replace_env=bool(section.get("replace_env", False)),
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
    auto_enable: bool
    ha_enable: bool
    master_nodes: int
    external_db: str
    role_hint: str
    minimum_nodes: int

    @classmethod
    def from_config(cls, config: Any) -> "K3sSettings":
        """Read the plugin's sections (and ``p2p.role``, ``p2p.minimum_nodes``) from a node config."""
        k3s = config[K3S_SECTION]
        auto = config[AUTO_SECTION]
        ha = auto.get("ha") or {}
        p2p = config["p2p"]
        return cls(
            enabled=bool(k3s["enabled"]),
            server=FlagSet.from_section(k3s),
            agent=FlagSet.from_section(config[AGENT_SECTION]),
            root=str(k3s["root"] or ""),
            binary=str(k3s["binary"]),
            runner=str(k3s["runner"]),
            systemctl=str(k3s["systemctl"]),
            rc_service=str(k3s["rc_service"]),
            rc_update=str(k3s["rc_update"]),
            api_port=int(k3s["api_port"]),
            node_ip=str(k3s["node_ip"] or ""),
            reconcile_interval=max(0.05, float(k3s["reconcile_interval"])),
            share_kubeconfig=bool(k3s.get("share_kubeconfig", False)),
            auto_enable=bool(auto["enable"]),
            ha_enable=bool(ha.get("enable", False)),
            master_nodes=max(1, int(ha.get("master_nodes", 3))),
            external_db=str(ha.get("external_db") or ""),
            role_hint=str(p2p.get("role") or ""),
            minimum_nodes=max(1, int(p2p.get("minimum_nodes", 2))),
        )


def _env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)
