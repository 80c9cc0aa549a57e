"""``kairos get-kubeconfig``: the cluster's admin kubeconfig, pointed at a reachable address."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import click

from kairos_core.errors import KairosError

from .cluster_state import KUBECONFIG_KEY, MASTER_IP_KEY
from .kubeconfig import KubeconfigError, rewrite_kubeconfig


def add_commands(cli: click.Group) -> None:
    """Add ``get-kubeconfig`` to the ``kairos`` command."""
    from kairos_core.api import APIClient
    from kairos_core.cli import pass_context, socket_option

    @cli.command("get-kubeconfig")
    @socket_option
    @click.option("--network-id", metavar="ID", help="The cluster's network id (default: p2p.network_id of the config).")
    @click.option("--address", metavar="IP", help="Point the kubeconfig at this address instead of ip-master.")
    @pass_context
    def get_kubeconfig(context, socket_path: str | None, network_id: str | None, address: str | None) -> None:
        """Print the k3s kubeconfig, with the server set to the master's VPN address or the EIP.

        Reads the ledger through the local node's API: run it on any node of the network.
        """
        config = None
        if not socket_path or not network_id:
            config = context.load_config()
        client = APIClient(Path(socket_path) if socket_path else config.api_socket)
        bucket = network_id or config["p2p"]["network_id"]
        text = _value(client, bucket, KUBECONFIG_KEY)
        if text is None:
            raise KairosError(f"no kubeconfig in the ledger yet ({bucket}/{KUBECONFIG_KEY}): the master has not published it")
        target = address or _value(client, bucket, MASTER_IP_KEY)
        if target is None:
            raise KairosError(f"no master address in the ledger yet ({bucket}/{MASTER_IP_KEY})")
        try:
            click.echo(rewrite_kubeconfig(text, target), nl=False)
        except KubeconfigError as exc:
            raise KairosError(f"the published kubeconfig is unusable: {exc}") from None


def _value(client, bucket: str, key: str) -> str | None:
    try:
        entry = client.request("GET", f"/api/ledger/{quote(bucket, safe='')}/{quote(key, safe='')}")
    except KairosError as exc:
        if str(exc).startswith("no key"):
            return None
        raise
    value = entry.get("value") if isinstance(entry, dict) else None
    return value if isinstance(value, str) and value else None
