"""The public API for plugins: the one module of the core a plugin imports.

Everything a plugin may rely on is named here, and only here; the rest of ``kairos_core`` is the
core's own business and may change under a plugin. A test walks the imports of every shipped
plugin and fails on any other ``kairos_core`` module.

- **Markers:** :data:`hookimpl` (implement a hook), :data:`hookspec` (declare hooks of your own
  for other plugins, from ``kairos_add_hookspecs``).
- **The node**, as hooks receive it: :class:`NodeView` — identity, config sections, the ledger
  (:class:`LedgerView`), members, the leader and its epoch, streams by protocol id, counters,
  tasks bound to the node's life, and calls into other plugins' hooks (:meth:`NodeView.call_hook`,
  first-result or all results).
- **Metrics** a plugin declares (:meth:`NodeView.counter`, :meth:`NodeView.gauge`): :class:`Metric`.
- **Records:** :class:`PeerEvent`, :class:`LedgerUpdate`, :class:`Entry`, :class:`Stream`.
- **Ledger policies** a plugin registers for its buckets (``kairos_ledger_policies``):
  :class:`WritePolicy`, :data:`OPEN`, :data:`OWNER_KEYED`; :class:`OpenPolicy` to subclass for an
  open bucket that checks shapes (its entries count against the open buckets' per-owner quotas).
- **Config schema** a plugin declares its sections with (``kairos_config_schema``) and reads
  them back typed: :class:`Section`, :class:`Option`; :class:`ConfigError` when values do not fit.
- **Rate limits:** :class:`TokenBucket`, and :class:`TokenBuckets` (one per key, bounded): what
  one peer or source may cost the node.
- **Addresses:** :func:`multiaddr_ip`, the IP address of a multiaddr a member advertises.
- **Errors:** :class:`KairosError` (a one-line error for the user), :class:`LedgerError`,
  :class:`ConfigError`.
- **CLI helpers** for ``kairos_cli_commands``: :func:`pass_context`, :func:`socket_option`,
  :func:`json_option`, :func:`emit_json`, :class:`APIClient`; :class:`PluginRoute`, a plugin's
  local-API route from both sides (served in ``kairos_api_routes``, called by its commands);
  :func:`cli_commands_hook` (a ``kairos_cli_commands`` that adds a plugin's click commands);
  :func:`escape_control` for text from peers on a terminal.

Names of the core's own buckets and protocols are in :data:`CORE_BUCKETS` and
:data:`CORE_PROTOCOLS`; a plugin registers its own and never writes to the core's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .api import APIClient
from .cli import PluginRoute, cli_commands_hook, emit_json, json_option, pass_context, socket_option
from .errors import ConfigError, KairosError
from .events import LedgerUpdate, PeerEvent
from .hookspecs import hookspec
from .ledger import OPEN, OWNER_KEYED, LedgerError, OpenPolicy, WritePolicy
from .ledger.entry import Entry
from .metrics import Metric
from .multiaddrs import host_ip as multiaddr_ip
from .plugins import hookimpl
from .ratelimit import TokenBucket, TokenBuckets
from .schema import SKIP, Alias, Option, Section, text_list, text_value
from .untrusted import escape_control

__all__ = [
    "Alias",
    "APIClient",
    "CORE_BUCKETS",
    "CORE_PROTOCOLS",
    "ConfigError",
    "Entry",
    "KairosError",
    "LedgerError",
    "LedgerUpdate",
    "LedgerView",
    "Metric",
    "NodeView",
    "OPEN",
    "OWNER_KEYED",
    "OpenPolicy",
    "Option",
    "PeerEvent",
    "PluginRoute",
    "SKIP",
    "Section",
    "Stream",
    "StreamHandler",
    "TokenBucket",
    "TokenBuckets",
    "WritePolicy",
    "cli_commands_hook",
    "emit_json",
    "escape_control",
    "hookimpl",
    "hookspec",
    "json_option",
    "pass_context",
    "multiaddr_ip",
    "socket_option",
    "text_list",
    "text_value",
]

#: Buckets the core writes; plugins read them, never write them.
CORE_BUCKETS = {
    "nodes": "each node's advertisement and heartbeat (owner-keyed)",
    "leader": "leader leases, one key per epoch and claimant",
    "revoked": "revocations: peers refused for good, written by the leader of the epoch",
    "rotation": "network-token rotations, the new token sealed to each member by the leader",
}
#: Protocols the core serves; a plugin's protocol ids must differ (``/kairos/<plugin>/…``).
CORE_PROTOCOLS = {
    "/kairos/admit/1.0.0": "admission",
    "/kairos/sync/1.1.0": "ledger anti-entropy",
    "/kairos/sync/1.0.0": "ledger anti-entropy (kairos-core 0.1.0 peers)",
}


@runtime_checkable
class Stream(Protocol):
    """A stream to one admitted peer, opened by :meth:`NodeView.open_stream` or served by
    :meth:`NodeView.serve`. Frames are length-prefixed messages; ``b""`` means the peer closed."""

    peer_id: str
    protocol: str

    async def read_frame(self, max_size: int) -> bytes:
        """The next frame (at most ``max_size`` bytes, else an error), ``b""`` at the end."""
        ...

    async def write_frame(self, data: bytes) -> None:
        """Send one frame."""
        ...

    async def read(self, n: int = 65536) -> bytes:
        """Up to ``n`` raw bytes; ``b""`` at the end."""
        ...

    async def write(self, data: bytes) -> None:
        """Send raw bytes."""
        ...

    async def close(self) -> None:
        """Close our side; the peer reads the end."""
        ...

    async def reset(self) -> None:
        """Abort the stream both ways."""
        ...


StreamHandler = Callable[[Stream], Awaitable[None]]


class LedgerView(Protocol):
    """The node's ledger as plugins use it. Writes are signed as this node and gossiped at once;
    a write the bucket's policy refuses raises :class:`LedgerError`."""

    def get(self, bucket: str, key: str) -> Any:
        """The live value of ``bucket/key``, or None."""
        ...

    def get_entry(self, bucket: str, key: str) -> Entry | None:
        """The entry (value, owner, version, tombstone flag), or None."""
        ...

    def items(self, bucket: str) -> dict[str, Any]:
        """Every live ``key → value`` of ``bucket``."""
        ...

    def set(self, bucket: str, key: str, value: Any) -> Entry:
        """Write ``value`` (JSON-serialisable, size- and depth-capped)."""
        ...

    def delete(self, bucket: str, key: str) -> Entry:
        """Write a tombstone."""
        ...

    def watch(self, bucket: str | None = None) -> AsyncIterator[LedgerUpdate]:
        """Every later change (of ``bucket``, or all), in order."""
        ...


class NodeView(Protocol):
    """The node as every hook receives it (``node``): the whole contract of a plugin with the core.

    Attributes are read-only for plugins.
    """

    #: this node's libp2p peer id, ``12D3KooW…``
    peer_id: str
    #: the hostname it advertises
    hostname: str
    #: ``p2p.network_id``: the cluster's namespace inside the network (several may share a token)
    network_id: str

    @property
    def config(self) -> Mapping[str, Mapping[str, Any]]:
        """The validated config: a mapping of section name → that section's values (every default
        filled in), plugin sections included (``node.config["vpn"]["cidr"]``). Read-only all the
        way down: sections and the mappings in them are read-only mappings, lists are tuples."""
        ...

    @property
    def api_socket(self) -> Path | None:
        """The unix socket of the node's local API (config ``api.socket``; by default in the state
        dir), or None when ``api.enable`` is false. A plugin whose CLI command talks to a control
        socket of its own serves it beside this one (k3s does, for ``kairos get-kubeconfig``)."""
        ...

    @property
    def ledger(self) -> LedgerView:
        """The shared ledger."""
        ...

    @property
    def leader(self) -> tuple[str, int] | None:
        """``(peer_id, epoch)`` of the leader this node knows, or None. The epoch is a fencing
        token: act on shared state only with it, and refuse older epochs than you have seen."""
        ...

    @property
    def is_leader(self) -> bool:
        """Whether this node leads now (False at once when it loses its majority)."""
        ...

    def members(self) -> dict[str, dict[str, Any]]:
        """Alive peers (not this node), each with its ``nodes`` entry."""
        ...

    def neighbours(self) -> set[str]:
        """Peers connected to this node now that passed admission (streams can be opened to them)."""
        ...

    def rtt(self, peer_id: str) -> float | None:
        """The smoothed round-trip time to ``peer_id`` in seconds, or None when it is not an
        admitted peer connected now or not measured yet (the first value ~0.5 s after the
        connection is up, then refreshed every 30 s; through a relay: the whole path). Measured by
        the pings the connection sends anyway, so reading it costs nothing."""
        ...

    def addresses(self) -> list[str]:
        """The multiaddrs this node is reachable at now (``/ip4/…/tcp/…/p2p/<id>``, wildcards
        expanded to the interfaces' addresses), as it advertises them in ``nodes``; empty while
        it is not running. For a plugin that needs the node's own IP (k3s without a VPN)."""
        ...

    def lease_holder(self, epoch: int) -> str | None:
        """The leader of ``epoch`` as the members attest it, or None: who may speak for that epoch
        (e.g. a role assignment fenced by it). A lease alone proves nothing — a token holder can
        sign one for an identity it made up — so the answer is the leader this node announced for
        that epoch (recorded in its own entry, kept across restarts), else the winning lease among
        those the election counts, else what the vouched-for members recorded. Works from
        ``kairos_startup`` on (then from the records only)."""
        ...

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        """Open ``protocol`` to a member: over the connection to it, dialled first (at the
        addresses it advertises) when it is not a neighbour — a node keeps a bounded number of
        connections (``p2p.connections``). :class:`KairosError` when it cannot."""
        ...

    def protect(self, peer_id: str, tag: str) -> None:
        """Keep the connection to ``peer_id`` open while ``tag`` (your feature's name) needs it;
        the connection manager closes extra connections above ``p2p.connections.high`` otherwise."""
        ...

    def unprotect(self, peer_id: str, tag: str) -> None:
        """``tag`` no longer needs the connection to ``peer_id``."""
        ...

    def serve(self, protocol: str, handler: StreamHandler) -> None:
        """Serve ``protocol`` to admitted peers: ``handler(stream)`` runs per stream; a raising
        handler is logged and its stream reset."""
        ...

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (shown by ``kairos status``; prefix it with your plugin)."""
        ...

    def set_counters(self, prefix: str, values: Mapping[str, int]) -> None:
        """Publish a plugin's own counters as ``<prefix>_<name>`` (replacing the earlier values)."""
        ...

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Metric:
        """Declare a counter: exported as ``kairos_<name>_total`` with ``help`` on ``/metrics``.
        Without labels it is the counter ``name`` of ``count`` and ``kairos status``."""
        ...

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> Metric:
        """Declare a gauge: exported as ``kairos_<name>`` with ``help`` on ``/metrics``."""
        ...

    def set_state(self, plugin: str, text: str | None) -> None:
        """Say what ``plugin`` (your plugin's name) waits for, in a few words ("waiting for a
        role"); ``kairos status`` shows it. None clears it once the plugin runs as it should."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` for the node's lifetime: cancelled at shutdown, a failure is logged."""
        ...

    def clock_version(self) -> tuple[int, int]:
        """A fresh hybrid-logical-clock reading ``(wall_ms, counter)``: later than every version
        this node has seen, so it orders claims network-wide."""
        ...

    async def call_hook(self, name: str, *, firstresult: bool = False, **kwargs: Any) -> Any:
        """Call hook ``name`` of every plugin (other plugins' hookspecs included) with ``node`` and
        ``kwargs``. Returns the list of non-None results, or with ``firstresult`` the first one
        (None when nobody answered). A plugin that fails is logged and skipped."""
        ...
