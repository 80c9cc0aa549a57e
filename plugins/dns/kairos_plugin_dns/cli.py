"""``kairos dns …``: add, remove and list the records of the ``dns`` bucket through the running
node's local API (``/api/plugins/dns``; the node writes the ledger, the command only asks)."""

from __future__ import annotations

from typing import Any

import click
from kairos_core.plugin import escape_control, json_option, pass_context, socket_option

from .plugin import ROUTE


@click.group("dns")
def dns_group() -> None:
    """Names served by the DNS plugin: records in the ledger, shared by every node."""


@dns_group.command("add")
@click.argument("name")
@click.argument("rtype", metavar="TYPE", type=click.Choice(["A", "AAAA", "TXT"], case_sensitive=False))
@click.argument("value")
@click.option("--ttl", type=click.IntRange(0, 86400), default=None, help="Seconds (default: dns.ttl).")
@socket_option
@json_option
@pass_context
def add(context: Any, name: str, rtype: str, value: str, ttl: int | None, socket_path: str | None, as_json: bool) -> None:
    """Add VALUE to the TYPE record of NAME (one label gets the domain: web -> web.kairos.; *.apps
    a wildcard)."""
    body = {"name": name, "type": rtype, "value": value, "ttl": ttl}
    ROUTE.ask(
        context,
        socket_path,
        as_json,
        "POST",
        "/add",
        body,
        lambda done: f"{done['name']} {done['ttl']} {done['type']} {' '.join(done['values'])}",
    )


@dns_group.command("rm")
@click.argument("name")
@click.argument("rtype", metavar="[TYPE]", required=False, type=click.Choice(["A", "AAAA", "TXT"], case_sensitive=False))
@click.argument("value", required=False)
@socket_option
@json_option
@pass_context
def remove(context: Any, name: str, rtype: str | None, value: str | None, socket_path: str | None, as_json: bool) -> None:
    """Remove NAME's records: every type, one TYPE, or one VALUE of it."""
    body = {"name": name, "type": rtype, "value": value}
    ROUTE.ask(
        context, socket_path, as_json, "POST", "/rm", body, lambda done: f"removed {done['name']} {' '.join(done['removed'])}"
    )


@dns_group.command("list")
@socket_option
@json_option
@pass_context
def list_records(context: Any, socket_path: str | None, as_json: bool) -> None:
    """Every record in the ledger, and where this node's server listens."""
    data = ROUTE.ask(context, socket_path, as_json, "GET")
    if as_json:
        return
    server = data["server"]
    click.echo(
        f"server: {server['listen']} (domain {data['domain']}, upstreams {', '.join(server['upstreams']) or 'none'})"
        if server
        else f"server: off (dns.enable; domain {data['domain']})"
    )
    if not data["records"]:
        click.echo("no records")
    for row in data["records"]:
        click.echo(
            f"{escape_control(row['name']):<40} {row['ttl']:>6} {row['type']:<5} {escape_control(' '.join(row['values']))}"
        )
