"""What k3s is started with: flags, environment and the content of its config file.

Three layers, in this order of authority:

1. **Managed** settings that make the cluster work over the VPN and let nodes join: ``node-ip``,
   ``flannel-iface``, ``tls-san``, ``cluster-init`` / ``datastore-endpoint`` (config file) and
   ``K3S_URL`` / ``K3S_TOKEN`` (environment). Nothing the user writes removes them: user flags that
   would override one are dropped with a note, user ``--tls-san`` values are merged in.
2. Flags from other plugins (``k3s_server_args`` / ``k3s_agent_args``): always kept.
3. The plugin's defaults, then the user's ``args`` / ``env``; ``replace_args`` / ``replace_env``
   swap the defaults for the user's values, never layers 1 and 2. (Kairos's ``external_db`` path
   replaced everything and lost ``--flannel-iface``; that cannot happen here.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .paths import K3sPaths
from .roles import CLUSTER_INIT, MASTER_HA, WORKER, is_server
from .settings import FlagSet
from .validate import clean_host, clean_token

SERVER_SERVICE = "k3s"
AGENT_SERVICE = "k3s-agent"

DEFAULT_SERVER_ARGS: tuple[str, ...] = ()
# Kairos starts agents with --with-node-id: two machines with the same hostname still both join.
DEFAULT_AGENT_ARGS: tuple[str, ...] = ("--with-node-id",)
DEFAULT_ENV: dict[str, str] = {}

# Flags whose value the plugin manages when it knows one (``--flag=value`` or ``--flag value``).
_MANAGED_FLAGS = ("node-ip", "flannel-iface", "server", "token", "cluster-init", "tls-san")
_MANAGED_ENV = ("K3S_URL", "K3S_TOKEN", "K3S_CONFIG_FILE")


@dataclass(frozen=True)
class Join:
    """How a joining node reaches the cluster."""

    server_url: str | None  # None for masters that share an external datastore instead
    token: str


@dataclass(frozen=True)
class K3sLaunch:
    """One k3s launch. Equal launches mean nothing to restart."""

    service: str
    binary: str
    argv: tuple[str, ...]
    env: dict[str, str]
    config: dict[str, Any]
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def command(self) -> list[str]:
        """Binary and arguments."""
        return [self.binary, *self.argv]

    def fingerprint(self) -> str:
        """A digest of everything that, when changed, requires a restart."""
        data = json.dumps([self.service, self.command, self.env, self.config], sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:16]


def server_url(address: str, port: int) -> str:
    """``https://address:port``, with brackets around an IPv6 address.

    Built from checked parts only: ``ValueError`` unless ``address`` is an IP address or a host
    name and ``port`` a port number (a URL goes into k3s's environment as it is).
    """
    host = clean_host(address[1:-1] if address.startswith("[") and address.endswith("]") else address)
    if host is None:
        raise ValueError(f"not an IP address or host name: {address!r}")
    if type(port) is not int or not 1 <= port <= 65535:
        raise ValueError(f"not a port: {port!r}")
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def build_launch(
    role: str,
    *,
    flags: FlagSet,
    binary: str,
    paths: K3sPaths,
    node_ip: str | None,
    interface: str | None,
    tls_sans: Sequence[str] = (),
    plugin_args: Sequence[str] = (),
    join: Join | None = None,
    external_db: str = "",
    embedded_registry: bool = False,
) -> K3sLaunch:
    """The launch of k3s for ``role``.

    :param flags: the user's flags and environment for this mode (``k3s`` or ``k3s-agent``).
    :param node_ip: the node's address on the VPN (or its own); None to let k3s choose.
    :param interface: the VPN interface for flannel; None without a VPN.
    :param tls_sans: extra SANs (servers); the node's address is added first.
    :param plugin_args: flags from other plugins' hooks.
    :param join: server URL and token, for ``master/ha`` and ``worker``.
    :param external_db: datastore endpoint for masters (``auto.ha.external_db``).
    :param embedded_registry: servers run k3s's embedded registry (``k3s.embedded_registry``).
    """
    server = is_server(role)
    if role in (MASTER_HA, WORKER) and join is None:
        raise ValueError(f"role {role} needs a server address and a token to join")
    if join is not None and clean_token(join.token) is None:
        # The token reaches k3s's environment file: never one that is not a plain token.
        raise ValueError("the join token is not a k3s token")
    config: dict[str, Any] = {}
    env: dict[str, str] = {}
    if node_ip:
        config["node-ip"] = node_ip
    if interface:
        config["flannel-iface"] = interface
    if paths.relocated:
        config["data-dir"] = str(paths.data_dir)
    if server:
        if paths.relocated:
            config["write-kubeconfig"] = str(paths.kubeconfig)
        if external_db:
            config["datastore-endpoint"] = external_db
        elif role == CLUSTER_INIT:
            config["cluster-init"] = True
        if embedded_registry:
            config["embedded-registry"] = True
    if join is not None:
        if join.server_url and not (server and external_db):
            env["K3S_URL"] = join.server_url
        env["K3S_TOKEN"] = join.token
    if paths.relocated:
        env["K3S_CONFIG_FILE"] = str(paths.config_file)

    user_args, notes, user_sans = _strip_managed(flags.args, config, env)
    if server:
        sans = _unique([node_ip or "", *tls_sans, *user_sans])
        if sans:
            config["tls-san"] = sans
    defaults = () if flags.replace_args else (DEFAULT_SERVER_ARGS if server else DEFAULT_AGENT_ARGS)
    argv = ("server" if server else "agent", *plugin_args, *defaults, *user_args)

    final_env = {} if flags.replace_env else dict(DEFAULT_ENV)
    for name, value in flags.env.items():
        if name in env:
            notes.append(f"env {name} is managed by the k3s plugin; the configured value is ignored")
            continue
        final_env[name] = value
    final_env.update(env)
    return K3sLaunch(
        service=SERVER_SERVICE if server else AGENT_SERVICE,
        binary=binary,
        argv=argv,
        env=final_env,
        config=config,
        notes=tuple(notes),
    )


def _strip_managed(args: Sequence[str], config: dict[str, Any], env: dict[str, str]) -> tuple[list[str], list[str], list[str]]:
    """User args without the flags the plugin sets; also the user's own ``--tls-san`` values."""
    kept: list[str] = []
    notes: list[str] = []
    sans: list[str] = []
    managed = set(config) | {"server" if "K3S_URL" in env else "", "token" if "K3S_TOKEN" in env else ""}
    index = 0
    while index < len(args):
        arg = args[index]
        name, has_value, value = _flag(arg)
        if name in _MANAGED_FLAGS and (name in managed or name == "tls-san"):
            if not has_value and name != "cluster-init" and index + 1 < len(args) and not args[index + 1].startswith("-"):
                value = args[index + 1]
                index += 1
            if name == "tls-san":
                sans.extend(v for v in value.split(",") if v)
            else:
                notes.append(f"--{name} is managed by the k3s plugin; the configured value is ignored")
            index += 1
            continue
        kept.append(arg)
        index += 1
    return kept, notes, sans


def _flag(arg: str) -> tuple[str, bool, str]:
    if not arg.startswith("--"):
        return "", False, ""
    name, eq, value = arg[2:].partition("=")
    return name, bool(eq), value


def _unique(values: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for value in values:
        if value and value not in seen:
            seen.append(value)
    return seen
