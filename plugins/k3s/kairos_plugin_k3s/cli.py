"""``kairos get-kubeconfig``: the cluster's admin kubeconfig, pointed at a reachable address.

The running node fetches it (from its own k3s when it is a master, else from a master over an
admitted stream, see :mod:`.service`); the command asks that node through its local socket.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kairos_core.plugin import KairosError

from .kubeconfig import KubeconfigError, rewrite_kubeconfig
from .service import KubeconfigUnavailable, ask_node, socket_path as k3s_socket


def add_commands(cli: click.Group) -> None:
    """Add ``get-kubeconfig`` to the ``kairos`` command."""
    from kairos_core.plugin import pass_context, socket_option

    @cli.command("get-kubeconfig")
    @socket_option
    @click.option("--network-id", metavar="ID", help="Fail unless the node is in this network (default: any).")
    @click.option("--address", metavar="IP", help="Point the kubeconfig at this address instead of the master's.")
    @pass_context
    def get_kubeconfig(context: Any, socket_path: str | None, network_id: str | None, address: str | None) -> None:
        """Print the k3s kubeconfig, with the server set to the master's VPN address or the EIP.

        Asks the node running on this machine, which fetches the kubeconfig from a master of the
        cluster: run it on any node of the network.
        """
        target_socket = k3s_socket(Path(socket_path) if socket_path else context.load_config().api_socket)
        try:
            reply = ask_node(target_socket, {"op": "get-kubeconfig", "network_id": network_id})
        except KubeconfigUnavailable as exc:
            raise KairosError(str(exc)) from None
        if "error" in reply:
            raise KairosError(str(reply["error"]))
        text = reply.get("kubeconfig")
        target = address or reply.get("server")
        if not isinstance(text, str) or not text:
            raise KairosError("the node answered without a kubeconfig")
        if not target:
            raise KairosError("no master address is known yet (pass --address)")
        try:
            click.echo(rewrite_kubeconfig(text, str(target)), nl=False)
        except KubeconfigError as exc:
            raise KairosError(f"the kubeconfig is unusable: {exc}") from None
