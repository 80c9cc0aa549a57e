"""The kairos hooks of the k3s plugin; the entry point ``k3s`` is :data:`plugin`."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Mapping

import pluggy

from kairos_core.plugin import OWNER_KEYED, Section, WritePolicy, hookimpl

from . import hookspecs
from .addresses import VPN_BUCKET
from .cluster_state import cluster_bucket
from .member import ClusterMember
from .settings import AGENT_SECTION, K3S_SECTION, SCHEMA, K3sSettings
from .validate import clean_ip, env_name_ok

if TYPE_CHECKING:
    import click

    from kairos_core.plugin import LedgerUpdate, NodeView, PeerEvent

log = logging.getLogger(__name__)

_WAKING_BUCKETS = ("leader", VPN_BUCKET)


class K3sPlugin:
    """Runs a :class:`ClusterMember` on every node it is registered with (one object may serve
    several in-process nodes, as in tests)."""

    def __init__(self) -> None:
        self.members: dict[NodeView, ClusterMember] = {}

    def member(self, node: NodeView) -> ClusterMember | None:
        """The cluster member of ``node``, while it runs."""
        return self.members.get(node)

    @hookimpl
    def kairos_add_hookspecs(self, pluginmanager: pluggy.PluginManager) -> None:
        """Declare ``k3s_*`` hooks for other plugins."""
        caller = getattr(pluginmanager.hook, "k3s_server_args", None)
        if caller is None or not caller.has_spec():
            pluginmanager.add_hookspecs(hookspecs)

    @hookimpl
    def kairos_config_schema(self) -> tuple[Section, ...]:
        """Sections ``k3s``, ``k3s-agent`` and ``auto`` (Kairos users may write them under ``p2p:``)."""
        return SCHEMA

    @hookimpl
    def kairos_config_problems(self, config: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """What the schema cannot say: ``k3s.node_ip`` is an IP address, env names are names."""
        k3s = config[K3S_SECTION]
        problems = []
        if k3s["node_ip"] and clean_ip(k3s["node_ip"]) is None:
            problems.append(f"k3s.node_ip: {k3s['node_ip']!r} is not an IP address")
        for section in (K3S_SECTION, AGENT_SECTION):
            for name in config[section]["env"]:
                if not env_name_ok(name):
                    problems.append(f"{section}.env: {name!r} is not a valid environment variable name")
        return problems

    @hookimpl
    def kairos_ledger_policies(self, node: NodeView) -> Mapping[str, WritePolicy]:
        """The cluster's bucket ``<network_id>/k3s`` is owner-keyed: each node writes under its own
        peer id only, and readers decide whose entries count (see :mod:`.cluster_state`)."""
        return {cluster_bucket(node.network_id): OWNER_KEYED}

    @hookimpl
    def kairos_cli_commands(self, cli: click.Group) -> None:
        """``kairos get-kubeconfig``."""
        from .cli import add_commands

        add_commands(cli)

    @hookimpl
    async def kairos_startup(self, node: NodeView) -> None:
        """Serve the kubeconfig (stream and local socket) and start reconciling."""
        member = ClusterMember(node, K3sSettings.from_config(node.config))
        self.members[node] = member
        await member.start()

    @hookimpl
    async def kairos_shutdown(self, node: NodeView) -> None:
        """Stop reconciling (and a directly supervised k3s)."""
        member = self.members.pop(node, None)
        if member is not None:
            await member.stop()

    @hookimpl
    def on_ledger_update(self, node: NodeView, update: LedgerUpdate) -> None:
        """Reconcile when the cluster's keys (or legacy roles), a lease or a VPN address change."""
        member = self.members.get(node)
        if member is not None and (
            update.bucket in (member.state.bucket, member.state.legacy_bucket) or update.bucket in _WAKING_BUCKETS
        ):
            member.wake()

    @hookimpl
    def on_peer(self, node: NodeView, event: PeerEvent) -> None:
        """Membership changes the leader's candidates."""
        member = self.members.get(node)
        if member is not None:
            member.wake()

    @hookimpl
    def on_leader_elected(self, node: NodeView, leader: str, epoch: int) -> None:
        """A new leader schedules at once."""
        member = self.members.get(node)
        if member is not None:
            member.wake()


plugin = K3sPlugin()
