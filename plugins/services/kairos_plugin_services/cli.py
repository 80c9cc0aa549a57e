"""``kairos service …``: expose, connect and list services through the running node's local API
(``/api/plugins/services``; the node does the work, the command only asks)."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import click
from kairos_core.plugin import escape_control, json_option, pass_context, socket_option

from .plugin import ROUTE


@click.group("service")
def service_group() -> None:
    """TCP and UDP services carried between the nodes (services plugin)."""


@service_group.command("expose")
@click.argument("name")
@click.option("--to", "to", required=True, metavar="HOST:PORT", help="Where this node reaches the service.")
@click.option("--udp", is_flag=True, help="A UDP service (default TCP).")
@click.option("--description", default="", help="A few words for `kairos service list`.")
@socket_option
@json_option
@pass_context
def expose(context: Any, name: str, to: str, udp: bool, description: str, socket_path: str | None, as_json: bool) -> None:
    """Expose NAME: connections other nodes open to NAME reach HOST:PORT from this node."""
    body = {"name": name, "to": to, "protocol": "udp" if udp else "tcp", "description": description}
    ROUTE.ask(
        context,
        socket_path,
        as_json,
        "POST",
        "/expose",
        body,
        lambda done: f"exposing {done['protocol']} service {done['name']} -> {done['to']}",
    )


@service_group.command("unexpose")
@click.argument("name")
@socket_option
@json_option
@pass_context
def unexpose(context: Any, name: str, socket_path: str | None, as_json: bool) -> None:
    """Stop exposing NAME from this node (connections under way go on)."""
    ROUTE.ask(
        context,
        socket_path,
        as_json,
        "DELETE",
        f"/expose/{quote(name, safe='')}",
        None,
        lambda done: f"no longer exposing {done['name']}",
    )


@service_group.command("connect")
@click.argument("name")
@click.option("--listen", required=True, metavar="ADDR:PORT", help="Where this node listens (port 0: any free one).")
@click.option("--udp", "protocol", flag_value="udp", default=None, help="A UDP service.")
@click.option("--tcp", "protocol", flag_value="tcp", help="A TCP service (the default, unless the ledger says UDP).")
@socket_option
@json_option
@pass_context
def connect(context: Any, name: str, listen: str, protocol: str | None, socket_path: str | None, as_json: bool) -> None:
    """Listen on ADDR:PORT on this node; each connection there is carried to a live node exposing NAME."""
    ROUTE.ask(
        context,
        socket_path,
        as_json,
        "POST",
        "/connect",
        {"name": name, "listen": listen, "protocol": protocol},
        lambda done: f"listening on {done['listen']} ({done['protocol']}) for service {done['name']}",
    )


@service_group.command("disconnect")
@click.argument("name")
@socket_option
@json_option
@pass_context
def disconnect(context: Any, name: str, socket_path: str | None, as_json: bool) -> None:
    """Close this node's listener for NAME."""
    ROUTE.ask(
        context,
        socket_path,
        as_json,
        "DELETE",
        f"/connect/{quote(name, safe='')}",
        None,
        lambda done: f"closed the listener {done['listen']} for {done['name']}",
    )


@service_group.command("list")
@socket_option
@json_option
@pass_context
def list_services(context: Any, socket_path: str | None, as_json: bool) -> None:
    """Every service in the ledger (name, owner, protocol, description, whether the owner is alive),
    and what this node exposes and listens for."""
    data = ROUTE.ask(context, socket_path, as_json, "GET")
    if as_json:
        return
    if not data["services"]:
        click.echo("no services")
    else:
        click.echo(f"{'NAME':<24} {'PROTO':<5} {'OWNER':<54} {'ALIVE':<5} DESCRIPTION")
        for row in data["services"]:
            click.echo(
                f"{escape_control(row['name']):<24} {row['protocol']:<5} {escape_control(row['owner']):<54} "
                f"{'yes' if row['alive'] else 'no':<5} {escape_control(row['description'])}"
            )
    for row in data["exposed"]:
        click.echo(f"exposed here: {row['name']} ({row['protocol']}) -> {row['to']}")
    for row in data["connected"]:
        click.echo(f"listening here: {row['listen']} ({row['protocol']}) -> {row['name']}, {row['active']} active")
