"""The kairos hooks of the DNS plugin (entry point ``dns``, this module).

One :class:`Runtime` per running node (keyed by the node object's id, so several nodes in one
process each have their own): the ``dns`` bucket's records are managed through the node's local
API whether or not the server runs; the server runs with ``dns.enable`` (Kairos: ``p2p.dns``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kairos_core.plugin import (
    KairosError,
    PluginRoute,
    cli_commands_hook,
    LedgerError,
    NodeView,
    Option,
    Section,
    WritePolicy,
    hookimpl,
)

from .records import (
    BUCKET,
    TYPES,
    VPN_BUCKET,
    RecordsPolicy,
    UsageError,
    Zone,
    build_zone,
    name_problem,
    qualify,
    read_records,
    value_problem,
)
from .server import COUNTERS, DNSServer, Settings, parse_hostport, system_resolvers

log = logging.getLogger("kairos.dns")

SECTION = "dns"
#: ``/api/plugins/dns``: served here, called by the commands (``cli.py``)
ROUTE = PluginRoute("dns")

DNS = Section(
    SECTION,
    Option("enable", bool, False, "Run the DNS server. Kairos's `p2p.dns: true` sets it too.", paths=("p2p.dns",)),
    Option(
        "listen",
        str,
        "127.0.0.1:53",
        "Where it listens, UDP and TCP: IP:PORT or [IPv6]:PORT (port 0: any free "
        "port, shown by `kairos dns list`). Port 53 needs root or CAP_NET_BIND_SERVICE.",
    ),
    Option(
        "domain",
        str,
        "kairos.",
        "The network's domain: every member with a VIP is <hostname>.<domain>; names inside it are never forwarded.",
    ),
    Option("ttl", int, 60, "TTL in seconds of members' answers, and of records added without --ttl.", minimum=0, maximum=86400),
    Option(
        "forward",
        list,
        [],
        "Upstream resolvers (IP or IP:PORT) for every other name; empty: the nameservers "
        "of dns.resolv_conf. This server's own address is never used (a loop).",
        item_type=str,
    ),
    Option("resolv_conf", str, "/etc/resolv.conf", "Where the system's resolvers are read from when dns.forward is empty."),
    Option("forward_timeout", float, 2.0, "Seconds to wait for one upstream before trying the next.", minimum=0.05, maximum=60),
    Option(
        "max_forwards",
        int,
        256,
        "Forwarded queries in flight at once; more are answered SERVFAIL and counted.",
        minimum=1,
        maximum=100000,
    ),
    Option(
        "cache_size",
        int,
        10000,
        "Forwarded answers kept (least recently used dropped first); 0: no cache.",
        minimum=0,
        maximum=10_000_000,
    ),
    Option(
        "max_cache_ttl", int, 3600, "At most this many seconds an answer is cached, whatever its TTL.", minimum=0, maximum=604800
    ),
    Option(
        "negative_ttl",
        int,
        300,
        "At most this many seconds an NXDOMAIN or NODATA is cached (its SOA's minimum "
        "when lower; this when the answer has no SOA).",
        minimum=0,
        maximum=86400,
    ),
    Option(
        "rate_limit",
        float,
        5000.0,
        "Queries per second one source IP may send over UDP (a token bucket); more are dropped and counted. 0: no limit.",
        minimum=0,
        maximum=1e9,
    ),
    Option("rate_burst", float, 10000.0, "Queries one source IP may send at once above dns.rate_limit.", minimum=1, maximum=1e9),
    Option(
        "rate_limit_loopback",
        bool,
        False,
        "Apply dns.rate_limit to loopback sources too, all of them one bucket (127.0.0.1 is every "
        "program of this host, or a local stub resolver forwarding for all of them). Off: the "
        "limit is for other machines, and this host's programs are not throttled by each other.",
    ),
    Option(
        "max_query_size", int, 4096, "Bytes a query may have; larger ones are dropped and counted.", minimum=512, maximum=65535
    ),
    Option(
        "max_tcp_connections", int, 128, "TCP connections served at once; more are closed and counted.", minimum=1, maximum=100000
    ),
    Option("tcp_idle_timeout", float, 10.0, "Seconds a TCP connection may stay silent.", minimum=0.1, maximum=3600),
    Option(
        "configure_resolver",
        bool,
        False,
        "Point this host's resolver at the server while the node runs: "
        "dns.resolv_conf gets `nameserver <dns.listen's IP>` (127.0.0.1 for a wildcard; the port must be 53) and "
        "keeps its other lines; the file as it was is kept in the state dir, written back at shutdown (or at the "
        "next start after a crash), and its nameservers stay the upstreams.",
    ),
    help="A DNS server for the network's names (kairos-plugin-dns): members' VIPs as <hostname>.<domain>, "
    "records of the `dns` ledger bucket (`kairos dns`), everything else forwarded.",
)

ZONE_REFRESH = 1.0  # seconds: claims lapse and members leave without a ledger write to watch


class Runtime:
    """The plugin on one node: the zone from the ledger, record edits, and the server."""

    def __init__(self, node: NodeView) -> None:
        self.node = node
        self.settings = DNS.read(node.config[SECTION])
        self.domain = normal_domain(self.settings.domain)
        self.server: DNSServer | None = None
        self._zone: Zone | None = None
        self._built = 0.0

    def zone(self) -> Zone:
        now = time.monotonic()
        if self._zone is None or now - self._built >= ZONE_REFRESH:
            hostnames = {peer_id: info.get("hostname") for peer_id, info in self.node.members().items()}
            hostnames[self.node.peer_id] = self.node.hostname
            self._zone = build_zone(
                self.domain, self.settings.ttl, self.node.ledger.items(BUCKET), self.node.ledger.items(VPN_BUCKET), hostnames
            )
            self._built = now
        return self._zone

    async def _watch(self) -> None:
        async for update in self.node.ledger.watch():
            if update.bucket in (BUCKET, VPN_BUCKET, "nodes"):
                self._zone = None

    async def start(self) -> None:
        for name, help_text in COUNTERS.items():
            self.node.counter(name, help_text)
        if not self.settings.enable:
            return
        listen = parse_hostport(self.settings.listen)
        # A crash left ours in place: the upstreams are in the backup. Restored whether or not
        # configure_resolver is still on (turned off after a crash, the host would keep pointing
        # at a server that no longer runs).
        self._restore_resolver()
        upstreams = (
            [parse_hostport(item) for item in self.settings.forward]
            if self.settings.forward
            else system_resolvers(Path(self.settings.resolv_conf))
        )
        s = self.settings
        self.server = DNSServer(
            Settings(
                listen,
                tuple(upstreams),
                s.max_query_size,
                s.rate_limit,
                s.rate_burst,
                s.cache_size,
                s.max_cache_ttl,
                s.negative_ttl,
                s.forward_timeout,
                s.max_forwards,
                s.max_tcp_connections,
                s.tcp_idle_timeout,
                s.rate_limit_loopback,
            ),
            self.zone,
            self.node.count,
        )
        try:
            await self.server.start()
        except OSError as exc:
            self.server = None
            self.node.set_state("dns", f"cannot listen on {s.listen}: {exc.strerror or exc}")
            log.error("dns: cannot listen on %s: %s", s.listen, exc)
            return
        self.node.spawn(self._watch(), "dns zone watch")
        for host, port in self.server.skipped_upstreams:
            log.warning("dns: not forwarding to %s:%s: it is this server (a loop)", host, port)
        if not self.server.upstreams:
            log.warning("dns: no upstream resolver: names outside %s are refused", self.domain)
        log.info("dns: serving %s on %s:%s (UDP, TCP)", self.domain, *self.server.address)
        if self.settings.configure_resolver:
            self._point_resolver(listen[0])

    async def stop(self) -> None:
        if self.settings.configure_resolver:
            self._restore_resolver()
        if self.server is not None:
            await self.server.stop()

    # ----- dns.configure_resolver ---------------------------------------------------------------

    @property
    def _backup(self) -> Path:
        return Path(self.node.config["node"]["state_dir"]) / "dns-resolv.conf.before"

    def _point_resolver(self, ip: str) -> None:
        path = Path(self.settings.resolv_conf)
        if ipaddress.ip_address(ip).is_unspecified:
            ip = "::1" if ":" in ip else "127.0.0.1"
        try:
            if self._backup.exists():
                # an earlier restore failed: the file now is ours, the backup the user's; never
                # overwrite the only copy of their file with ours
                log.error("dns: %s still holds the file as it was before kairos; not pointing %s again", self._backup, path)
                self.node.set_state("dns", f"{path} not restored from {self._backup}: restore it by hand")
                return
            before = path.read_text() if path.exists() else ""
            self._backup.write_text(before)
            kept = [line for line in before.splitlines() if line.split()[:1] != ["nameserver"]]
            # written in place (not renamed over): the file may be a bind mount or a symlink's target
            path.write_text(
                f"# written by kairos-plugin-dns while the node runs (dns.configure_resolver);\n"
                f"# the file as it was: {self._backup}\nnameserver {ip}\n" + "".join(f"{line}\n" for line in kept)
            )
        except OSError as exc:
            self.node.set_state("dns", f"cannot write {path}: {exc.strerror or exc}")
            log.error("dns: cannot point %s at the server: %s", path, exc)
            return
        log.info("dns: %s points at %s (the earlier file is %s)", path, ip, self._backup)

    def _restore_resolver(self) -> None:
        if not self._backup.exists():
            return
        try:
            Path(self.settings.resolv_conf).write_text(self._backup.read_text())
            self._backup.unlink()
        except OSError as exc:
            log.error("dns: cannot restore %s from %s: %s", self.settings.resolv_conf, self._backup, exc)

    # ----- records (the local API) --------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        return [
            {"name": name, "type": rtype, "values": list(values), "ttl": ttl}
            for name, rtype, values, ttl in read_records(self.node.ledger.items(BUCKET))
        ]

    def add(self, body: Any) -> dict[str, Any]:
        name, rtype = self._name_type(body, required_type=True)
        assert rtype is not None  # required_type
        value = body.get("value")
        problem = value_problem(rtype, value)
        if problem:
            raise UsageError(f"{rtype} value: {problem}")
        ttl = body.get("ttl")
        ttl = self.settings.ttl if ttl is None else ttl
        key = f"{name}/{rtype}"
        current = self.node.ledger.get(BUCKET, key)
        values = list(current["values"]) if isinstance(current, dict) and isinstance(current.get("values"), list) else []
        if value not in values:
            values.append(value)
        self._write(key, {"values": values, "ttl": ttl})
        return {"name": name, "type": rtype, "values": values, "ttl": ttl}

    def remove(self, body: Any) -> dict[str, Any]:
        name, rtype = self._name_type(body, required_type=False)
        value = body.get("value")
        removed = []
        for each in [rtype] if rtype else list(TYPES):
            key = f"{name}/{each}"
            current = self.node.ledger.get(BUCKET, key)
            if not isinstance(current, dict):
                continue
            # without a value every value goes; with one, only that one
            values = [v for v in current.get("values", []) if value is not None and v != value]
            if value is not None and len(values) == len(current.get("values", [])):
                continue
            if values:
                self._write(key, {"values": values, "ttl": current["ttl"]})
            else:
                self.node.ledger.delete(BUCKET, key)
                self._zone = None
            removed.append(each)
        if not removed:
            raise UsageError(f"no record {name} {rtype or ''} {value or ''}".strip())
        return {"name": name, "removed": removed}

    def _name_type(self, body: Any, required_type: bool) -> tuple[str, str | None]:
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise UsageError("the body must be a JSON object with a name")
        name = qualify(body["name"], self.domain)
        rtype = body.get("type")
        if rtype is None and not required_type:
            return name, None
        if not isinstance(rtype, str) or rtype.upper() not in TYPES:
            raise UsageError(f"record type {rtype!r}: one of {', '.join(TYPES)}")
        return name, rtype.upper()

    def _write(self, key: str, value: dict[str, Any]) -> None:
        try:
            self.node.ledger.set(BUCKET, key, value)
            self._zone = None  # served from the next query on (the watch sees it a moment later)
        except LedgerError as exc:
            raise UsageError(f"the ledger refused {key}: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "records": self.records(),
            "server": self.server.describe() if self.server is not None else None,
        }


def normal_domain(domain: str) -> str:
    domain = domain.strip().lower()
    return domain if domain.endswith(".") else domain + "."


_RUNTIMES: dict[int, Runtime] = {}


def runtime(node: NodeView) -> Runtime:
    """The plugin's runtime on ``node`` (for tests and tools in the node's process)."""
    found = _RUNTIMES.get(id(node))
    if found is None:
        raise KairosError("the dns plugin is not running on this node")
    return found


@hookimpl
def kairos_config_schema() -> list[Section]:
    return [DNS]


@hookimpl
def kairos_config_problems(config: Mapping[str, Mapping[str, Any]]) -> list[str]:
    section = config[SECTION]
    problems = []
    try:
        parse_hostport(section["listen"])
    except ValueError as exc:
        problems.append(f"dns.listen: {exc}")
    for index, item in enumerate(section["forward"]):
        try:
            if parse_hostport(item)[1] == 0:
                problems.append(f"dns.forward[{index}]: the port must not be 0")
        except ValueError as exc:
            problems.append(f"dns.forward[{index}]: {exc}")
    try:
        if section["configure_resolver"] and parse_hostport(section["listen"])[1] != 53:
            problems.append("dns.configure_resolver: resolv.conf names no port: dns.listen must be on port 53")
    except ValueError:
        pass
    problem = name_problem(normal_domain(section["domain"]))
    if problem or normal_domain(section["domain"]).startswith("*."):
        problems.append(f"dns.domain {section['domain']!r}: {problem or 'no wildcard'}")
    return problems


@hookimpl
def kairos_ledger_policies() -> Mapping[str, WritePolicy]:
    """``dns`` holds records ``<name>/<type>``; any member may write one, only records are accepted."""
    return {BUCKET: RecordsPolicy()}


@hookimpl
async def kairos_startup(node: NodeView) -> None:
    runtime = _RUNTIMES[id(node)] = Runtime(node)
    await runtime.start()


@hookimpl
async def kairos_shutdown(node: NodeView) -> None:
    runtime = _RUNTIMES.pop(id(node), None)
    if runtime is not None:
        await asyncio.shield(runtime.stop())


def _route(node: NodeView, method: str, rest: list[str], body: Any) -> Any:
    """``/api/plugins/dns``: GET (records and server), POST add|rm (JSON body)."""
    current = runtime(node)
    if method == "GET" and not rest:
        return current.describe()
    if method == "POST" and rest == ["add"]:
        return current.add(body)
    if method == "POST" and rest == ["rm"]:
        return current.remove(body)
    raise ROUTE.unknown(method, rest)


kairos_api_routes = ROUTE.api_routes_hook(_route)
kairos_cli_commands = cli_commands_hook("kairos_plugin_dns.cli:dns_group")
