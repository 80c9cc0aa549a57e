"""One fast fake of the node a plugin receives: :class:`FakeNode`, a :class:`~kairos_core.plugin.NodeView`.

For unit tests of plugins and of what reads a node (the local API, the CLI): no host, no socket,
no election. What it holds is real where that is cheap — a real :class:`~kairos_core.ledger.Ledger`
(signed entries, bucket policies, quotas, ``watch``) over an in-memory sqlite store, a config
validated by the core's schema, the core's metric registry — and set by the test where a network
would decide it (members, neighbours, the leader and its epoch, addresses). Streams between fakes
joined with :meth:`FakeNode.link` are in-memory pipes, framed as the real ones are.

Everything a plugin does through it is recorded for the test to assert on: ``opened`` (streams),
``handlers`` (served protocols), ``protected``, ``counters``, ``states``, ``tasks``.

``tests/test_fakenode.py`` checks that every member of ``NodeView`` is here with a compatible
signature, and mypy checks the same statically (:func:`_is_a_node_view`), so the two cannot drift.
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any, cast

from kairos_core import __version__
from kairos_core.config import CORE_SCHEMA, Config
from kairos_core.errors import ConfigError, KairosError
from kairos_core.identity import Identity
from kairos_core.ledger import Ledger, LedgerStore, PolicyRegistry, WritePolicy, ledger_fingerprint
from kairos_core.ledger.clock import HybridLogicalClock
from kairos_core.ledger.policy import DEFAULT_POLICIES
from kairos_core.metrics import Metric, MetricRegistry
from kairos_core.plugin import LedgerView, NodeView, Stream, StreamHandler
from kairos_core.plugins import KairosPluginManager, call_hook
from kairos_core.schema import Section

__all__ = ["FakeMembership", "FakeNode", "MemoryStream"]

_FRAME_HEADER = struct.Struct(">I")  # as kairos_core.p2p.stream frames them


class MemoryStream:
    """One end of an in-memory stream (a :class:`~kairos_core.plugin.Stream`)."""

    def __init__(self, peer_id: str, protocol: str) -> None:
        self.peer_id = peer_id
        self.protocol = protocol
        self._inbox = bytearray()
        self._ended = False
        self._reset = False
        self._readable = asyncio.Event()
        self.other: MemoryStream | None = None

    @classmethod
    def pair(cls, a: str, b: str, protocol: str) -> tuple[MemoryStream, MemoryStream]:
        """Two joined ends: the first held by ``a`` (its peer is ``b``), the second by ``b``."""
        first, second = cls(b, protocol), cls(a, protocol)
        first.other, second.other = second, first
        return first, second

    async def read(self, n: int = 65536) -> bytes:
        while not self._inbox and not self._ended:
            self._readable.clear()
            await self._readable.wait()
        if self._reset:
            raise KairosError("stream reset")
        data = bytes(self._inbox[:n])
        del self._inbox[:n]
        return data

    async def _read_exactly(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = await self.read(n - len(data))
            if not chunk:
                raise KairosError("stream ended inside a frame")
            data += chunk
        return data

    async def read_frame(self, max_size: int) -> bytes:
        header = await self.read(_FRAME_HEADER.size)
        if not header:
            return b""
        header += await self._read_exactly(_FRAME_HEADER.size - len(header)) if len(header) < _FRAME_HEADER.size else b""
        (size,) = _FRAME_HEADER.unpack(header)
        if size > max_size:
            await self.reset()
            raise KairosError(f"frame of {size} bytes, more than {max_size}")
        return await self._read_exactly(size)

    async def write(self, data: bytes) -> None:
        if self._reset or self.other is None or self.other._ended:
            raise KairosError("stream closed")
        self.other._inbox += data
        self.other._readable.set()

    async def write_frame(self, data: bytes) -> None:
        await self.write(_FRAME_HEADER.pack(len(data)) + data)

    async def close(self) -> None:
        if self.other is not None:
            self.other._ended = True
            self.other._readable.set()

    async def reset(self) -> None:
        for end in (self, self.other):
            if end is not None:
                end._ended = end._reset = True
                end._readable.set()


class FakeMembership:
    """What the local API reads of the membership (``describe``), from the fake's peers."""

    def __init__(self, node: FakeNode) -> None:
        self._node = node

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "peer_id": peer_id,
                "alive": peer["alive"],
                "connected": peer_id in self._node.neighbour_ids,
                "last_seen_s": peer["last_seen_s"],
                **{key: peer["entry"].get(key) for key in ("hostname", "addresses", "version")},
            }
            for peer_id, peer in sorted(self._node.peers.items())
        ]


class FakeNode:
    """An in-memory :class:`~kairos_core.plugin.NodeView` (see the module's docs).

    :param config: raw sections, merged over the core's defaults and ``schema``'s (validated as
        ``kairos run`` validates them; :class:`ConfigError` when they do not fit). A section no
        schema declares is kept as given.
    :param schema: plugin sections (what their ``kairos_config_schema`` returns).
    :param now_ms: the wall clock of the node's hybrid logical clock (the ledger's versions and
        :meth:`clock_version`), for tests that set the time.
    :param policies: bucket policies over the core's own (``nodes``, ``leader``); other buckets are open.
    :param manager: the plugin manager :meth:`call_hook` calls (none: nobody answers).
    """

    def __init__(
        self,
        *,
        identity: Identity | None = None,
        hostname: str = "fake-node",
        network_id: str = "kairos",
        config: Mapping[str, Any] | None = None,
        schema: Iterable[Section] = (),
        now_ms: Callable[[], int] | None = None,
        policies: Mapping[str, WritePolicy] | None = None,
        manager: KairosPluginManager | None = None,
        api_socket: Path | None = None,
    ) -> None:
        self.identity = identity or Identity.generate()
        self.peer_id: str = self.identity.peer_id
        self.hostname: str = hostname
        self.network_id: str = network_id
        self.config: Config = _make_config(config or {}, schema)
        clock = HybridLogicalClock(self.peer_id, now_ms=now_ms) if now_ms else None
        self._ledger = Ledger(
            self.identity, LedgerStore(":memory:"), policies=PolicyRegistry({**DEFAULT_POLICIES, **(policies or {})}), clock=clock
        )
        self.manager = manager
        self._api_socket = api_socket
        #: what the test sets: peer id → {"entry", "alive", "last_seen_s"} (see :meth:`add_peer`)
        self.peers: dict[str, dict[str, Any]] = {}
        #: the peers connected now (what :meth:`neighbours` answers)
        self.neighbour_ids: set[str] = set()
        #: smoothed RTT in seconds per neighbour (what :meth:`rtt` answers for a neighbour)
        self.rtts: dict[str, float] = {}
        #: neighbours reached through a relay (``transport`` in :meth:`describe_peers`)
        self.relayed: set[str] = set()
        #: this node's advertised multiaddrs (what :meth:`addresses` answers)
        self.advertised: list[str] = []
        #: ``(peer_id, epoch)`` of the leader, or None (:meth:`set_leader`)
        self.current_leader: tuple[str, int] | None = None
        #: epoch → leader, as the members attest it (what :meth:`lease_holder` answers)
        self.lease_holders: dict[int, str] = {}
        self.token_fingerprint = "fake"
        self.membership = FakeMembership(self)
        # what a plugin did, for the test to assert on
        self.counters: Counter[str] = Counter()
        # a Counter holds ints; the registry also stores the floats a gauge is set to, as the node's does
        self.metrics = MetricRegistry(cast(MutableMapping[str, float], self.counters))
        self.states: dict[str, str] = {}
        self.handlers: dict[str, StreamHandler] = {}
        self.opened: list[tuple[str, str]] = []
        self.protected: set[tuple[str, str]] = set()
        self.tasks: list[asyncio.Task[Any]] = []
        self._linked: dict[str, FakeNode] = {}

    # --- what the test sets -----------------------------------------------------------------
    def add_peer(
        self, peer_id: str, entry: Mapping[str, Any] | None = None, *, alive: bool = True, last_seen_s: float | None = 1.0
    ) -> None:
        """A member with its ``nodes`` entry (``hostname``, ``addresses``, …); dead ones are known but not members."""
        self.peers[peer_id] = {"entry": dict(entry or {}), "alive": alive, "last_seen_s": last_seen_s}

    def set_leader(self, peer_id: str | None, epoch: int = 1) -> None:
        """Make ``peer_id`` the leader of ``epoch`` (None: no leader); the epoch's lease holder too."""
        self.current_leader = (peer_id, epoch) if peer_id else None
        if peer_id:
            self.lease_holders[epoch] = peer_id

    def link(self, other: FakeNode) -> None:
        """Connect two fakes: members and neighbours of each other, streams between them."""
        for a, b in ((self, other), (other, self)):
            a._linked[b.peer_id] = b
            a.neighbour_ids.add(b.peer_id)
            if b.peer_id not in a.peers:
                a.add_peer(b.peer_id, {"hostname": b.hostname, "addresses": list(b.advertised)})

    async def aclose(self) -> None:
        """Cancel the spawned tasks (as the node's shutdown does) and close the ledger."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self._ledger.close()

    # --- NodeView ---------------------------------------------------------------------------
    @property
    def api_socket(self) -> Path | None:
        return self._api_socket

    @property
    def ledger(self) -> Ledger:
        return self._ledger

    @property
    def leader(self) -> tuple[str, int] | None:
        return self.current_leader

    @property
    def is_leader(self) -> bool:
        return self.current_leader is not None and self.current_leader[0] == self.peer_id

    def members(self) -> dict[str, dict[str, Any]]:
        return {peer_id: dict(peer["entry"]) for peer_id, peer in self.peers.items() if peer["alive"] and peer_id != self.peer_id}

    def neighbours(self) -> set[str]:
        return set(self.neighbour_ids)

    def addresses(self) -> list[str]:
        return list(self.advertised)

    def rtt(self, peer_id: str) -> float | None:
        return self.rtts.get(peer_id) if peer_id in self.neighbour_ids else None

    def describe_peers(self) -> list[dict[str, Any]]:
        """What ``GET /api/peers`` answers: the membership's rows, a neighbour's with its link."""
        rows = self.membership.describe()
        for row in rows:
            connected = row["peer_id"] in self.neighbour_ids
            rtt = self.rtt(row["peer_id"])
            row["transport"] = ("relayed" if row["peer_id"] in self.relayed else "direct") if connected else None
            row["rtt_ms"] = None if rtt is None else round(rtt * 1000, 2)
        return rows

    def lease_holder(self, epoch: int) -> str | None:
        return self.lease_holders.get(epoch)

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        self.opened.append((peer_id, protocol))
        other = self._linked.get(peer_id)
        if other is None:
            raise KairosError(f"{peer_id} is not connected and advertises no address")
        handler = other.handlers.get(protocol)
        if handler is None:
            raise KairosError(f"{peer_id} does not serve {protocol}")
        ours, theirs = MemoryStream.pair(self.peer_id, peer_id, protocol)
        other.spawn(_handle(handler, theirs), f"serve {protocol}")
        return ours

    def protect(self, peer_id: str, tag: str) -> None:
        self.protected.add((peer_id, tag))

    def unprotect(self, peer_id: str, tag: str) -> None:
        self.protected.discard((peer_id, tag))

    def serve(self, protocol: str, handler: StreamHandler) -> None:
        self.handlers[protocol] = handler

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def set_counters(self, prefix: str, values: Mapping[str, int]) -> None:
        for name, value in values.items():
            self.counters[f"{prefix}_{name}"] = value

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Metric:
        return self.metrics.counter(name, help, labels)

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> Metric:
        return self.metrics.gauge(name, help, labels)

    def set_state(self, plugin: str, text: str | None) -> None:
        if text:
            self.states[plugin] = str(text)
        else:
            self.states.pop(plugin, None)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(self._logged(coro), name=name)
        self.tasks.append(task)
        return task

    def clock_version(self) -> tuple[int, int]:
        version = self._ledger.clock.tick()
        return version[0], version[1]

    async def call_hook(self, name: str, *, firstresult: bool = False, **kwargs: Any) -> Any:
        results = list((await call_hook(self.manager, name, node=self, **kwargs)).results) if self.manager else []
        if firstresult:
            return results[0] if results else None
        return results

    # --- what the local API reads besides -----------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The summary ``kairos status`` shows, shaped as the node's."""
        leader = self.current_leader
        counters = Counter(self.counters)
        counters.update({f"ledger_{k}": v for k, v in self._ledger.counters.items()})
        return {
            "peer_id": self.peer_id,
            "hostname": self.hostname,
            "network_id": self.network_id,
            "token_fingerprint": self.token_fingerprint,
            "version": __version__,
            "addresses": list(self.advertised),
            "reachability": None,
            "leader": {"peer_id": leader[0], "epoch": leader[1]} if leader else None,
            "is_leader": self.is_leader,
            "members": len(self.members()),
            "admitted": len(self.neighbour_ids),
            "ledger_entries": len(self._ledger),
            "ledger_fingerprint": ledger_fingerprint(self._ledger),
            "uptime_s": 0,
            "states": dict(sorted(self.states.items())),
            "counters": dict(sorted(counters.items())),
        }

    async def _logged(self, coro: Coroutine[Any, Any, Any]) -> Any:
        try:
            return await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            self.counters["background_errors"] += 1
            return None


async def _handle(handler: StreamHandler, stream: MemoryStream) -> None:
    try:
        await handler(stream)
    except Exception:
        await stream.reset()
        raise


def _make_config(given: Mapping[str, Any], schema: Iterable[Section]) -> Config:
    sections = {section.name: section for section in (*CORE_SCHEMA, *schema)}
    problems: list[str] = []
    data: dict[str, dict[str, Any]] = {name: section.merge(given.get(name), name, problems) for name, section in sections.items()}
    data.update({name: dict(values) for name, values in given.items() if name not in sections})
    if problems:
        raise ConfigError("config: " + "; ".join(problems), problems)
    return Config(data, schema=sections)


def _is_a_node_view(node: FakeNode) -> NodeView:
    """Never called: mypy checks here that a FakeNode is a NodeView (and its ledger a LedgerView)."""
    ledger: LedgerView = node.ledger
    del ledger
    return node
