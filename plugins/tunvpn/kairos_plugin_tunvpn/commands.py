"""``kairos vpn status``: this node's VIP, the peer table and the data-plane counters.

Read from the node's local API: ``/api/status`` (peer id, ``vpn_*`` counters), the ``vpn`` bucket
(every node's claim, and this node's ``<peer_id>/links`` with the path to each peer) and
``/api/peers`` (hostnames, liveness).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import click
from kairos_core.plugin import APIClient, emit_json, json_option, pass_context, socket_option

from .addressing import holders, read_claims


def collect_status(client: APIClient) -> dict[str, Any]:
    """Everything ``kairos vpn status`` shows, as one JSON-able dict."""
    status = client.request("GET", "/api/status")
    me = status["peer_id"]
    items = client.request("GET", "/api/ledger/vpn")
    peers = {row["peer_id"]: row for row in client.request("GET", "/api/peers")}
    links = items.get(f"{me}/links") or {}
    # the CLI may not know the node's CIDR: any IPv4 address is shown
    claims = read_claims(items, ipaddress.IPv4Network("0.0.0.0/0"))
    winners = {c.peer_id for c in holders(claims.values()).values()}
    own = items.get(me) if isinstance(items.get(me), dict) else None
    table = []
    for peer_id, claim in sorted(claims.items(), key=lambda kv: int(kv[1].vip)):
        if peer_id == me:
            continue
        link = links.get(peer_id) if isinstance(links, dict) else None
        row = peers.get(peer_id, {})
        table.append(
            {
                "peer_id": peer_id,
                "hostname": row.get("hostname"),
                "vip": str(claim.vip) if peer_id in winners else None,
                "alive": bool(row.get("alive")),
                "path": link.get("path") if isinstance(link, dict) else None,
                "endpoint": link.get("endpoint") if isinstance(link, dict) else None,
            }
        )
    counters = {k[4:]: v for k, v in status["counters"].items() if k.startswith("vpn_")}
    return {
        "peer_id": me,
        "vip": own.get("vip") if own else None,
        "holds_vip": me in winners,
        "udp_port": own.get("udp_port") if own else None,
        "running": bool(counters),
        "peers": table,
        "counters": counters,
    }


@click.group("vpn")
def vpn_group() -> None:
    """The VPN between the nodes (tunvpn plugin)."""


@vpn_group.command("status")
@socket_option
@json_option
@pass_context
def vpn_status(context: Any, socket_path: str | None, as_json: bool) -> None:
    """Show this node's VIP, each peer's VIP and path (direct, punched, relay via <peer>, stream), and the VPN counters."""
    client = APIClient(Path(socket_path)) if socket_path else APIClient(context.load_config().api_socket)
    data = collect_status(client)
    if as_json:
        emit_json(data)
        return
    if not data["vip"]:
        click.echo("vpn:      not running on this node")
    else:
        held = "" if data["holds_vip"] else " (contested: moving)"
        click.echo(f"vip:      {data['vip']}{held}  udp port {data['udp_port']}")
    width = max([7, *(len(str(row["path"] or "-")) for row in data["peers"])])
    click.echo(f"{'PEER':<54} {'HOSTNAME':<14} {'VIP':<16} {'PATH':<{width}} ENDPOINT")
    for row in data["peers"]:
        click.echo(
            f"{row['peer_id']:<54} {str(row['hostname'] or '-'):<14} {str(row['vip'] or '-'):<16} "
            f"{str(row['path'] or '-'):<{width}} {row['endpoint'] or '-'}"
        )
    c = data["counters"]
    if c:
        click.echo(
            f"packets:  tx {c.get('tx_packets', 0)}  rx {c.get('rx_packets', 0)}  "
            f"via stream out {c.get('fallback_datagrams_sent', 0)} in {c.get('fallback_datagrams_delivered', 0)}"
        )
        if "fastpath" in c:
            click.echo("sealing:  " + ("in C (_fastpath)" if c["fastpath"] else "pure Python (C fast path not built or off)"))
        dropped = {k: v for k, v in c.items() if v and k.startswith("drop_")}
        for name, value in sorted(dropped.items()):
            click.echo(f"dropped:  {name} {value}")
