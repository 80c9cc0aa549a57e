"""Hooks the k3s plugin offers to other plugins (kubevip implements them).

Added to a node's plugin manager through ``kairos_add_hookspecs`` when the k3s plugin registers.
Implement them with ``@hookimpl(optionalhook=True)`` so your plugin still loads where the k3s
plugin is absent. Like the core's hooks, implementations may be ``def`` or ``async def`` and may
take fewer arguments than the spec names; one that raises is logged and left out.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

from kairos_core.plugin import hookspec

if TYPE_CHECKING:
    from kairos_core.plugin import NodeView

    from .paths import K3sPaths


@hookspec
def k3s_server_args(node: NodeView, role: str) -> list[str] | Awaitable[list[str]] | None:
    """Add command-line flags to ``k3s server``.

    Called each time the k3s plugin computes the launch of a server on this node (a node whose
    role is ``master``, ``master/clusterinit`` or ``master/ha``), before comparing it with what
    runs. Flags from this hook are always kept: ``k3s.replace_args`` replaces only the plugin's own
    defaults. Return the same flags for the same state, or k3s restarts.

    :param node: this node.
    :param role: the node's role, one of ``master``, ``master/clusterinit``, ``master/ha``.
    :return: flags such as ``["--disable=traefik"]``; results of all plugins are concatenated.
    """


@hookspec
def k3s_agent_args(node: NodeView) -> list[str] | Awaitable[list[str]] | None:
    """Add command-line flags to ``k3s agent``.

    Called each time the k3s plugin computes the launch of an agent on this node (role
    ``worker``). Kept even with ``k3s-agent.replace_args``.

    :param node: this node.
    :return: flags; results of all plugins are concatenated.
    """


@hookspec
def k3s_tls_sans(node: NodeView) -> list[str] | Awaitable[list[str]] | None:
    """Add subject alternative names to the API server's certificate.

    Called when the launch of a server is computed. The node's own address is always a SAN; a
    plugin that puts the API behind another address (kubevip's EIP) adds it here.

    :param node: this node.
    :return: host names or IP addresses; all plugins' results are merged without duplicates.
    """


@hookspec
def k3s_server_address(node: NodeView) -> str | Awaitable[str] | None:
    """Name the address joining nodes use to reach the API server.

    Called when a node joins a cluster (``master/ha`` or ``worker``) and when the init master
    publishes ``ip-master``. Without an answer the published address of the init master is used.
    The first valid answer (an IP address or a DNS host name) wins; others are counted in the
    member's ``bad_hook_results`` and ignored, since the answer becomes part of k3s's server URL.

    :param node: this node.
    :return: an IP address or host name (no scheme, no port), or None for no opinion.
    """


@hookspec
def k3s_before_start(node: NodeView, role: str, paths: K3sPaths) -> Awaitable[None] | None:
    """Prepare files k3s reads at start, such as manifests.

    Called on every reconciliation of a node that has a role, just before the plugin writes the
    k3s config and (re)starts k3s if it changed; so write files only when their content changes.
    Manifests in ``paths.manifests_dir`` are applied by a k3s server on its own.

    :param node: this node.
    :param role: ``master``, ``master/clusterinit``, ``master/ha`` or ``worker``.
    :param paths: where k3s's files live on this node (under ``k3s.root``).
    :return: ignored.
    """
