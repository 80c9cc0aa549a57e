"""LAN discovery over multicast DNS (service ``_kairos._udp.local.``).

Each node registers one instance named ``<rendezvous>-<tag>``: the DHT rendezvous name of the
current window (32 hex chars, derived from the token) and a 12-hex tag hashed from its peer id, so
that several nodes of one network can be registered side by side. The TXT record carries the peer
id and the node's concrete multiaddrs. Nodes browse the service type and react only to instances
named after the current or the previous window's rendezvous name: a node holding another token
derives other names and never learns of us (nor we of it). The instance name is re-registered
when the window rotates.

The TXT record's codec is :mod:`.txt`, the multiaddr grammar :mod:`kairos_core.multiaddrs`.

This module only discovers: it reports ``(peer_id, multiaddrs)`` to a callback and leaves dialling
(and admission) to the caller. Everything read from the LAN is untrusted: a malformed TXT record
is dropped and counted, never raised.

Speed: zeroconf probes a new name three times (~0.75 s) before it announces it. Our instance
names embed a hash of the peer id, so a conflict means the *same* node twice; we register as a
cooperating responder, which skips probing and announces at once. Browsers send their first query
20-120 ms after start, and every peer's announcement reaches browsers that already run, so a LAN
discovers itself in well under a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass

from zeroconf import DNSPointer, InterfaceChoice, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .. import multiaddrs
from ..keys import KeySchedule
from .txt import (
    MAX_ADDRS,
    Announcement,
    MalformedAnnouncement,
    decode_txt,
    encode_txt,
    pack_txt,
    unpack_txt,
    usable_multiaddr,
)

log = logging.getLogger(__name__)

# The codec's names, imported from here before it had a module of its own.
__all__ = [
    "MAX_ADDRS",
    "SERVICE_TYPE",
    "Announcement",
    "MDNSCounters",
    "MDNSDiscovery",
    "MalformedAnnouncement",
    "decode_txt",
    "encode_txt",
    "instance_matches",
    "instance_name",
    "node_tag",
    "pack_txt",
    "split_instance",
    "unpack_txt",
    "usable_multiaddr",
]

SERVICE_TYPE = "_kairos._udp.local."
TAG_LENGTH = 12
# Resolutions running at once; a flood of matching names beyond this is dropped and counted.
MAX_PENDING_RESOLUTIONS = 64
RESOLVE_TIMEOUT_MS = 3000
# What a node multicasts when the window rotates (see MDNSDiscovery._swap): one goodbye for the
# old name and two announcements of the new, this many seconds apart.
ROTATION_PACKETS = 3
ROTATION_ANNOUNCE_GAP = 1.0
# When discovery has had its look around (:meth:`MDNSDiscovery.looked`): this long after our own
# announcement came back to us — our query went out before it, and peers answer a query within
# 20-120 ms (RFC 6762 §6) plus whatever their load adds. A LAN that never loops our multicast
# back to us counts as looked at LOOK_LIMIT after the start.
ANSWER_WINDOW = 1.0
LOOK_LIMIT = 10.0

_DNS_TYPE_PTR = 12
_DNS_CLASS_IN = 1
_INSTANCE_RE = re.compile(rf"^([0-9a-f]{{32}})-([0-9a-f]{{{TAG_LENGTH}}})$")

FoundCallback = Callable[[str, list[str]], Awaitable[None] | None]


@dataclass
class MDNSCounters:
    """What discovery saw; every drop has a counter so garbage on the LAN stays visible."""

    registrations: int = 0
    rotations: int = 0
    seen: int = 0
    foreign: int = 0
    own: int = 0
    found: int = 0
    duplicates: int = 0
    malformed: int = 0
    unresolved: int = 0
    dropped_busy: int = 0
    callback_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a plain dict (for logs, JSON and the local API)."""
        return asdict(self)


# --- names ---------------------------------------------------------------------------------------
def node_tag(peer_id: str) -> str:
    """The 12-hex suffix that makes a node's instance name unique among token holders."""
    return hashlib.sha256(b"kairos/v1/mdns-node\0" + peer_id.encode()).hexdigest()[:TAG_LENGTH]


def instance_name(rendezvous: str, peer_id: str) -> str:
    """The instance name a node registers in one window: ``<rendezvous>-<tag>``."""
    return f"{rendezvous}-{node_tag(peer_id)}"


def split_instance(name: str) -> tuple[str, str] | None:
    """``(rendezvous, tag)`` of an instance name (bare or with the service type), else ``None``."""
    suffix = "." + SERVICE_TYPE
    if name.endswith(suffix):
        name = name[: -len(suffix)]
    match = _INSTANCE_RE.match(name)
    return (match.group(1), match.group(2)) if match else None


def instance_matches(name: str, accepted: Iterable[str]) -> bool:
    """True when ``name`` is a kairos instance named after one of the ``accepted`` rendezvous names."""
    parts = split_instance(name)
    return parts is not None and parts[0] in set(accepted)


# --- addresses for the SRV and A/AAAA records -------------------------------------------------
def _ip_addresses(addrs: Iterable[str]) -> list[str]:
    found: list[str] = []
    for addr in addrs:
        ip = multiaddrs.host_ip(addr)
        if ip is not None and str(ip) not in found:
            found.append(str(ip))
    return found


def _first_port(addrs: Iterable[str]) -> int:
    for addr in addrs:
        for protocol, value in multiaddrs.components(addr) or ():
            if protocol in ("tcp", "udp") and value is not None and 0 < int(value) < 65536:
                return int(value)
    return 9  # "discard": the SRV record needs some port, and ours live in the TXT record


# --- the service ---------------------------------------------------------------------------------
@dataclass
class _Registration:
    rendezvous: str
    addrs: tuple[str, ...]
    info: AsyncServiceInfo


class MDNSDiscovery:
    """Announce this node on the LAN and report the token holders it finds.

    ``addresses`` is the list of our multiaddrs, or a callable giving it (read at every
    (re-)registration). ``on_found(peer_id, addrs)`` may be a plain or an ``async`` function; it
    runs once per peer, and again only when that peer's addresses change. ``interfaces`` are the
    IP addresses to run mDNS on (default: all). ``rotation_poll`` caps the sleep between window
    checks, so a clock that jumps (or a test's fake clock) is noticed within that many seconds.
    """

    def __init__(
        self,
        schedule: KeySchedule,
        peer_id: str,
        addresses: Callable[[], list[str]] | list[str],
        on_found: FoundCallback,
        *,
        interfaces: list[str] | None = None,
        rotation_poll: float = 5.0,
    ) -> None:
        self.schedule = schedule
        self.peer_id = peer_id
        self.tag = node_tag(peer_id)
        self._addresses = addresses
        self._on_found = on_found
        self._interfaces = interfaces
        self._rotation_poll = rotation_poll
        self.counters = MDNSCounters()
        self._known: dict[str, tuple[str, ...]] = {}
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._registration: _Registration | None = None
        self._rotation_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._resolving: set[str] = set()
        self._resolved: set[str] = set()
        self._lock = asyncio.Lock()
        self._started_at: float | None = None
        self._heard_self_at: float | None = None

    # --- public ------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._azc is not None

    @property
    def known_peers(self) -> dict[str, tuple[str, ...]]:
        """Peers reported so far, with the addresses last reported."""
        return dict(self._known)

    @property
    def announced_name(self) -> str | None:
        """The instance name registered now (without the service type)."""
        reg = self._registration
        return instance_name(reg.rendezvous, self.peer_id) if reg else None

    def looked(self) -> bool:
        """Whether discovery has had its look around: the peers on the LAN that answer had the time to.

        On a loaded machine the first answers take longer than any fixed grace: what shows that
        our queries and their answers go through is our own announcement coming back to us (the
        query went out before it), and the answers are given ANSWER_WINDOW after that. The
        election's lone node waits for it (``Node._joined``): a node alone by every sign it has
        may still be one whose discovery has not run yet.
        """
        if self._started_at is None:
            return False
        now = time.monotonic()
        if self._heard_self_at is not None and now - self._heard_self_at >= ANSWER_WINDOW:
            return True
        return now - self._started_at >= LOOK_LIMIT

    def accepted_rendezvous(self) -> tuple[str, ...]:
        """The rendezvous names whose instances we react to now: windows w, w-1 and w+1.

        The next window's name is accepted too (docs/architecture.md §3), so a peer whose clock runs up to one
        interval ahead is found at once rather than at our next rotation.
        """
        return (*self.schedule.current_rendezvous(), self.schedule.rendezvous(self.schedule.dht_window() + 1))

    async def start(self) -> None:
        """Join mDNS, browse for peers, and announce ourselves (``ValueError``: no usable address)."""
        if self._azc is not None:
            return
        addrs = self._current_addresses()
        if not addrs:
            raise ValueError("MDNSDiscovery needs at least one concrete multiaddr to announce")
        interfaces = InterfaceChoice.All if self._interfaces is None else list(self._interfaces)
        self._azc = AsyncZeroconf(interfaces=interfaces)
        try:
            # Browse before announcing: replies to our first query and the announcements of
            # nodes starting at the same moment are then caught, not left to the next query.
            self._browser = AsyncServiceBrowser(self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_state_change])
            await self._register(self.schedule.current_rendezvous()[0], addrs)
        except BaseException:
            await self._close_zeroconf()
            raise
        self._started_at = time.monotonic()
        self._rotation_task = asyncio.create_task(self._rotation_loop(), name="mdns-rotation")

    async def stop(self) -> None:
        """Withdraw our announcement (goodbye packets) and leave mDNS. Idempotent."""
        if self._azc is None:
            return
        tasks = [t for t in (self._rotation_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._rotation_task = None
        self._tasks.clear()
        await self._close_zeroconf()

    async def refresh(self) -> None:
        """Re-register if the DHT window rotated or our addresses changed; called periodically."""
        if self._azc is None:
            return
        async with self._lock:
            current = self.schedule.current_rendezvous()[0]
            reg = self._registration
            addrs = self._current_addresses()
            if not addrs:
                log.warning("mdns: no concrete address to announce; keeping the previous announcement")
                addrs = list(reg.addrs) if reg else []
            if not addrs:
                return
            if reg is not None and reg.rendezvous == current and reg.addrs == tuple(addrs):
                return
            rotated = reg is not None and reg.rendezvous != current
            if rotated and reg is not None:
                self._swap(reg, current, addrs)
            else:
                if reg is not None:
                    # Goodbye for the old name; peers keep what they learnt from it.
                    await self._azc.async_unregister_service(reg.info)
                    self._registration = None
                await self._register(current, addrs)
            if rotated:
                self.counters.rotations += 1
                accepted = self.accepted_rendezvous()
                self._resolved = {n for n in self._resolved if instance_matches(n, accepted)}
                self._rescan_cache()

    # --- registration ------------------------------------------------------------------------
    def _current_addresses(self) -> list[str]:
        source = self._addresses
        try:
            addrs = list(source() if callable(source) else source)
        except Exception:
            log.exception("mdns: the addresses callable failed")
            return []
        return [a for a in addrs if usable_multiaddr(a)][:MAX_ADDRS]

    def _service_info(self, rendezvous: str, addrs: list[str]) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            f"{instance_name(rendezvous, self.peer_id)}.{SERVICE_TYPE}",
            port=_first_port(addrs),
            properties=encode_txt(self.peer_id, addrs),
            server=f"kairos-{self.tag}.local.",
            parsed_addresses=_ip_addresses(addrs) or None,
        )

    async def _register(self, rendezvous: str, addrs: list[str]) -> None:
        assert self._azc is not None
        info = self._service_info(rendezvous, addrs)
        # Cooperating responder = no probing (see the module docstring for why this is safe).
        await self._azc.async_register_service(info, cooperating_responders=True)
        self._registration = _Registration(rendezvous, tuple(addrs), info)
        self.counters.registrations += 1
        log.debug("mdns: announced %s with %d addresses", info.name, len(addrs))

    def _swap(self, reg: _Registration, rendezvous: str, addrs: list[str]) -> None:
        """The window rotated: replace our name with the new one in ROTATION_PACKETS packets.

        Every node of a network rotates at the same moment, and every node on the LAN receives
        every multicast packet, so what one rotation sends is multiplied by N at every node.
        zeroconf's unregister and register send three goodbyes and three announcements each
        (~105 KB received per node per rotation at N = 50, docs/scaling.md); here one goodbye
        without the address records (the host name stays: the new name points to it), and two
        announcements 1 s apart, RFC 6762 §8.3's minimum.
        """
        assert self._azc is not None
        zc = self._azc.zeroconf
        info = self._service_info(rendezvous, addrs)
        info.set_server_if_missing()
        zc.registry.async_remove(reg.info)
        zc.registry.async_add(info)  # our responder answers for the new name from now on
        zc.async_send(zc.generate_service_broadcast(reg.info, 0, broadcast_addresses=False))
        zc.async_send(zc.generate_service_broadcast(info, None))
        self._registration = _Registration(rendezvous, tuple(addrs), info)
        self.counters.registrations += 1
        task = asyncio.get_running_loop().create_task(self._announce_again(info))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        log.debug("mdns: rotated to %s", info.name)

    async def _announce_again(self, info: AsyncServiceInfo) -> None:
        await asyncio.sleep(ROTATION_ANNOUNCE_GAP)
        reg = self._registration
        if self._azc is not None and reg is not None and reg.info is info:  # not rotated again meanwhile
            self._azc.zeroconf.async_send(self._azc.zeroconf.generate_service_broadcast(info, None))

    async def _rotation_loop(self) -> None:
        while True:
            interval = self.schedule.token.dht.interval
            now = self.schedule.clock()
            until_next = interval - (now % interval)
            await asyncio.sleep(max(0.05, min(until_next + 0.01, self._rotation_poll)))
            try:
                await self.refresh()
            except Exception:
                log.exception("mdns: re-registration failed; retrying at the next check")

    async def _close_zeroconf(self) -> None:
        azc, self._azc = self._azc, None
        self._browser = None
        self._registration = None
        if azc is not None:
            # async_close cancels the browser and sends goodbyes for what is registered.
            await azc.async_close()

    # --- browsing ----------------------------------------------------------------------------
    def _on_state_change(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            return  # liveness is membership's business, not discovery's
        self.counters.seen += 1
        self._consider(name)

    def _consider(self, name: str, rescan: bool = False) -> None:
        parts = split_instance(name)
        if parts is None or parts[0] not in self.accepted_rendezvous():
            self.counters.foreign += 1
            return
        if parts[1] == self.tag:
            self.counters.own += 1
            if self._heard_self_at is None:
                self._heard_self_at = time.monotonic()
            return
        if name in self._resolving or (rescan and name in self._resolved):
            return
        if len(self._tasks) >= MAX_PENDING_RESOLUTIONS:
            self.counters.dropped_busy += 1
            return
        self._resolving.add(name)
        task = asyncio.get_running_loop().create_task(self._resolve(name, parts[1]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _rescan_cache(self) -> None:
        # Names from a window we did not accept yet (a peer whose clock runs ahead) were
        # ignored when they arrived; the browser will not report them again, so look again.
        if self._azc is None:
            return
        cache = self._azc.zeroconf.cache
        for record in cache.async_all_by_details(SERVICE_TYPE, _DNS_TYPE_PTR, _DNS_CLASS_IN):
            if isinstance(record, DNSPointer):
                self._consider(record.alias, rescan=True)

    async def _resolve(self, name: str, tag: str) -> None:
        try:
            if self._azc is None:
                return
            zc = self._azc.zeroconf
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            # Announcements carry the TXT record; only ask the network when it is not cached.
            info.load_from_cache(zc)
            if not info.text:
                await info.async_request(zc, RESOLVE_TIMEOUT_MS)
            if not info.text:
                self.counters.unresolved += 1
                return
            try:
                announcement = decode_txt(info.text)
                if node_tag(announcement.peer_id) != tag:
                    raise MalformedAnnouncement("instance tag does not match the peer id")
            except MalformedAnnouncement as exc:
                self.counters.malformed += 1
                log.debug("mdns: dropped %s: %s", name, exc)
                return
            self._resolved.add(name)
            await self._report(announcement)
        finally:
            self._resolving.discard(name)

    async def _report(self, announcement: Announcement) -> None:
        if announcement.peer_id == self.peer_id:
            self.counters.own += 1
            return
        if self._known.get(announcement.peer_id) == announcement.addrs:
            self.counters.duplicates += 1
            return
        self._known[announcement.peer_id] = announcement.addrs
        self.counters.found += 1
        try:
            result = self._on_found(announcement.peer_id, list(announcement.addrs))
            if inspect.isawaitable(result):
                await result
        except Exception:
            self.counters.callback_errors += 1
            log.exception("mdns: on_found failed for %s", announcement.peer_id)
