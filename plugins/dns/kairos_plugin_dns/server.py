"""The DNS server: UDP and TCP on ``dns.listen``, answers from the :class:`~.records.Zone`,
forwards the rest with a bounded, TTL-respecting cache.

What one client may cost the node is bounded: a query larger than ``dns.max_query_size`` is
dropped, garbage gets FORMERR when it has a header to answer (else it is dropped), a message
that is itself a response is dropped (no reflection between two servers), each source IP but
loopback has a token bucket (``dns.rate_limit`` queries/s, ``dns.rate_burst``; loopback too with
``dns.rate_limit_loopback``), forwards in flight and TCP
connections are capped, and the cache holds at most ``dns.cache_size`` answers. Every drop is
counted (``dns_*`` counters, ``kairos status`` and ``/metrics``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from kairos_core.plugin import TokenBuckets

from .records import Answer, Zone

log = logging.getLogger("kairos.dns")

COUNTERS = {
    "dns_queries": "DNS queries received (UDP and TCP), before any check.",
    "dns_answered_local": "Queries answered from the network's names (members, ledger records), NODATA and NXDOMAIN included.",
    "dns_forwarded": "Queries sent to an upstream resolver (cache misses).",
    "dns_cache_hits": "Forwarded names answered from the cache.",
    "dns_forward_failures": "Queries no upstream answered in time (answered SERVFAIL).",
    "dns_forward_busy": "Queries refused because dns.max_forwards were in flight (answered SERVFAIL).",
    "dns_formerr": "Malformed queries answered FORMERR.",
    "dns_dropped_malformed": "Packets dropped unanswered: too short for a header, or a response instead of a query.",
    "dns_dropped_oversized": "Queries larger than dns.max_query_size, dropped unanswered.",
    "dns_rate_limited": "Queries dropped because their source IP was over dns.rate_limit.",
    "dns_refused": "Queries answered REFUSED or NOTIMP (another class or opcode, no upstream).",
}

HEADER = struct.Struct("!HHHHHH")
ANSWERED_CACHE = 4096  # rendered local answers kept per zone
QR, RD = 0x8000, 0x0100


def parse_hostport(text: str, default_port: int = 53) -> tuple[str, int]:
    """``(ip, port)`` of ``IP``, ``IP:PORT`` or ``[V6]:PORT``; ``ValueError`` otherwise."""
    text = text.strip()
    host, port = text, default_port
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise ValueError(f"{text!r}: expected [IPv6]:PORT")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            raise ValueError(f"{text!r}: expected IP:PORT")
        port = int(port_text)
    address = ipaddress.ip_address(host)
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: the port must be from 0 to 65535")
    return str(address), port


def system_resolvers(path: Path) -> list[tuple[str, int]]:
    """The ``nameserver`` lines of a resolv.conf, as ``(ip, 53)`` (unreadable or malformed: skipped)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                found.append((str(ipaddress.ip_address(parts[1].split("%")[0])), 53))
            except ValueError:
                continue
    return found


def is_self(upstream: tuple[str, int], listen: tuple[str, int]) -> bool:
    """Whether ``upstream`` is this server's own socket: forwarding there would loop."""
    if upstream[1] != listen[1]:
        return False
    ours, theirs = ipaddress.ip_address(listen[0]), ipaddress.ip_address(upstream[0])
    # a wildcard listener is on every local address: any upstream on our port may be us
    return ours == theirs or ours.is_unspecified


def _loopback_source(address: str) -> bool:
    """Whether a source address, as a socket names it (canonical text), is loopback: a string
    test, cheaper per query than parsing it."""
    return address.startswith(("127.", "::ffff:127.")) or address == "::1"


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class RateLimiter:
    """A token bucket per source IP (:class:`TokenBuckets`); at most ``max_sources`` tracked, the
    idlest forgotten first. A ``rate`` of 0 is no limit."""

    def __init__(self, rate: float, burst: float, max_sources: int = 10000) -> None:
        self.rate, self.burst, self.max_sources = rate, burst, max_sources
        self._buckets = TokenBuckets(rate, burst, max_sources)

    def allow(self, source: str, now: float) -> bool:
        return self.rate <= 0 or self._buckets.take(source, now)


@dataclass
class Cached:
    expires: float
    stored: float
    rcode: int
    answer: list[dns.rrset.RRset]
    authority: list[dns.rrset.RRset]


class Cache:
    """Forwarded answers by (name, type, class), LRU-bounded, each kept for the least TTL of its
    records (``max_ttl`` at most), negative answers (NXDOMAIN, NODATA) for their SOA's minimum
    (``negative_ttl`` at most, and ``negative_ttl`` without a SOA). TTLs handed out count down."""

    def __init__(self, size: int, max_ttl: int, negative_ttl: int) -> None:
        self.size, self.max_ttl, self.negative_ttl = size, max_ttl, negative_ttl
        self._entries: OrderedDict[tuple[str, int, int], Cached] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def ttl_of(self, response: dns.message.Message) -> int:
        if response.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return 0
        if response.answer and response.rcode() == dns.rcode.NOERROR:
            return min(min(rrset.ttl for rrset in response.answer), self.max_ttl)
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                minimum: int = getattr(rrset[0], "minimum", self.negative_ttl)
                return int(min(rrset.ttl, minimum, self.negative_ttl))
        return self.negative_ttl

    def put(self, key: tuple[str, int, int], response: dns.message.Message, now: float) -> None:
        ttl = self.ttl_of(response)
        if ttl <= 0 or self.size <= 0:
            return
        self._entries.pop(key, None)
        self._entries[key] = Cached(now + ttl, now, response.rcode(), list(response.answer), list(response.authority))
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get(self, key: tuple[str, int, int], now: float) -> Cached | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry


def _aged(rrsets: list[dns.rrset.RRset], elapsed: int) -> list[dns.rrset.RRset]:
    out = []
    for rrset in rrsets:
        out.append(dns.rrset.from_rdata_list(rrset.name, max(0, rrset.ttl - elapsed), list(rrset)))
    return out


@dataclass(frozen=True)
class Settings:
    listen: tuple[str, int]
    upstreams: tuple[tuple[str, int], ...]
    max_query_size: int
    rate_limit: float
    rate_burst: float
    cache_size: int
    max_cache_ttl: int
    negative_ttl: int
    forward_timeout: float
    max_forwards: int
    max_tcp_connections: int
    tcp_idle_timeout: float
    #: loopback sources are this host's own programs, all of them 127.0.0.1 (or a local stub
    #: forwarding for every program): as one bucket, one busy program would throttle all the others
    rate_limit_loopback: bool = False


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, server: DNSServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram endpoint's transport

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.server.datagram(data, addr, self)

    def error_received(self, exc: Exception) -> None:
        log.debug("dns: UDP error %s", exc)


class DNSServer:
    """Serves ``zone()`` (called per query; the caller caches it) and forwards the rest."""

    def __init__(self, settings: Settings, zone: Callable[[], Zone], count: Callable[[str], None]) -> None:
        self.settings = settings
        self.zone = zone
        self.count = count
        self.limiter = RateLimiter(settings.rate_limit, settings.rate_burst)
        self.cache = Cache(settings.cache_size, settings.max_cache_ttl, settings.negative_ttl)
        self.upstreams = [u for u in settings.upstreams if not is_self(u, settings.listen)]
        self.skipped_upstreams = [u for u in settings.upstreams if is_self(u, settings.listen)]
        self._forwards = 0
        #: rendered local answers (without their id) by query flags + question, for one zone
        self._answered: dict[bytes, bytes] = {}
        self._answered_zone: Zone | None = None
        #: rendered cached forwarded answers: (cache key, the cache entry, its age in s, answer)
        self._cached_answers: dict[bytes, tuple[tuple[str, int, int], Cached, int, bytes]] = {}
        self._tcp_connections = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._udp: _UDP | None = None
        self._tcp: asyncio.Server | None = None
        self.address: tuple[str, int] = settings.listen

    # ----- life ---------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.settings.listen
        transport, protocol = await loop.create_datagram_endpoint(lambda: _UDP(self), local_addr=(host, port))
        self._udp = protocol
        bound = transport.get_extra_info("sockname")
        self.address = (host, int(bound[1]))
        try:
            # the same port for TCP (port 0 above chose one: TCP follows it)
            self._tcp = await asyncio.start_server(self._serve_tcp, host, self.address[1])
        except OSError:
            transport.close()
            raise
        # our own bound port may differ from the configured one (0): never forward to it either
        self.skipped_upstreams += [u for u in self.upstreams if is_self(u, self.address)]
        self.upstreams = [u for u in self.upstreams if not is_self(u, self.address)]

    async def stop(self) -> None:
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tcp is not None:
            await self._tcp.wait_closed()

    # ----- transports ---------------------------------------------------------------------------

    def datagram(self, data: bytes, addr: tuple[Any, ...], udp: _UDP) -> None:
        outcome = self.receive(data, addr[0], tcp=False)
        if outcome is None:
            return
        if isinstance(outcome, bytes):
            if udp.transport is not None:
                udp.transport.sendto(outcome, addr)
            return

        async def reply(pending: asyncio.Future[bytes | None]) -> None:
            wire = await pending
            if wire is not None and udp.transport is not None and not udp.transport.is_closing():
                udp.transport.sendto(wire, addr)

        task = asyncio.ensure_future(reply(outcome))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._tcp_connections += 1
        try:
            if self._tcp_connections > self.settings.max_tcp_connections:
                self.count("dns_refused")
                return
            peer = writer.get_extra_info("peername")
            source = peer[0] if peer else "?"
            while True:
                try:
                    header = await asyncio.wait_for(reader.readexactly(2), self.settings.tcp_idle_timeout)
                    (size,) = struct.unpack("!H", header)
                    if size > self.settings.max_query_size:
                        self.count("dns_queries")
                        self.count("dns_dropped_oversized")
                        return
                    data = await asyncio.wait_for(reader.readexactly(size), self.settings.tcp_idle_timeout)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                outcome = self.receive(data, source, tcp=True)
                if outcome is not None and not isinstance(outcome, bytes):
                    outcome = await outcome
                if outcome is None:
                    return
                writer.write(struct.pack("!H", len(outcome)) + outcome)
                await writer.drain()
        except ConnectionError:
            return
        finally:
            self._tcp_connections -= 1
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    # ----- one query ----------------------------------------------------------------------------

    def receive(self, data: bytes, source: str, tcp: bool) -> bytes | asyncio.Future[bytes | None] | None:
        """The answer to one message: wire bytes now, a future (forwarded), or None (dropped)."""
        self.count("dns_queries")
        if len(data) > self.settings.max_query_size:
            self.count("dns_dropped_oversized")
            return None
        if (
            not tcp
            and (self.settings.rate_limit_loopback or not _loopback_source(source))
            and not self.limiter.allow(source, time.monotonic())
        ):
            self.count("dns_rate_limited")
            return None
        if len(data) < HEADER.size:
            self.count("dns_dropped_malformed")
            return None
        ident, flags, questions, answers, authority, additional = HEADER.unpack_from(data)
        if flags & QR:
            self.count("dns_dropped_malformed")
            return None
        # the fast path: a plain query (one question, no EDNS) for a local name answered before
        # from this same zone is the answer's bytes again under the query's id — what parsing
        # and rendering with dnspython costs (~10x) is paid once per name and zone
        # (UDP only: a UDP answer may be truncated, a TCP one never is)
        plain = not tcp and questions == 1 and answers == authority == additional == 0
        if plain:
            zone = self.zone()
            if zone is not self._answered_zone:
                self._answered.clear()
                self._cached_answers.clear()  # a name may have become local
                self._answered_zone = zone
            known = self._answered.get(data[2:4] + data[12:])
            if known is not None:
                self.count("dns_answered_local")
                return data[:2] + known
            # a cached forwarded answer rendered within the same second of its age: the same TTLs
            rendered = self._cached_answers.get(data[2:4] + data[12:])
            if rendered is not None:
                cache_key, cached_entry, age, wire = rendered
                now = time.monotonic()
                if self.cache.get(cache_key, now) is cached_entry and int(now - cached_entry.stored) == age:
                    self.count("dns_cache_hits")
                    return data[:2] + wire
        try:
            query = dns.message.from_wire(data)
            if len(query.question) != 1:
                raise ValueError("one question per query")
        except Exception:  # dnspython raises many kinds on garbage; none may reach the loop
            self.count("dns_formerr")
            return HEADER.pack(ident, QR | (flags & 0x7900) | dns.rcode.FORMERR, 0, 0, 0, 0)
        question = query.question[0]
        if query.opcode() != dns.opcode.QUERY or question.rdclass != dns.rdataclass.IN:
            self.count("dns_refused")
            return self._finish(
                query, self._status(query, dns.rcode.NOTIMP if query.opcode() != dns.opcode.QUERY else dns.rcode.REFUSED), tcp
            )
        zone = self.zone()
        qname = question.name.to_text().lower()
        answer = zone.lookup(qname)
        if answer is not None or zone.in_domain(qname):
            self.count("dns_answered_local")
            wire = self._finish(query, self._local(query, zone, answer), tcp)
            if plain and zone is self._answered_zone:
                if len(self._answered) >= ANSWERED_CACHE:
                    self._answered.clear()
                self._answered[data[2:4] + data[12:]] = wire[2:]
            return wire
        key = (qname, int(question.rdtype), int(question.rdclass))
        now = time.monotonic()
        cached = self.cache.get(key, now)
        if cached is not None:
            self.count("dns_cache_hits")
            wire = self._finish(query, self._from_cache(query, cached, now), tcp)
            if plain and zone is self._answered_zone:
                if len(self._cached_answers) >= ANSWERED_CACHE:
                    self._cached_answers.clear()
                self._cached_answers[data[2:4] + data[12:]] = (key, cached, int(now - cached.stored), wire[2:])
            return wire
        if not self.upstreams:
            self.count("dns_refused")
            return self._finish(query, self._status(query, dns.rcode.REFUSED), tcp)
        if self._forwards >= self.settings.max_forwards:
            self.count("dns_forward_busy")
            return self._finish(query, self._status(query, dns.rcode.SERVFAIL), tcp)
        # never back to the server that asked: two servers forwarding to each other would loop
        # (not on loopback, where the host's clients and a local upstream share 127.0.0.1)
        upstreams = self.upstreams if _loopback(source) else [u for u in self.upstreams if u[0] != source]
        if not upstreams:
            self.count("dns_refused")
            return self._finish(query, self._status(query, dns.rcode.REFUSED), tcp)
        return asyncio.ensure_future(self._forward(query, key, tcp, upstreams))

    def _status(self, query: dns.message.Message, rcode: int) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        response.set_rcode(dns.rcode.Rcode(rcode))
        return response

    def _local(self, query: dns.message.Message, zone: Zone, answer: Answer | None) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA | dns.flags.RA
        question = query.question[0]
        if answer is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            wanted = dns.rdatatype.to_text(question.rdtype)
            types = sorted(answer.records) if question.rdtype == dns.rdatatype.ANY else [wanted]
            for rtype in types:
                if rtype in answer.records:
                    values, ttl = answer.records[rtype]
                    response.answer.append(
                        dns.rrset.from_text_list(
                            question.name, ttl, "IN", rtype, [f'"{v}"' if rtype == "TXT" else v for v in values]
                        )
                    )
        if not response.answer and zone.in_domain(question.name.to_text()):
            # a SOA lets resolvers cache the negative answer for a bounded time (RFC 2308)
            response.authority.append(
                dns.rrset.from_text(
                    zone.domain, 60, "IN", "SOA", f"ns.{zone.domain} hostmaster.{zone.domain} 1 3600 600 86400 60"
                )
            )
        return response

    def _from_cache(self, query: dns.message.Message, cached: Cached, now: float) -> dns.message.Message:
        response = self._status(query, cached.rcode)
        elapsed = int(now - cached.stored)
        response.answer = _aged(cached.answer, elapsed)
        response.authority = _aged(cached.authority, elapsed)
        return response

    async def _forward(
        self, query: dns.message.Message, key: tuple[str, int, int], tcp: bool, upstreams: list[tuple[str, int]]
    ) -> bytes | None:
        self._forwards += 1
        try:
            question = query.question[0]
            outgoing = dns.message.make_query(question.name, question.rdtype, question.rdclass)
            outgoing.flags = dns.flags.RD if query.flags & dns.flags.RD else 0
            for host, port in upstreams:
                try:
                    upstream, _ = await dns.asyncquery.udp_with_fallback(
                        outgoing, host, timeout=self.settings.forward_timeout, port=port
                    )
                except (dns.exception.DNSException, OSError, ValueError) as exc:
                    log.debug("dns: upstream %s:%s failed for %s: %s", host, port, key[0], exc)
                    continue
                self.count("dns_forwarded")
                self.cache.put(key, upstream, time.monotonic())
                response = self._status(query, upstream.rcode())
                response.answer = list(upstream.answer)
                response.authority = list(upstream.authority)
                return self._finish(query, response, tcp)
            self.count("dns_forward_failures")
            return self._finish(query, self._status(query, dns.rcode.SERVFAIL), tcp)
        finally:
            self._forwards -= 1

    def _finish(self, query: dns.message.Message, response: dns.message.Message, tcp: bool) -> bytes:
        limit = 65535 if tcp else max(512, query.payload if query.edns >= 0 else 512)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer, response.authority, response.additional = [], [], []
            response.flags |= dns.flags.TC
            return response.to_wire(max_size=limit)

    def describe(self) -> dict[str, Any]:
        return {
            "listen": f"{self.address[0]}:{self.address[1]}",
            "upstreams": [f"{h}:{p}" for h, p in self.upstreams],
            "refused_upstreams": [f"{h}:{p}" for h, p in self.skipped_upstreams],
            "cached": len(self.cache),
        }
