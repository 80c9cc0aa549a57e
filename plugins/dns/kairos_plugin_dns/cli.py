"""``kairos dns …``: add, remove and list the records of the ``dns`` bucket through the running
node's local API (``/api/plugins/dns``; the node writes the ledger, the command only asks)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from kairos_core.plugin import APIClient, emit_json, json_option, pass_context, socket_option

ROUTE = "/api/plugins/dns"


def _request(context: Any, socket_path: str | None, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    client = APIClient(Path(socket_path) if socket_path else context.load_config().api_socket)
    return client.request(method, f"{ROUTE}{path}", content=json.dumps(body) if body is not None else None)


def _printable(text: Any) -> str:
    """Text from the ledger (any member wrote it) with control characters escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


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
    done = _request(context, socket_path, "POST", "/add", {"name": name, "type": rtype, "value": value, "ttl": ttl})
    if as_json:
        emit_json(done)
    else:
        click.echo(f"{done['name']} {done['ttl']} {done['type']} {' '.join(done['values'])}")


@dns_group.command("rm")
@click.argument("name")
@click.argument("rtype", metavar="[TYPE]", required=False, type=click.Choice(["A", "AAAA", "TXT"], case_sensitive=False))
@click.argument("value", required=False)
@socket_option
@json_option
@pass_context
def remove(context: Any, name: str, rtype: str | None, value: str | None, socket_path: str | None, as_json: bool) -> None:
    """Remove NAME's records: every type, one TYPE, or one VALUE of it."""
    done = _request(context, socket_path, "POST", "/rm", {"name": name, "type": rtype, "value": value})
    if as_json:
        emit_json(done)
    else:
        click.echo(f"removed {done['name']} {' '.join(done['removed'])}")


@dns_group.command("list")
@socket_option
@json_option
@pass_context
def list_records(context: Any, socket_path: str | None, as_json: bool) -> None:
    """Every record in the ledger, and where this node's server listens."""
    data = _request(context, socket_path, "GET", "")
    if as_json:
        emit_json(data)
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
        click.echo(f"{_printable(row['name']):<40} {row['ttl']:>6} {row['type']:<5} {_printable(' '.join(row['values']))}")
