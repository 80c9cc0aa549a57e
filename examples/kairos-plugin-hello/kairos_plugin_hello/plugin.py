"""The hooks of kairos-plugin-hello: every node greets the network.

- Config section ``hello`` with one option, ``greeting`` (default ``"hello"``), declared once in
  :data:`SCHEMA` with its type and help.
- Ledger bucket ``hello``, owner-keyed: each node writes ``{"hostname", "greeting"}`` under its
  own peer id at start-up, and nobody can write in another node's name.
- Counter ``hello_greetings_seen``: greetings this node received from other nodes.
- Stream protocol ``/kairos/hello/1.0.0``: the serving node answers one frame, its hostname
  (counter ``hello_answered``); :func:`ask_hostname` is the other end.
- Command ``kairos hello`` (see :mod:`kairos_plugin_hello.cli`).

The module keeps no state of its own: everything lives in the node it is given (its ledger,
its counters), so one process may run several nodes with this plugin, as the tests do.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping
from typing import Any

from kairos_core.plugin import (
    OWNER_KEYED,
    KairosError,
    LedgerUpdate,
    NodeView,
    Option,
    Section,
    Stream,
    WritePolicy,
    hookimpl,
)

SECTION = "hello"
BUCKET = "hello"
PROTOCOL = "/kairos/hello/1.0.0"
#: Longest greeting the config accepts, in characters.
MAX_GREETING = 200
#: Largest answer :func:`ask_hostname` reads, in bytes (a DNS name has at most 253).
MAX_ANSWER = 1024


# --- configuration --------------------------------------------------------------------------


#: Section ``hello``: every option once, with its type, default and help.
SCHEMA = Section(
    SECTION,
    Option(
        "greeting",
        str,
        "hello",
        f"What this node tells the network at start-up: one line of printable text, at most {MAX_GREETING} characters.",
    ),
    help="kairos-plugin-hello: every node greets the network (bucket hello, kairos hello).",
    aliases=("p2p.hello",),  # Kairos users write plugin sections under p2p:
)


@hookimpl
def kairos_config_schema() -> list[Section]:
    """Section ``hello``: the core checks types and fills defaults from it, ``kairos config
    defaults`` prints its help."""
    return [SCHEMA]


@hookimpl
def kairos_config_problems(config: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What a type cannot say: the greeting is one short line of printable text."""
    greeting = config[SECTION]["greeting"]
    if not greeting.strip():
        return ["hello.greeting: must not be empty"]
    if len(greeting) > MAX_GREETING:
        return [f"hello.greeting: at most {MAX_GREETING} characters, got {len(greeting)}"]
    if not greeting.isprintable():
        return ["hello.greeting: must be printable text on one line"]
    return []


# --- the ledger -----------------------------------------------------------------------------


@hookimpl
def kairos_ledger_policies() -> Mapping[str, WritePolicy]:
    """Bucket ``hello`` is owner-keyed: a node writes the key ``<its peer id>`` (or keys under
    ``<its peer id>/``) only. Registered before any entry is loaded or merged, so no forged
    greeting is ever accepted, on any node."""
    return {BUCKET: OWNER_KEYED}


def greeting_of(key: str, value: Any) -> dict[str, str] | None:
    """The greeting stored under ``key``, or None when the entry is not one.

    The policy guarantees who wrote a key, not what its value holds: any node with the token can
    write any JSON under its own id. Readers check the shape, and take only the top-level key
    (``<peer id>``, which then is its writer's).
    """
    if "/" in key or not isinstance(value, dict):
        return None
    hostname, greeting = value.get("hostname"), value.get("greeting")
    if not isinstance(hostname, str) or not isinstance(greeting, str):
        return None
    return {"hostname": hostname, "greeting": greeting}


def greetings(items: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Peer id → greeting, for the items of bucket ``hello`` (``node.ledger.items("hello")`` or the
    local API's ``GET /api/ledger/hello``); malformed entries are left out."""
    found = {}
    for key, value in items.items():
        greeting = greeting_of(key, value)
        if greeting is not None:
            found[key] = greeting
    return found


# --- the node's life ------------------------------------------------------------------------


@hookimpl
def kairos_startup(node: NodeView) -> None:
    """Greet the network and start answering ``/kairos/hello/1.0.0``.

    Synchronous and quick: a ledger write and a handler registration. The write is gossiped at
    once to the connected peers; nodes that join later get it through anti-entropy.
    """
    node.ledger.set(BUCKET, node.peer_id, {"hostname": node.hostname, "greeting": node.config[SECTION]["greeting"]})
    node.serve(PROTOCOL, functools.partial(_answer, node))


@hookimpl
def on_ledger_update(node: NodeView, update: LedgerUpdate) -> None:
    """Count each greeting from another node (our own write arrives here too, as ``local``)."""
    if update.bucket != BUCKET or update.local or update.deleted:
        return
    if greeting_of(update.key, update.value) is not None:
        node.count("hello_greetings_seen")


# --- the stream protocol --------------------------------------------------------------------


async def _answer(node: NodeView, stream: Stream) -> None:
    """Serve one ``/kairos/hello/1.0.0`` stream: one frame, this node's hostname, then close.

    Only admitted peers reach a handler. If this coroutine raised, the core would log it and
    reset the stream; it does not close the stream for us when we return.
    """
    try:
        await stream.write_frame(node.hostname.encode())
    finally:
        await stream.close()
    node.count("hello_answered")


async def ask_hostname(node: NodeView, peer_id: str, timeout: float = 5.0) -> str:
    """Ask the member ``peer_id`` for its hostname over ``/kairos/hello/1.0.0`` (the node dials
    it first when it is not a neighbour).

    Raises :class:`KairosError` when the peer cannot be reached, the stream breaks or the peer
    closes without an answer, and :class:`TimeoutError` after ``timeout`` seconds. The answer
    is the peer's own word: untrusted text (escape it before printing it).
    """

    async def exchange() -> bytes:
        stream = await node.open_stream(peer_id, PROTOCOL)
        try:
            answer = await stream.read_frame(MAX_ANSWER)
        except BaseException:  # a broken stream, an oversized frame, our own timeout
            await stream.reset()
            raise
        await stream.close()
        return answer

    answer = await asyncio.wait_for(exchange(), timeout)
    if not answer:
        raise KairosError(f"{peer_id} closed {PROTOCOL} without answering")
    return answer.decode("utf-8", "replace")


# --- the command line -----------------------------------------------------------------------


@hookimpl
def kairos_cli_commands(cli: Any) -> None:
    """Add ``kairos hello``."""
    from .cli import add_commands  # here, not at the top: .cli imports this module

    add_commands(cli)
