"""The services of one node: what it exposes, where it listens for others', and the relays between.

A relay copies one connection between a local socket and the far node: over the admitted
``/kairos/service/1.0.0`` stream, or — TCP, when both ends allow it — over a side connection
sealed with keys agreed on that stream (:mod:`.sealed`). Each direction is one loop that reads a
chunk, sends it and waits until it is sent (``drain``, or the stream's own write) before it reads
the next: a slow reader stops the reads at the other end, and a connection holds at most a few
chunks in memory per direction. The end of one direction is passed on as a half-close; an error
in either aborts both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from kairos_core.plugin import KairosError, NodeView, Stream

from . import sealed, wire
from .catalog import BUCKET, UsageError, advert, check_name, is_wildcard, parse_hostport, read_catalog

log = logging.getLogger(__name__)

STREAM_CHUNK = 64 * 1024
#: asyncio's reader buffer limit for relayed sockets (it pauses the socket above twice this)
READER_LIMIT = 1 << 20
#: the socket write buffer above which ``drain`` waits
WRITE_HIGH_WATER = 1 << 20
#: datagrams waiting to go onto one UDP session's stream; more are dropped and counted
UDP_QUEUE = 256
SIDE_ATTEMPT_TIMEOUT = 2.0
#: seconds a connecting end keeps an idle pooled side connection (the exposing end waits twice
#: as long, so the connecting end is the one that closes it and never sends into a closing one)
POOL_IDLE = 30.0
#: idle pooled side connections one peer may keep open to this node (``services.side_pool`` ≤ this)
MAX_IDLE_PER_PEER = 16
#: seconds before the pool tries again to negotiate with an exposing node where it failed
POOL_RETRY = 30.0
#: a proven side connection: its reader and writer, our sealer and our opener
SideConnection = tuple[asyncio.StreamReader, asyncio.StreamWriter, sealed.Sealer, sealed.Opener]


@dataclass
class Exposed:
    name: str
    host: str
    port: int
    protocol: str
    description: str

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "to": f"{self.host}:{self.port}", "protocol": self.protocol, "description": self.description}


@dataclass
class Connector:
    name: str
    protocol: str
    host: str
    port: int
    active: int = 0
    server: asyncio.AbstractServer | None = None
    transport: asyncio.DatagramTransport | None = None
    sessions: dict[Any, "UdpSession"] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return {
            "name": self.name,
            "listen": f"{host}:{self.port}",
            "protocol": self.protocol,
            "active": self.active + len(self.sessions),
        }


@dataclass
class SideWait:
    """A side connection the exposing end waits for, under one ticket."""

    peer_id: str
    sealer: sealed.Sealer
    opener: sealed.Opener
    ready: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]]


@dataclass
class Pooled:
    """A proven side connection waiting, idle, at the connecting end; ``watcher`` drops it when
    it is idle too long or the exposing end closes it."""

    side: SideConnection
    watcher: asyncio.Task[Any]


class UdpSession:
    """One client address of a UDP connector: its datagrams and one stream to an exposing node."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue(UDP_QUEUE)
        self.last = asyncio.get_running_loop().time()
        self.task: asyncio.Task[Any] | None = None


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, received: Callable[[bytes, Any], None]) -> None:
        self.received = received

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable from a target: datagrams are lossy
        pass


class Services:
    """Everything the plugin does on one node."""

    def __init__(self, node: NodeView, settings: Any) -> None:
        self.node = node
        self.settings = settings
        self.exposed: dict[str, Exposed] = {}
        self.connectors: dict[str, Connector] = {}
        self.serving: Counter[str] = Counter()  # peer id → streams it has open to us now
        self.outgoing: Counter[str] = Counter()  # peer id → our connections through it now
        self.pending: dict[bytes, SideWait] = {}
        self.pool: dict[str, list[Pooled]] = {}  # exposing peer id → idle side connections to it
        self.filling: set[str] = set()  # exposing peers whose pool is being filled now
        self.pool_failed: dict[str, float] = {}  # exposing peer id → when its pool last failed
        self.idle: Counter[str] = Counter()  # connecting peer id → its idle side connections to us
        self.stopping = False
        self.side_server: asyncio.AbstractServer | None = None
        self.side_port = 0
        self.tasks: set[asyncio.Task[Any]] = set()

    # --- life --------------------------------------------------------------------------------
    async def start(self) -> None:
        self.node.serve(wire.PROTOCOL, self.handle)
        if self.settings.side_connection:
            host, port = parse_hostport(self.settings.side_listen, "services.side_listen")
            self.side_server = await asyncio.start_server(self._side_accept, host or None, port, limit=READER_LIMIT)
            self.side_port = self.side_server.sockets[0].getsockname()[1]
        for item in self.settings.expose:  # checked by kairos_config_problems already
            self.expose(item["name"], item["to"], item.get("protocol", "tcp"), item.get("description", ""))
        mine = f"{self.node.peer_id}/"
        for key in list(self.node.ledger.items(BUCKET)):
            if key.startswith(mine) and key[len(mine) :] not in self.exposed:
                self.node.ledger.delete(BUCKET, key)  # an advertisement of an earlier run
        for item in self.settings.connect:
            try:
                self.connect(item["name"], item["listen"], item.get("protocol", "tcp"))
            except KairosError as exc:
                log.error("services: cannot connect %s: %s", item["name"], exc)
                self.node.count("services_listen_errors")

    async def stop(self) -> None:
        self.stopping = True
        for pooled in [p for entries in self.pool.values() for p in entries]:
            pooled.watcher.cancel()
            pooled.side[1].transport.abort()
        self.pool.clear()
        for name in list(self.exposed):
            self.unexpose(name)
        for name in list(self.connectors):
            self.disconnect(name)
        if self.side_server is not None:
            self.side_server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    def _hold(self, counts: Counter[str], peer: str, tag: str) -> None:
        """One more connection with ``peer``: while there is one, the connection manager must not
        close the libp2p connection under it (a relay over the stream would break)."""
        counts[peer] += 1
        if counts[peer] == 1:
            self.node.protect(peer, tag)

    def _release(self, counts: Counter[str], peer: str, tag: str) -> None:
        counts[peer] -= 1
        if counts[peer] <= 0:
            del counts[peer]
            self.node.unprotect(peer, tag)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = self.node.spawn(coro, name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # --- what users ask for ------------------------------------------------------------------
    def expose(self, name: Any, to: Any, protocol: Any = "tcp", description: Any = "") -> dict[str, Any]:
        check_name(name)
        if protocol not in ("tcp", "udp"):
            raise UsageError(f"protocol {protocol!r}: tcp or udp")
        if not isinstance(description, str) or len(description) > 200 or not description.isprintable():
            raise UsageError("description: printable text of at most 200 characters")
        host, port = parse_hostport(to, "--to")
        if port == 0:
            raise UsageError(f"--to {to!r}: the port must not be 0")
        self.exposed[name] = Exposed(name, host, port, protocol, description)
        self.node.ledger.set(BUCKET, f"{self.node.peer_id}/{name}", advert(protocol, description))
        return self.exposed[name].describe()

    def unexpose(self, name: Any) -> dict[str, Any]:
        exposed = self.exposed.pop(check_name(name), None)
        if exposed is None:
            raise KairosError(f"this node does not expose {name!r}")
        self.node.ledger.delete(BUCKET, f"{self.node.peer_id}/{name}")
        return exposed.describe()

    def connect(self, name: Any, listen: Any, protocol: Any = None) -> dict[str, Any]:
        """Bind the listener now (so a busy port is an error the user sees), serve it in a task."""
        check_name(name)
        if name in self.connectors:
            raise UsageError(f"{name!r} is connected already, at {self.connectors[name].describe()['listen']}")
        if protocol is None:
            known = {e.protocol for e in read_catalog(self.node.ledger.items(BUCKET)) if e.name == name}
            protocol = known.pop() if len(known) == 1 else "tcp"
        if protocol not in ("tcp", "udp"):
            raise UsageError(f"protocol {protocol!r}: tcp or udp")
        host, port = parse_hostport(listen, "--listen")
        kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
        try:
            family, _, _, _, address = socket.getaddrinfo(host, port, type=kind, flags=socket.AI_NUMERICHOST)[0]
        except socket.gaierror:
            raise UsageError(f"--listen {listen!r}: give an IP address") from None
        sock = socket.socket(family, kind)
        try:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            if kind == socket.SOCK_STREAM:
                sock.listen(128)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise KairosError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
        connector = Connector(name, protocol, host, sock.getsockname()[1])
        self.connectors[name] = connector
        self._spawn(self._listen(connector, sock), f"services-listen-{name}")
        return connector.describe()

    def disconnect(self, name: Any) -> dict[str, Any]:
        connector = self.connectors.pop(check_name(name), None)
        if connector is None:
            raise KairosError(f"this node has no listener for {name!r}")
        if connector.server is not None:
            connector.server.close()
        if connector.transport is not None:
            connector.transport.close()
        for session in connector.sessions.values():
            if session.task is not None:
                session.task.cancel()
        return connector.describe()

    def describe(self) -> dict[str, Any]:
        catalog = read_catalog(self.node.ledger.items(BUCKET))
        alive = set(self.node.members()) | {self.node.peer_id}
        return {
            "peer_id": self.node.peer_id,
            "exposed": [e.describe() for e in self.exposed.values()],
            "connected": [c.describe() for c in self.connectors.values()],
            "services": [
                {
                    "name": e.name,
                    "owner": e.owner,
                    "protocol": e.protocol,
                    "description": e.description,
                    "alive": e.owner in alive,
                }
                for e in catalog
            ],
        }

    # --- the connecting end ------------------------------------------------------------------
    async def _listen(self, connector: Connector, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        if connector.protocol == "tcp":
            connector.server = await asyncio.start_server(
                lambda r, w: self._spawn(self._client(connector, r, w), f"services-{connector.name}"),
                sock=sock,
                limit=READER_LIMIT,
            )
            if connector.name not in self.connectors:  # disconnected while starting
                connector.server.close()
        else:
            connector.transport, _ = await loop.create_datagram_endpoint(
                lambda: _Datagrams(lambda data, addr: self._datagram_in(connector, data, addr)), sock=sock
            )
            if connector.name not in self.connectors:
                connector.transport.close()

    def exposers(self, name: str, protocol: str) -> list[str]:
        """Live nodes that expose ``name``: those we send the fewest connections to first,
        ties in random order, so connections spread over them."""
        alive = set(self.node.members())
        owners = [
            e.owner
            for e in read_catalog(self.node.ledger.items(BUCKET))
            if e.name == name and e.protocol == protocol and e.owner in alive
        ]
        random.shuffle(owners)
        return sorted(owners, key=lambda owner: self.outgoing[owner])

    async def _open(self, name: str, protocol: str, side_nonce: bytes | None) -> tuple[Stream, str, dict[str, Any] | None]:
        """A stream to a live exposing node that has reached its target: ``(stream, owner, side
        offer)``. Tries each exposing node in turn; :class:`KairosError` when none answers."""
        owners = self.exposers(name, protocol)
        if not owners:
            raise KairosError(f"no live node exposes {protocol} service {name!r}")
        reasons = []
        for owner in owners:
            stream = None
            try:
                stream = await asyncio.wait_for(self.node.open_stream(owner, wire.PROTOCOL), self.settings.connect_timeout)
                await stream.write_frame(wire.request(name, protocol, side_nonce))
                raw = await asyncio.wait_for(stream.read_frame(wire.MAX_MESSAGE), self.settings.connect_timeout)
                answer = wire.parse_answer(raw)
                if answer is None:
                    raise KairosError("answered with a malformed message")
                ok, error, side = answer
                if ok:
                    return stream, owner, side
                raise KairosError(error)
            except (KairosError, TimeoutError) as exc:
                reasons.append(f"{owner[-8:]}: {exc or 'timed out'}")
                self.node.count("services_attempt_errors")
                if stream is not None:
                    await stream.reset()
        raise KairosError(f"{name}: every exposing node failed ({'; '.join(reasons)})")

    async def _client(self, connector: Connector, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if connector.active >= self.settings.max_connections:
            self.node.count("services_rejected_over_limit")
            writer.transport.abort()
            return
        connector.active += 1
        owner = None
        try:
            pooled = await self._open_pooled(connector.name, "tcp", dial=False)
            if pooled is not None:
                ready, owner = pooled
                self._hold(self.outgoing, owner, "services-out")
                self.node.count("services_side_connections")
                self.node.count("services_pooled_connections")
                if await relay_sealed(reader, writer, *ready, keep=True):
                    self._return(owner, ready)
                return
            nonce = sealed.new_nonce() if self.settings.side_connection else None
            try:
                stream, owner, offer = await self._open(connector.name, "tcp", nonce)
            except KairosError as exc:
                log.info("services: %s", exc)
                self.node.count("services_connect_errors")
                writer.transport.abort()
                return
            self._hold(self.outgoing, owner, "services-out")
            side = await self._side_dial(offer, nonce) if offer and nonce else None
            try:
                await stream.write_frame(wire.mode(side is not None))
            except KairosError:
                await stream.reset()
                if side is not None:
                    side[1].transport.abort()
                writer.transport.abort()
                return
            if side is not None:
                await stream.close()
                self.node.count("services_side_connections")
                if await relay_sealed(reader, writer, *side, keep=True):
                    self._return(owner, side)  # the exposing end keeps it too: the pool's first
            else:
                self.node.count("services_stream_connections")
                await relay_stream(reader, writer, stream)
        finally:
            connector.active -= 1
            if owner is not None:
                self._release(self.outgoing, owner, "services-out")

    # --- the pool of proven side connections, at the connecting end ---------------------------
    async def _open_pooled(self, name: str, protocol: str, dial: bool) -> tuple[SideConnection, str] | None:
        """A side connection to a live exposing node that took our request for ``name`` and
        reached its target, and that node; None when there is none (then the caller negotiates on
        a stream). Takes an idle pooled one, or with ``dial`` negotiates one when there is none."""
        if not self.settings.side_connection:
            return None
        for owner in self.exposers(name, protocol):
            side = await self._take(owner)
            if not self.pool.get(owner):  # the last one (or none) taken: make more for the next ones
                self._refill(owner)
            if side is None and dial and not self._pool_failed_lately(owner):
                side = await self._pool_dial(owner)
                if side is None:
                    self.pool_failed[owner] = asyncio.get_running_loop().time()
            if side is None:
                continue
            reader, writer, sealer, opener = side
            try:
                writer.write(sealer.seal(sealed.KIND_OPEN, wire.request(name, protocol, None)))
                await writer.drain()
                kind, raw = await asyncio.wait_for(opener.read(reader), self.settings.connect_timeout)
                answer = wire.parse_answer(raw) if kind == sealed.KIND_ANSWER else None
                if answer is None or answer[2] is not None:
                    raise sealed.SealError("answered with a malformed message")
                if not answer[0]:
                    raise KairosError(answer[1])
                return side, owner
            except (OSError, TimeoutError, asyncio.IncompleteReadError, sealed.SealError, KairosError) as exc:
                # a pooled connection the exposing end closed meanwhile, or a refusal: try the next
                log.info("services: %s on a pooled side connection to %s: %s", name, owner[-8:], exc or "timed out")
                self.node.count("services_attempt_errors")
                writer.transport.abort()
        return None

    async def _take(self, owner: str) -> SideConnection | None:
        entries = self.pool.get(owner, [])
        while entries:
            pooled = entries.pop()  # the most recently used: the least likely to be timing out
            pooled.watcher.cancel()
            # its read must be over before ours starts (a StreamReader takes one reader at a time)
            await asyncio.gather(pooled.watcher, return_exceptions=True)
            reader, writer = pooled.side[0], pooled.side[1]
            if not reader.at_eof() and not writer.transport.is_closing():
                return pooled.side
            writer.transport.abort()
        return None

    def _return(self, owner: str, side: SideConnection) -> None:
        """A side connection whose relay ended cleanly (both ENDs passed: nothing in flight) goes
        back to the pool, or is closed when the pool is full."""
        entries = self.pool.setdefault(owner, [])
        if self.stopping or len(entries) >= self.settings.side_pool or owner not in self.node.members():
            side[1].close()
            return
        entries.append(Pooled(side, self._spawn(self._watch_idle(owner, side), "services-pool-idle")))

    async def _watch_idle(self, owner: str, side: SideConnection) -> None:
        # an idle side connection receives nothing: a byte, the end, or the idle time over drops it
        with contextlib.suppress(TimeoutError, OSError):
            await asyncio.wait_for(side[0].read(1), POOL_IDLE)
        # in place: a _take waiting for a watcher holds this very list, and a copy here would let
        # it and the next _take both pop the same connection
        entries = self.pool.get(owner)
        if entries is not None:
            entries[:] = [p for p in entries if p.side is not side]
        side[1].transport.abort()

    def _pool_failed_lately(self, owner: str) -> bool:
        # e.g. a firewall before its side port: every connection would pay for a try
        failed = self.pool_failed.get(owner)
        return failed is not None and asyncio.get_running_loop().time() - failed < POOL_RETRY

    def _refill(self, owner: str) -> None:
        if self._pool_failed_lately(owner):
            return
        if self.settings.side_pool and self.settings.side_connection and owner not in self.filling and not self.stopping:
            self.filling.add(owner)
            self._spawn(self._fill(owner), "services-pool-fill")

    async def _fill(self, owner: str) -> None:
        try:
            while len(self.pool.get(owner, [])) < self.settings.side_pool and owner in self.node.members():
                side = await self._pool_dial(owner)
                if side is None:
                    self.pool_failed[owner] = asyncio.get_running_loop().time()
                else:
                    self.pool_failed.pop(owner, None)
                if side is None or self.stopping:
                    if side is not None:
                        side[1].transport.abort()
                    return
                self._return(owner, side)
        finally:
            self.filling.discard(owner)

    async def _pool_dial(self, owner: str) -> SideConnection | None:
        """Negotiate one side connection with ``owner`` for the pool (a pool request on a stream)."""
        nonce, stream, side = sealed.new_nonce(), None, None
        try:
            stream = await asyncio.wait_for(self.node.open_stream(owner, wire.PROTOCOL), self.settings.connect_timeout)
            await stream.write_frame(wire.pool_request(nonce))
            raw = await asyncio.wait_for(stream.read_frame(wire.MAX_MESSAGE), self.settings.connect_timeout)
            answer = wire.parse_answer(raw)
            if answer is None or not answer[0] or answer[2] is None:
                raise KairosError(answer[1] if answer else "answered with a malformed message")
            side = await self._side_dial(answer[2], nonce)
            await stream.write_frame(wire.mode(side is not None))
            await stream.close()
            return side
        except (KairosError, TimeoutError) as exc:
            log.info("services: no pooled side connection to %s: %s", owner[-8:], exc or "timed out")
            self.node.count("services_pool_errors")
            if stream is not None:
                await stream.reset()
            if side is not None:
                side[1].transport.abort()
            return None

    async def _side_dial(self, offer: dict[str, Any], nonce: bytes) -> SideConnection | None:
        """The proven side connection ``(reader, writer, sealer, opener)``, or None (then the
        bytes go over the stream)."""
        to_exposer, to_connector = sealed.derive_keys(nonce, offer["nonce"], offer["ticket"])
        for host in offer["hosts"]:
            writer = None
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, offer["port"], limit=READER_LIMIT), SIDE_ATTEMPT_TIMEOUT
                )
                sealer, opener = sealed.Sealer(to_exposer), sealed.Opener(to_connector)
                # the same first record on every attempt, byte for byte: nonce 0 never seals two messages
                writer.write(offer["ticket"] + sealer.seal(sealed.KIND_HELLO))
                await writer.drain()
                kind, _ = await asyncio.wait_for(opener.read(reader), SIDE_ATTEMPT_TIMEOUT)
                if kind != sealed.KIND_HELLO:
                    raise sealed.SealError("expected HELLO")
                writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
                return reader, writer, sealer, opener
            except (OSError, TimeoutError, asyncio.IncompleteReadError, sealed.SealError):
                if writer is not None:
                    writer.transport.abort()
        self.node.count("services_side_unreachable")
        return None

    def _datagram_in(self, connector: Connector, data: bytes, addr: Any) -> None:
        if not data:
            self.node.count("services_udp_dropped")
            return
        session = connector.sessions.get(addr)
        if session is None:
            if len(connector.sessions) >= self.settings.max_connections:
                self.node.count("services_rejected_over_limit")
                return
            session = connector.sessions[addr] = UdpSession()
            session.task = self._spawn(self._udp_client(connector, addr, session), f"services-udp-{connector.name}")
        session.last = asyncio.get_running_loop().time()
        try:
            session.queue.put_nowait(data)
        except asyncio.QueueFull:
            self.node.count("services_udp_dropped")

    async def _udp_client(self, connector: Connector, addr: Any, session: UdpSession) -> None:
        owner = None
        try:
            transport = connector.transport

            def reply(data: bytes) -> None:
                session.last = asyncio.get_running_loop().time()
                if transport is not None and not transport.is_closing():
                    transport.sendto(data, addr)

            pooled = await self._open_pooled(connector.name, "udp", dial=True)
            if pooled is not None:
                side, owner = pooled
                self._hold(self.outgoing, owner, "services-out")
                self.node.count("services_side_connections")
                await relay_sealed_datagrams(*side, session, reply, self.settings.udp_idle_timeout)
                return
            try:
                stream, owner, _ = await self._open(connector.name, "udp", None)
            except KairosError as exc:
                log.info("services: %s", exc)
                self.node.count("services_connect_errors")
                return
            self._hold(self.outgoing, owner, "services-out")
            self.node.count("services_stream_connections")
            await relay_datagrams(stream, session, reply, self.settings.udp_idle_timeout)
        finally:
            if connector.sessions.get(addr) is session:
                del connector.sessions[addr]
            if owner is not None:
                self._release(self.outgoing, owner, "services-out")

    # --- the exposing end --------------------------------------------------------------------
    async def handle(self, stream: Stream) -> None:
        """One ``/kairos/service/1.0.0`` stream from an admitted peer."""
        peer = stream.peer_id
        if self.serving[peer] >= self.settings.max_connections_per_peer:
            self.node.count("services_rejected_over_limit")
            await _refuse(stream, "too many connections from this peer")
            return
        self._hold(self.serving, peer, "services-in")
        # the core does not cancel served streams' handlers when the node stops; stop() does
        task = asyncio.current_task()
        if task is not None:
            self.tasks.add(task)
        try:
            await self._serve(stream)
        finally:
            if task is not None:
                self.tasks.discard(task)
            self._release(self.serving, peer, "services-in")

    async def _serve(self, stream: Stream) -> None:
        try:
            raw = await asyncio.wait_for(stream.read_frame(wire.MAX_MESSAGE), self.settings.connect_timeout)
        except (KairosError, TimeoutError):  # oversized, broken, or nothing in time
            raw = None
        parsed = wire.parse_request(raw) if raw else None
        pool_nonce = wire.parse_pool_request(raw) if raw and parsed is None else None
        if pool_nonce is not None:
            await self._serve_pool(stream, pool_nonce)
            return
        if parsed is None:
            self.node.count("services_dropped_malformed")
            await stream.reset()
            return
        name, protocol, nonce = parsed
        exposed = self.exposed.get(name)
        if exposed is None or exposed.protocol != protocol:
            self.node.count("services_rejected_requests")
            await _refuse(stream, f"this node does not expose {protocol} service {name!r}")
            return
        if protocol == "udp":
            await self._serve_udp(stream, exposed)
            return
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(exposed.host, exposed.port, limit=READER_LIMIT), self.settings.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            self.node.count("services_rejected_requests")
            await _refuse(stream, f"cannot reach the service: {getattr(exc, 'strerror', None) or 'timed out'}")
            return
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        try:
            chosen, raw, wait = await self._negotiate(stream, nonce)
            if chosen is None or (chosen == "side" and (wait is None or not wait.ready.done())):
                # a broken stream is a peer gone mid-negotiation; anything else is malformed
                self.node.count("services_dropped_malformed" if raw else "services_aborted")
                await stream.reset()
                writer.transport.abort()
                if wait is not None and wait.ready.done():
                    wait.ready.result()[1].transport.abort()
                return
            self.node.count("services_served")
            if chosen == "side" and wait is not None:
                side_reader, side_writer = wait.ready.result()
                await stream.close()
                if await relay_sealed(reader, writer, side_reader, side_writer, wait.sealer, wait.opener, keep=True):
                    # the connecting end may pool it now (or close it, which ends the wait quietly)
                    self._spawn(
                        self._pooled(stream.peer_id, (side_reader, side_writer, wait.sealer, wait.opener)), "services-pooled"
                    )
            else:
                if wait is not None and wait.ready.done():
                    wait.ready.result()[1].transport.abort()
                await relay_stream(reader, writer, stream)
        except BaseException:
            writer.transport.abort()
            raise

    async def _negotiate(self, stream: Stream, nonce: bytes | None) -> tuple[str | None, bytes | None, SideWait | None]:
        """Answer yes (offering a side connection when the peer asked for one and we listen),
        then read the mode: ``(mode or None, the raw mode frame, the side wait or None)``; when
        the mode is ``side`` the wait's connection is proven, or has failed to come in time."""
        ticket = None
        try:
            offer = None
            if nonce is not None and self.side_server is not None:
                ticket, own_nonce = sealed.new_ticket(), sealed.new_nonce()
                to_exposer, to_connector = sealed.derive_keys(nonce, own_nonce, ticket)
                self.pending[ticket] = SideWait(
                    stream.peer_id,
                    sealed.Sealer(to_connector),
                    sealed.Opener(to_exposer),
                    asyncio.get_running_loop().create_future(),
                )
                offer = wire.side_offer(ticket, own_nonce, self.side_port, self._side_hosts())
            await stream.write_frame(wire.acceptance(offer))
            try:
                raw = await asyncio.wait_for(stream.read_frame(wire.MAX_MESSAGE), self.settings.connect_timeout)
            except (KairosError, TimeoutError):
                raw = None
            chosen = wire.parse_mode(raw) if raw else None
            wait = self.pending.pop(ticket, None) if ticket else None
            if chosen == "side" and wait is not None and not wait.ready.done():
                # the HELLO went out just before the mode came: the accept is finishing
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(wait.ready), SIDE_ATTEMPT_TIMEOUT)
            return chosen, raw, wait
        finally:
            if ticket is not None:
                self.pending.pop(ticket, None)

    async def _serve_pool(self, stream: Stream, nonce: bytes) -> None:
        """A pool request: negotiate a side connection that then waits, idle, for requests."""
        peer = stream.peer_id
        if self.side_server is None or self.idle[peer] >= MAX_IDLE_PER_PEER:
            self.node.count("services_rejected_requests")
            await _refuse(stream, "no (more) pooled side connections here")
            return
        chosen, raw, wait = await self._negotiate(stream, nonce)
        proven = wait is not None and wait.ready.done()
        if chosen == "side" and wait is not None and proven:
            side_reader, side_writer = wait.ready.result()
            await stream.close()
            self._spawn(self._pooled(peer, (side_reader, side_writer, wait.sealer, wait.opener)), "services-pooled")
            return
        if chosen is None:
            self.node.count("services_dropped_malformed" if raw else "services_aborted")
        if wait is not None and proven:
            wait.ready.result()[1].transport.abort()
        await stream.reset()

    async def _pooled(self, peer: str, side: SideConnection) -> None:
        """A pooled side connection at the exposing end: wait for a request, serve it, and when
        its relay ended cleanly wait for the next one."""
        reader, writer, _, opener = side
        try:
            while self.idle[peer] < MAX_IDLE_PER_PEER:
                self.idle[peer] += 1
                try:
                    kind, raw = await asyncio.wait_for(opener.read(reader), 2 * POOL_IDLE)
                finally:
                    self.idle[peer] -= 1
                    if self.idle[peer] <= 0:
                        del self.idle[peer]
                if kind != sealed.KIND_OPEN:
                    raise sealed.SealError(f"record kind {kind} on an idle side connection")
                if not await self._serve_pooled(peer, side, raw):
                    return
            self.node.count("services_rejected_over_limit")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:  # the connecting end closing an idle connection sends nothing more
                self.node.count("services_aborted")
        except (OSError, TimeoutError):
            pass  # cut, or idle for too long
        except sealed.SealError as exc:
            log.info("services: pooled side connection from %s dropped: %s", peer[-8:], exc)
            self.node.count("services_dropped_malformed")
        finally:
            writer.transport.abort()

    async def _serve_pooled(self, peer: str, side: SideConnection, raw: bytes) -> bool:
        """One request on a pooled side connection; True when the connection may serve another."""
        reader, writer, sealer, opener = side
        parsed = wire.parse_request(raw)
        if parsed is None or parsed[2] is not None:
            raise sealed.SealError("not a service request")
        name, protocol, _ = parsed
        exposed = self.exposed.get(name)

        def answer(message: bytes) -> None:
            writer.write(sealer.seal(sealed.KIND_ANSWER, message))

        # checked per request, not per pooled connection: a peer that left or hit its limit since
        # the connection was made is refused like on a stream
        refusal, counter = None, "services_rejected_requests"
        if peer not in self.node.members():
            refusal = "not a member of this network now"
        elif self.serving[peer] >= self.settings.max_connections_per_peer:
            refusal, counter = "too many connections from this peer", "services_rejected_over_limit"  # as on a stream
        elif exposed is None or exposed.protocol != protocol:
            refusal = f"this node does not expose {protocol} service {name!r}"
        if refusal is not None:
            self.node.count(counter)
            answer(wire.refusal(refusal))
            await writer.drain()
            return False
        assert exposed is not None
        self._hold(self.serving, peer, "services-in")
        try:
            if protocol == "udp":
                try:
                    transport, session, send = await self._reach_udp(exposed)
                except OSError as exc:
                    self.node.count("services_rejected_requests")
                    answer(wire.refusal(f"cannot reach the service: {exc.strerror or exc}"))
                    await writer.drain()
                    return False
                try:
                    answer(wire.acceptance(None))
                    self.node.count("services_served")
                    await relay_sealed_datagrams(reader, writer, sealer, opener, session, send, self.settings.udp_idle_timeout)
                finally:
                    transport.close()
                return False
            try:
                target_reader, target_writer = await asyncio.wait_for(
                    asyncio.open_connection(exposed.host, exposed.port, limit=READER_LIMIT), self.settings.connect_timeout
                )
            except (OSError, TimeoutError) as exc:
                self.node.count("services_rejected_requests")
                answer(wire.refusal(f"cannot reach the service: {getattr(exc, 'strerror', None) or 'timed out'}"))
                await writer.drain()
                return False
            target_writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
            answer(wire.acceptance(None))
            self.node.count("services_served")
            return await relay_sealed(target_reader, target_writer, reader, writer, sealer, opener, keep=True)
        finally:
            self._release(self.serving, peer, "services-in")

    def _side_hosts(self) -> list[str]:
        host, _ = parse_hostport(self.settings.side_listen, "services.side_listen")
        if host and not is_wildcard(host):
            return [host]
        hosts = []
        for address in self.node.addresses():
            parts = address.split("/")
            if len(parts) > 2 and parts[1] in ("ip4", "ip6") and parts[2] not in hosts:
                hosts.append(parts[2])
        # loopback last: on another machine it is that machine's own
        return sorted(hosts, key=lambda h: h.startswith("127.") or h == "::1")

    async def _side_accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A side connection: the ticket in clear, then a HELLO sealed with that ticket's key —
        anything else is dropped and counted, and the ticket keeps waiting for its real peer."""
        try:
            ticket = await asyncio.wait_for(reader.readexactly(sealed.TICKET_SIZE), self.settings.connect_timeout)
            wait = self.pending.get(ticket)
            if wait is None or wait.ready.done():
                raise sealed.SealError("unknown ticket")
            kind, _ = await asyncio.wait_for(wait.opener.read(reader), self.settings.connect_timeout)
            if kind != sealed.KIND_HELLO:
                raise sealed.SealError("expected HELLO")
            writer.write(wait.sealer.seal(sealed.KIND_HELLO))
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, sealed.SealError):
            self.node.count("services_side_rejected")
            writer.transport.abort()
            return
        if wait.ready.done():  # the negotiation ended meanwhile
            writer.transport.abort()
            return
        writer.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        wait.ready.set_result((reader, writer))

    async def _reach_udp(self, exposed: Exposed) -> tuple[asyncio.DatagramTransport, UdpSession, Callable[[bytes], None]]:
        """A socket to a UDP target: ``(transport, session, send)``, the session's queue holding
        the target's answers and ``send`` taking the peer's datagrams; OSError when it cannot."""
        loop = asyncio.get_running_loop()
        session = UdpSession()

        def received(data: bytes, addr: Any) -> None:
            session.last = loop.time()
            try:
                session.queue.put_nowait(data)
            except asyncio.QueueFull:
                self.node.count("services_udp_dropped")

        transport, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(received), remote_addr=(exposed.host, exposed.port))

        def send(data: bytes) -> None:
            if not transport.is_closing():
                transport.sendto(data)

        return transport, session, send

    async def _serve_udp(self, stream: Stream, exposed: Exposed) -> None:
        try:
            transport, session, send = await self._reach_udp(exposed)
        except OSError as exc:
            self.node.count("services_rejected_requests")
            await _refuse(stream, f"cannot reach the service: {exc.strerror or exc}")
            return
        try:
            await stream.write_frame(wire.acceptance(None))
            self.node.count("services_served")
            await relay_datagrams(stream, session, send, self.settings.udp_idle_timeout)
        finally:
            transport.close()


async def _refuse(stream: Stream, error: str) -> None:
    try:
        await stream.write_frame(wire.refusal(error))
    finally:
        await stream.close()


async def _two_ways(one: Any, other: Any, abort: Any) -> bool:
    """Run both directions to their end; if one fails (or we are cancelled), abort everything.
    True when both ended cleanly."""
    tasks = [asyncio.ensure_future(one), asyncio.ensure_future(other)]
    clean = False
    try:
        await asyncio.gather(*tasks)
        clean = True
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await abort(clean)
    return clean


async def _relay(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    chunk: int,
    send: Callable[[bytes], Awaitable[None]],
    end: Callable[[], Awaitable[None]],
    receive: Callable[[], Awaitable[bytes]],
    finish_far: Callable[[bool], Awaitable[None]],
) -> bool:
    """Copy a socket to and from the far end (``send`` each chunk, ``end`` at EOF; ``receive``
    until it gives ``b""``), passing each end on as a half-close, until both directions ended;
    ``finish_far(clean)`` then closes or aborts the far end. True when both ended cleanly."""

    async def outbound() -> None:
        while data := await reader.read(chunk):
            await send(data)
        await end()

    async def inbound() -> None:
        while data := await receive():
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    async def finish(clean: bool) -> None:
        if clean:
            writer.close()
        else:
            writer.transport.abort()
        await finish_far(clean)

    return await _two_ways(outbound(), inbound(), finish)


async def relay_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stream: Stream) -> None:
    """Copy a socket to and from a stream until both directions ended."""

    async def finish_far(clean: bool) -> None:
        if not clean:
            await stream.reset()

    try:
        await _relay(reader, writer, STREAM_CHUNK, stream.write, stream.close, lambda: stream.read(STREAM_CHUNK * 4), finish_far)
    except (KairosError, OSError):
        pass  # a reset stream or socket: both sides are aborted already


async def relay_sealed(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    side_reader: asyncio.StreamReader,
    side_writer: asyncio.StreamWriter,
    sealer: sealed.Sealer,
    opener: sealed.Opener,
    keep: bool = False,
) -> bool:
    """Copy a socket to and from a sealed side connection until both directions ended. With
    ``keep`` a side connection whose both directions ended cleanly (each END passed, so nothing
    is in flight) is left open for the next connection; True when that happened."""

    async def send(data: bytes) -> None:
        side_writer.write(sealer.seal(sealed.KIND_DATA, data))
        await side_writer.drain()

    async def end() -> None:
        side_writer.write(sealer.seal(sealed.KIND_END))
        await side_writer.drain()

    async def receive() -> bytes:
        while True:
            kind, data = await opener.read(side_reader)
            if kind == sealed.KIND_END:
                return b""
            if kind != sealed.KIND_DATA:
                raise sealed.SealError("unexpected record")
            if data:  # an empty record is not the end: only END is
                return data

    async def finish_far(clean: bool) -> None:
        if not clean:
            side_writer.transport.abort()
        elif not keep:
            side_writer.close()

    try:
        return await _relay(reader, writer, sealed.RECORD_DATA, send, end, receive, finish_far) and keep
    except (OSError, asyncio.IncompleteReadError, sealed.SealError) as exc:
        log.info("services: side connection aborted: %s", exc)
        return False


async def _datagram_loops(session: UdpSession, idle_timeout: float, *loops: Any) -> None:
    """Run ``loops`` (the two directions) until one ends or fails, or nothing moved for
    ``idle_timeout`` seconds; then cancel the rest."""
    loop = asyncio.get_running_loop()

    async def idle() -> None:
        # every datagram moves the deadline; sleeping to the current one and looking again is
        # one wake-up per idle period, cheaper than an event set per datagram
        while (left := session.last + idle_timeout - loop.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(left)

    tasks = [asyncio.ensure_future(c) for c in (*loops, idle())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def relay_datagrams(stream: Stream, session: UdpSession, deliver: Any, idle_timeout: float) -> None:
    """Datagrams of ``session.queue`` onto the stream, frames of the stream to ``deliver``,
    until either side ends or nothing moved for ``idle_timeout`` seconds."""
    loop = asyncio.get_running_loop()

    async def outbound() -> None:
        while True:
            await stream.write_frame(await session.queue.get())

    async def inbound() -> None:
        while data := await stream.read_frame(wire.MAX_DATAGRAM):
            session.last = loop.time()
            deliver(data)

    try:
        await _datagram_loops(session, idle_timeout, outbound(), inbound())
    finally:
        await stream.reset()


async def relay_sealed_datagrams(
    side_reader: asyncio.StreamReader,
    side_writer: asyncio.StreamWriter,
    sealer: sealed.Sealer,
    opener: sealed.Opener,
    session: UdpSession,
    deliver: Any,
    idle_timeout: float,
) -> None:
    """Like :func:`relay_datagrams`, one sealed DATA record per datagram on a side connection
    (which is closed at the end: a UDP session never goes back to the pool)."""
    loop = asyncio.get_running_loop()

    async def outbound() -> None:
        while True:
            side_writer.write(sealer.seal(sealed.KIND_DATA, await session.queue.get()))
            await side_writer.drain()

    async def inbound() -> None:
        while True:
            kind, data = await opener.read(side_reader)
            if kind != sealed.KIND_DATA:
                raise sealed.SealError(f"record kind {kind} in a UDP session")
            session.last = loop.time()
            deliver(data)

    try:
        await _datagram_loops(session, idle_timeout, outbound(), inbound())
    finally:
        side_writer.transport.abort()
