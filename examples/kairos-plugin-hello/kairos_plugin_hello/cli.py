"""``kairos hello``: the greetings the running node holds, read through its local API.

The command runs in its own process, not in the node: it asks the node over the API's unix
socket (``GET /api/ledger/hello``) and prints what it gets. Hostnames and greetings were written
by peers, so the plain output escapes control characters (``--json`` output is escaped by JSON).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kairos_core.plugin import APIClient, emit_json, json_option, pass_context, socket_option

from .plugin import BUCKET, greetings


def printable(text: object) -> str:
    """``text`` with every character that is not printable escaped (``\\x1b``, ``\\n``, ``\\u202e``),
    so a peer's string can neither move the cursor nor fake a line."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(text))


def add_commands(cli: click.Group) -> None:
    """Add ``hello`` to the root ``kairos`` group."""

    @cli.command("hello")
    @socket_option
    @json_option
    @pass_context
    def hello(context: Any, socket_path: str | None, as_json: bool) -> None:
        """Print the greeting of every node (bucket hello) that the running node knows."""
        socket = Path(socket_path) if socket_path else context.load_config().api_socket
        found = greetings(APIClient(socket).request("GET", f"/api/ledger/{BUCKET}"))
        if as_json:
            emit_json(found)
            return
        if not found:
            print("no greetings yet")
            return
        for peer_id, entry in sorted(found.items(), key=lambda item: (item[1]["hostname"], item[0])):
            print(f"{printable(entry['hostname'])}: {printable(entry['greeting'])} ({printable(peer_id)})")
