"""The VPN of one node: its VIP, the TUN device, a session per peer, and which path each uses.

:class:`VPN` ties the pieces to a running node (a :class:`kairos_core.plugin.NodeView`):

- **Address** — claims a VIP in the ``vpn`` bucket (:mod:`.addressing`), refreshes the claim
  every ``claim_ttl / 4`` so that it does not lapse, moves when it loses a conflict, and keeps the
  TUN device's address in step. Claims of nodes gone for good lapse after ``claim_ttl``.
- **Sessions** — per-pair keys over ``/kairos/vpn/keys/1.0.0`` (:mod:`.keyexchange`), installed in
  the data plane with the peer's VIP and UDP endpoint (its advertised IP + its claim's port).
- **Links** — every ``keepalive_interval`` a tiny datagram goes to each peer's VIP (through the
  kernel, so through the data plane). A peer from which no authentic UDP datagram arrived within
  ``udp_timeout`` is reached over the fallback stream (:mod:`.fallback`); every
  ``UDP_RETRY_INTERVAL`` UDP is tried again for a moment, and a peer heard over UDP again is
  switched back.
- **Status** — data-plane counters go to the node's counters as ``vpn_*``; the path to each peer
  is published under ``vpn/<peer_id>/links`` for ``kairos vpn status``.

Everything runs on the node's event loop except the data plane's own threads.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from kairos_core.plugin import SKIP, Alias, ConfigError, Option, Section, multiaddr_ip, text_value

from . import keyexchange, punch
from .addressing import Claim, choose_address, decode_claim, holders, parse_claim, read_claims, usable, wall_clock_ms
from .crypto import SessionKeys
from .fallback import PACKETS_PROTOCOL, FallbackSender, PathHysteresis, read_datagrams, udp_target
from .keyexchange import KEYS_PROTOCOL, ExchangeError
from .nodeplane import NodeDataPlane, parking_address
from .punch import PUNCH_PROTOCOL, PunchState
from .paths import DIRECT, PUNCHED, RELAY, STREAM, Path, PathLadder, PathSource
from .relaydgram import MAX_MESSAGE as RELAY_MAX_MESSAGE
from .relaydgram import RELAY_MODES, RELAY_PROTOCOL, RelayLimits, RelayMessageError, RelayTable
from .relaydgram import decode as decode_relay
from .relaydgram import encode as encode_relay
from .tun import TunDevice, TunUnavailable

if TYPE_CHECKING:
    from kairos_core.plugin import NodeView

log = logging.getLogger("kairos.vpn")

BUCKET = "vpn"
# The connection manager keeps a peer's libp2p connection while this tag holds it (stream path).
PROTECTION_TAG = "tunvpn"
MIN_CLAIM_TTL = 2.0
MAX_CLAIM_TTL = 30 * 86400.0
_EDGEVPN = "p2p.vpn.env."
#: The VPN's network when neither vpn.cidr nor a static address with a prefix says otherwise.
DEFAULT_CIDR = "10.1.0.0/24"
_NO_DNS = "DNS needs a DNS plugin (kairos-plugin-dns), which is not installed"


def _dhcp(value: Any) -> Any:
    # EdgeVPN's DHCP: "true" negotiates the address among the peers, as vpn.address "auto" does;
    # "false" leaves ADDRESS (or our default) in charge.
    value = text_value(value)
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return "auto" if value else SKIP


def _edgevpn_variable(name: str, why: str) -> Option:
    return Option(name, None, None, f"EdgeVPN's {name}.", no_effect=why)


#: EdgeVPN's variables in ``p2p.vpn.env`` that have no meaning here (each warns once when set);
#: those that do are declared on the options they set (``paths``: ADDRESS, DHCP, IFACE, EDGEVPNMTU
#: here, EDGEVPNDHT, EDGEVPNMDNS, EDGEVPNMAXCONNS, EDGEVPNBOOTSTRAPPEERS … in the core's p2p section).
ENV = Section(
    "env",
    _edgevpn_variable(
        "EDGEVPNLOWPROFILEVPN",
        "tunvpn has no low-profile mode: it keeps at most p2p.connections.high connections and dials VPN members on demand",
    ),
    _edgevpn_variable(
        "EDGEVPNLOWPROFILE",
        "tunvpn has no low-profile mode: it keeps at most p2p.connections.high connections and dials VPN members on demand",
    ),
    _edgevpn_variable("DNSFORWARD", _NO_DNS),
    _edgevpn_variable("DNSADDRESS", _NO_DNS),
    _edgevpn_variable("DNSCACHESIZE", _NO_DNS),
    _edgevpn_variable("DNSFORWARDSERVER", _NO_DNS),
    _edgevpn_variable("DHCPLEASEDIR", "VIP claims live in the ledger (bucket vpn), not in lease files"),
    _edgevpn_variable("API", "the node's API is always a unix socket (api.enable, api.socket)"),
    _edgevpn_variable("APILISTEN", "the node's API is always a unix socket (api.enable, api.socket)"),
    _edgevpn_variable("EDGEVPNLOGLEVEL", "set node.log_level (Kairos: p2p.loglevel)"),
    _edgevpn_variable("EDGEVPNLIBP2PLOGLEVEL", "set node.log_level (Kairos: p2p.loglevel)"),
    help="Kairos's p2p.vpn.env: EdgeVPN's environment. Variables with a meaning here set the option named in its "
    "help (ADDRESS is vpn.address, EDGEVPNMAXCONNS p2p.connections.high …); the others warn.",
    unknown="warn",
    unknown_note="an EdgeVPN variable kairos-plugin-tunvpn does not use",
)
#: The ``vpn`` config section (Kairos users write it as ``p2p.vpn``).
SECTION = Section(
    "vpn",
    Option("create", bool, True, "Create the TUN device and run the data plane (false: no VPN on this node)."),
    Option(
        "use",
        bool,
        True,
        "Run Kubernetes (k3s) over the VPN: its node address and flannel interface are the "
        "VPN's (false: the machines' own addresses).",
    ),
    Option("interface", str, "edgevpn0", "Name of the TUN device.", paths=(f"{_EDGEVPN}IFACE",)),
    Option(
        "address",
        str,
        "auto",
        'This node\'s VIP: "auto" (conflict-free from `cidr`) or a static "10.1.0.5/24".',
        paths=(Alias(f"{_EDGEVPN}DHCP", parse=_dhcp), f"{_EDGEVPN}ADDRESS"),
    ),
    Option(
        "cidr",
        str,
        "",
        "The VPN's network (/30 or larger): automatic VIPs come from it, and it is routed into the device. "
        "Empty: the network of a static address with a prefix (EdgeVPN's ADDRESS: 10.2.0.5/24 is 10.2.0.0/24, "
        f"as in Kairos), else {DEFAULT_CIDR}. Nodes taking automatic addresses need the same network: set it "
        "where some nodes have static addresses outside the default.",
    ),
    Option(
        "mtu",
        int,
        1420,
        "MTU of the TUN device.",
        minimum=576,
        maximum=9000,
        paths=(Alias(f"{_EDGEVPN}EDGEVPNMTU", parse=text_value),),
    ),
    Option(
        "port",
        int,
        0,
        "UDP port of the data plane; 0 = picked by the system (published in the ledger).",
        minimum=0,
        maximum=65535,
    ),
    Option("udp", bool, True, "Use direct UDP when it gets through (false: always the libp2p stream)."),
    Option("keepalive_interval", float, 1.0, "Seconds between keepalives to each peer.", minimum=0.05),
    Option(
        "udp_timeout",
        float,
        5.0,
        "Seconds without an authentic UDP datagram from a peer before its packets take the stream.",
        minimum=0.1,
    ),
    Option(
        "claim_ttl",
        float,
        86400.0,
        "Seconds a VIP claim lasts unless its node refreshes it (every claim_ttl / 4): the address of a node "
        "gone for good is free again after this long (at most 30 days). Long next to clock skew between nodes.",
        minimum=int(MIN_CLAIM_TTL),
        maximum=int(MAX_CLAIM_TTL),
    ),
    Option(
        "relay",
        str,
        "auto",
        "Forward other peers' sealed VPN datagrams between two peers that have no UDP path to each other "
        "(the relay never holds their keys; limits per peer are p2p.relay's): auto = while p2p.relay.enable is on "
        "and this node is publicly reachable; always = whenever both reach this node over UDP (B and C blocked, "
        "both reach A); off = never.",
        choices=RELAY_MODES,
    ),
    Option(
        "relay_max_bytes",
        int,
        64 << 30,
        "Bytes (both ways) one relayed VPN session may carry through this node before it ends (the pair falls "
        "back to the stream and may ask again later). p2p.relay's max_circuits and max_duration limit "
        "relayed VPN sessions per peer too; its max_bytes, meant for libp2p connections, would end a VPN "
        "session at full speed in seconds.",
        minimum=1 << 20,
    ),
    ENV,
    help="The VPN between the nodes (tunvpn): a TUN device, a VIP per node, direct UDP or the libp2p stream.",
    aliases=("p2p.vpn",),
)
DEFAULTS: dict[str, Any] = SECTION.defaults()
UDP_RETRY_INTERVAL = 10.0
EXCHANGE_RETRY = 2.0
EARLY_PROBES = 5.0
# A session from which nothing authentic arrives for this long (keepalives flow every second)
# is renegotiated: the two ends may hold different keys after a crash mid-exchange.
SILENCE_REKEY = 30.0
# A relay that refused, or whose path fell silent, is not asked again for this pair this long.
RELAY_BACKOFF = 30.0
# A new link asks for a relay only once UDP had this long to answer its first probes: every link
# starts on the stream, and on a LAN (where every node may relay) asking at once cost a relay
# session and an offer for each new link, all of them unused a moment later.
RELAY_ASK_DELAY = 0.5
RELAY_TIMEOUT = 10.0
NODES_BUCKET = "nodes"
DISCARD_PORT = 9


class VPNConfigError(ValueError):
    """The ``vpn`` section is inconsistent (bad CIDR, static address outside it, ...)."""


@dataclass(frozen=True)
class VPNSettings:
    """The ``vpn`` config section, checked."""

    create: bool
    interface: str
    static: ipaddress.IPv4Interface | None
    network: ipaddress.IPv4Network
    mtu: int
    port: int
    udp: bool
    keepalive_interval: float
    udp_timeout: float
    claim_ttl: float = DEFAULTS["claim_ttl"]
    relay: str = DEFAULTS["relay"]
    relay_max_bytes: int = DEFAULTS["relay_max_bytes"]

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> "VPNSettings":
        """Check and convert ``node.config["vpn"]``; :class:`VPNConfigError` names the problem.

        Types and ranges are the schema's (:data:`SECTION`); what it cannot say is checked here:
        the CIDR parses and is large enough, a static address is a host address inside it. Without
        a ``cidr``, a static address with a prefix gives the network (EdgeVPN's ``ADDRESS``).
        """
        try:
            given = SECTION.read(section)
        except ConfigError as exc:
            raise VPNConfigError(exc.problems[0] if exc.problems else str(exc)) from None
        static = None
        if given.address.strip().lower() != "auto":
            try:
                static = ipaddress.IPv4Interface(given.address)
            except ValueError as exc:
                raise VPNConfigError(f"vpn.address: {exc}") from None
        prefixed = static is not None and "/" in given.address
        if given.cidr.strip():
            try:
                network = ipaddress.IPv4Network(given.cidr, strict=False)
            except ValueError as exc:
                raise VPNConfigError(f"vpn.cidr: {exc}") from None
            if network.prefixlen > 30:
                raise VPNConfigError("vpn.cidr: needs at least 4 addresses (/30 or larger)")
        elif static is not None and prefixed:
            # Kairos users write EdgeVPN's ADDRESS: 10.2.0.5/24 and no cidr: the address says the network.
            network = static.network
            if network.prefixlen > 30:
                raise VPNConfigError(
                    f"vpn.address: {given.address} leaves no VPN network around it: give the VPN's prefix "
                    f"({static.ip}/24, say) or set vpn.cidr"
                )
        else:
            network = ipaddress.IPv4Network(DEFAULT_CIDR)
        if static is not None:
            if not prefixed:
                static = ipaddress.IPv4Interface(f"{static.ip}/{network.prefixlen}")
            if not usable(static.ip, network):
                if given.cidr.strip():
                    where = f"vpn.cidr {network}"
                else:
                    where = f"its own network {network}" if prefixed else f"the default vpn.cidr {network}"
                raise VPNConfigError(f"vpn.address: {static.ip} is not a host address of {where}")
        return cls(
            given.create,
            given.interface,
            static,
            network,
            given.mtu,
            given.port,
            given.udp,
            given.keepalive_interval,
            given.udp_timeout,
            given.claim_ttl,
            given.relay,
            given.relay_max_bytes,
        )


@dataclass
class Link:
    """What this node knows about its path to one peer.

    ``udp_up`` is whether UDP to the peer works (authentic datagrams keep arriving over it);
    ``ladder`` picks the path actually used among those that work (:mod:`.paths`).
    """

    keys_installed_at: float
    udp_up: bool = False
    since: float = field(default_factory=time.monotonic)
    endpoint: tuple[str, int] | None = None
    last_trial: float = 0.0
    last_mark: Any = None
    last_progress: float = field(default_factory=time.monotonic)
    sender: FallbackSender | None = None
    hysteresis: PathHysteresis = field(default_factory=lambda: PathHysteresis(UDP_RETRY_INTERVAL))
    ladder: PathLadder = field(init=False)
    #: the peer's public UDP endpoints learned by hole punching (:mod:`.punch`)
    punched: frozenset[tuple[str, int]] = frozenset()
    #: the peer that relays our sealed datagrams to this one (:mod:`.relaydgram`), and since when
    relay: str | None = None
    relay_since: float = 0.0
    #: per relay asked: ``time.monotonic()`` before which it is not asked again for this peer
    relay_backoff: dict[str, float] = field(default_factory=dict)
    relay_asking: bool = False
    punching: PunchState = field(default_factory=PunchState)

    def __post_init__(self) -> None:
        # one back-off for UDP trials and moves up the ladder: a path that did not hold waits longer
        self.ladder = PathLadder(self.hysteresis)

    @property
    def path(self) -> str:
        """The name of the path in use: ``direct``, ``punched``, ``relay via <peer>`` or ``stream``."""
        return self.ladder.current.name


def _endpoint_text(endpoint: tuple[str, int] | None) -> str | None:
    return f"{endpoint[0]}:{endpoint[1]}" if endpoint else None


def udp_host(info: dict[str, Any], network: ipaddress.IPv4Network) -> str | None:
    """The IPv4 address to send a peer's datagrams to, from its advertised multiaddrs.

    Addresses inside the VPN itself are skipped (a wildcard listener advertises its VIP too, and
    tunnelling the tunnel would loop); loopback only when there is nothing else (tests).
    """
    found: list[ipaddress.IPv4Address] = []
    for address in info.get("addresses", []) if isinstance(info, dict) else []:
        ip = multiaddr_ip(address)  # the peer wrote these: None for anything that does not parse
        if isinstance(ip, ipaddress.IPv4Address) and ip not in network and not ip.is_unspecified:
            found.append(ip)
    found.sort(key=lambda ip: ip.is_loopback)
    return str(found[0]) if found else None


def set_device_address(
    name: str, old: ipaddress.IPv4Interface | None, new: ipaddress.IPv4Interface, network: ipaddress.IPv4Network
) -> None:
    """Give device ``name`` the address ``new`` instead of ``old``; keep ``network`` routed to it.

    The old address goes first. Added second, the new one would be a *secondary* address of the
    same subnet, and deleting the primary takes the secondaries with it (unless the sysctl
    ``promote_secondaries`` is on, which it is not by default): the device was left without any
    address, the kernel gave the node's VPN packets another interface's source address, and
    every peer dropped them as spoofed until the node restarted. The old address belongs to the
    node that won it; nothing is lost by dropping it a moment early.
    """
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=name)[0]
        if old is not None and old != new:
            try:
                ipr.addr("del", index=index, address=str(old.ip), prefixlen=old.network.prefixlen)
            except NetlinkError:  # already gone
                pass
        try:
            ipr.addr("add", index=index, address=str(new.ip), prefixlen=new.network.prefixlen)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        ipr.route("replace", dst=str(network.network_address), dst_len=network.prefixlen, oif=index)


class VPN:
    """The VPN of one node.

    :param node: the running node.
    :param settings: its checked ``vpn`` section.
    :param make_plane: builds the data plane for this VPN (its :attr:`address` is set by then;
        tests pass one on a fake TUN); default: a TUN device named ``settings.interface`` and a
        :class:`NodeDataPlane` on ``0.0.0.0:settings.port``.
    :param keepalive: ``keepalive(vpn, peer_vip)`` sends one keepalive towards a peer; default: an
        empty UDP datagram to its discard port, routed by the kernel into the TUN.
    :param wall_clock: Unix time in ms, which claims lapse by; default: the system clock (tests
        pass one they can set).
    """

    def __init__(
        self,
        node: NodeView,
        settings: VPNSettings,
        *,
        make_plane: Callable[["VPN"], NodeDataPlane] | None = None,
        keepalive: Callable[["VPN", ipaddress.IPv4Address], None] | None = None,
        wall_clock: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.node = node
        self.settings = settings
        self.peer_id: str = node.peer_id
        self.plane: NodeDataPlane | None = None
        self.tun: TunDevice | None = None
        self.address: ipaddress.IPv4Interface | None = None
        self.claim: Claim | None = None
        self.vips: dict[str, ipaddress.IPv4Address] = {}
        self.links: dict[str, Link] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self._make_plane = make_plane or VPN._make_tun_plane
        self._keepalive = keepalive or VPN._send_keepalive
        self._wall_clock = wall_clock
        self._keepalive_socket: socket.socket | None = None
        self._attempt = 0
        self._refresh_at = 0.0  # monotonic time of the next refresh of our claim
        self._exchanging: dict[str, asyncio.Task[None]] = {}
        self._last_exchange: dict[str, float] = {}
        self._wanted: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._published_links: dict[str, Any] | None = None
        self._static_conflict_logged = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._device_lock = asyncio.Lock()
        self._path_sources: list[PathSource] = []
        config: Any = node.config
        p2p = config.get("p2p", {}) if hasattr(config, "get") else {}
        relay_section = p2p.get("relay", {}) if hasattr(p2p, "get") else {}
        relay_section = relay_section if hasattr(relay_section, "get") else {}
        self._relay_enabled = bool(relay_section.get("enable", True))
        #: the sessions this node relays for pairs of its peers (:mod:`.relaydgram`)
        limits = replace(RelayLimits.from_config(relay_section), max_bytes=settings.relay_max_bytes)
        self.relay_table = RelayTable(limits, self.counters)
        self.add_path_source(_RelayedPaths(self))

    # ----- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> bool:
        """Claim a VIP, create the device and start the data plane; False if the VPN cannot run.

        Without a TUN device (no /dev/net/tun, no CAP_NET_ADMIN) one error line is logged and the
        node runs on without the VPN.
        """
        network = self.settings.network
        claims = read_claims(self.node.ledger.items(BUCKET), network, self._now_ms())
        previous = decode_claim(self.peer_id, self.node.ledger.get(BUCKET, self.peer_id), network)
        try:
            self.claim = self._initial_claim(claims, previous)
            self.address = ipaddress.IPv4Interface(f"{self.claim.vip}/{network.prefixlen}")
            # pyroute2's synchronous API runs an event loop of its own: not on ours
            self.plane = await asyncio.to_thread(self._make_plane, self)
        except TunUnavailable as exc:
            log.error("vpn disabled: %s", exc)
            # k3s waits for this node's VPN address meanwhile: `kairos status` says why it never comes
            self.node.set_state("tunvpn", f"disabled: {exc}")
            return False
        self._publish_claim(replace(self.claim, udp_port=self.plane.local_address[1]))
        self.node.serve(KEYS_PROTOCOL, self._serve_keys)
        self.node.serve(PACKETS_PROTOCOL, self._serve_packets)
        self.node.serve(RELAY_PROTOCOL, self._serve_relay)
        self.plane.relay = self.relay_table
        self.node.serve(PUNCH_PROTOCOL, self._serve_punch)
        self.plane.start()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="tunvpn")
        log.info("vpn up: %s on %s, UDP port %d", self.address, self.settings.interface, self.plane.local_address[1])
        return True

    async def stop(self) -> None:
        """Stop the data plane and remove the device (its routes go with it)."""
        tasks = [t for t in (self._task, *self._exchanging.values(), *self._tasks) if t is not None]
        self._task = None
        plane, self.plane = self.plane, None
        for task in tasks:
            task.cancel()
        senders = [link.sender.stop() for link in self.links.values() if link.sender is not None]
        self.links.clear()
        # a task stuck in a call to the libp2p thread may not end promptly: do not wait for it
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        if senders:
            await asyncio.wait([asyncio.ensure_future(s) for s in senders], timeout=2.0)
        if plane is not None:
            await asyncio.to_thread(plane.stop)
        if self.tun is not None:
            self.tun.close()
            self.tun = None
        if self._keepalive_socket is not None:
            self._keepalive_socket.close()

    def wake(self) -> None:
        """Re-evaluate addresses and sessions soon (a ledger or membership change)."""
        self._wake.set()

    def _make_tun_plane(self) -> NodeDataPlane:
        s = self.settings
        self.tun = TunDevice.create(s.interface, address=self.address, mtu=s.mtu, routes=[s.network])
        try:
            return NodeDataPlane(self.tun, ("0.0.0.0", s.port))
        except OSError as exc:
            self.tun.close()
            self.tun = None
            raise TunUnavailable(f"UDP port {s.port}: {exc.strerror or exc}") from None

    # ----- addresses ------------------------------------------------------------------------------

    def _tick_claimed(self) -> tuple[int, int]:
        # an HLC reading, not the wall clock: a claim made after hearing of another ranks after it
        return self.node.clock_version()

    def _now_ms(self) -> int:
        """The wall clock (ms) claims lapse by (``expires`` is wall time, not an HLC reading)."""
        return self._wall_clock()

    def _initial_claim(self, claims: dict[str, Claim], previous: Claim | None) -> Claim:
        """The claim to start with; ``claims`` are the live ones, ``previous`` ours, live or not."""
        static = self.settings.static
        mine = previous if previous is not None and previous.alive(self._now_ms()) else None
        if static is not None:
            if mine is not None and mine.static and mine.vip == static.ip:
                return mine
            return Claim(self.peer_id, static.ip, 0, self._tick_claimed(), True)
        if mine is not None and not mine.static:
            return mine  # keep the address across restarts
        others = {c.vip for c in claims.values() if c.peer_id != self.peer_id}
        if previous is not None and not previous.static and mine is None and previous.vip not in others:
            # Our claim lapsed while we were away. The address is free as far as we know, but the
            # claim is new: an old `claimed` would outrank a newcomer we have not heard of yet.
            log.info("vpn: our claim on %s lapsed; claiming it anew", previous.vip)
            return Claim(self.peer_id, previous.vip, 0, self._tick_claimed(), False)
        vip = choose_address(self.peer_id, self.settings.network, others)
        if vip is None:
            raise TunUnavailable(f"no free address left in {self.settings.network}")
        return Claim(self.peer_id, vip, 0, self._tick_claimed(), False)

    def _publish_claim(self, claim: Claim) -> None:
        """Write ``claim`` to the ledger, alive for one ``claim_ttl`` from now; it becomes ours."""
        ttl = self.settings.claim_ttl
        claim = replace(claim, expires=self._now_ms() + int(ttl * 1000))
        self.node.ledger.set(BUCKET, self.peer_id, claim.to_value())
        self.claim = claim
        self._refresh_at = time.monotonic() + ttl / 4

    def _refresh_claim(self) -> None:
        """Re-write our claim with a later ``expires`` once a quarter of the TTL has passed."""
        claim = self.claim
        assert claim is not None
        now_ms = self._now_ms()
        quarter_ms = int(self.settings.claim_ttl * 1000) // 4
        # Both clocks: the monotonic one stands still while the machine sleeps, the wall one may
        # step back.
        if time.monotonic() < self._refresh_at and (claim.expires is None or now_ms < claim.expires - 3 * quarter_ms):
            return
        if not claim.alive(now_ms):
            # Refreshed too late (a suspended machine, a stalled loop): the others have dropped
            # the claim and may have given the address away. Claim it anew; if a newcomer holds
            # it with an earlier claim, the next reconcile moves us.
            log.warning("vpn: our claim on %s lapsed before it was refreshed; claiming it anew", claim.vip)
            self.counters["vpn_claim_lapses"] += 1
            claim = replace(claim, claimed=self._tick_claimed())
        self._publish_claim(claim)

    def _settle_own_address(self, claims: dict[str, Claim]) -> None:
        assert self.claim is not None
        claims[self.peer_id] = self.claim
        holder = holders(claims.values()).get(self.claim.vip)
        if holder is None or holder.peer_id == self.peer_id:
            self.node.set_state("tunvpn", None)  # the address is ours: nothing to wait for
            return
        if self.claim.static:
            if not self._static_conflict_logged:
                log.error("vpn: static address %s is also claimed by %s, which ranks first", self.claim.vip, holder.peer_id)
                self._static_conflict_logged = True
            self.node.set_state("tunvpn", f"waiting for static address {self.claim.vip}, which {holder.peer_id} claimed first")
            return
        self._attempt += 1
        taken = {c.vip for c in claims.values()}
        vip = choose_address(self.peer_id, self.settings.network, taken, self._attempt)
        if vip is None:
            log.error(
                "vpn: %s is taken by %s and no address is free in %s", self.claim.vip, holder.peer_id, self.settings.network
            )
            self.node.set_state(
                "tunvpn", f"waiting for a free address in {self.settings.network} ({self.claim.vip} belongs to {holder.peer_id})"
            )
            return
        log.info("vpn: %s belongs to %s (earlier claim); moving to %s", self.claim.vip, holder.peer_id, vip)
        self.counters["vpn_address_moves"] += 1
        self._publish_claim(Claim(self.peer_id, vip, self.claim.udp_port, self._tick_claimed(), False))
        claims[self.peer_id] = self.claim
        new = ipaddress.IPv4Interface(f"{vip}/{self.settings.network.prefixlen}")
        if self.tun is not None:
            self._spawn(self._move_device_address(self.address, new))
        self.address = new

    async def _move_device_address(self, old: ipaddress.IPv4Interface | None, new: ipaddress.IPv4Interface) -> None:
        async with self._device_lock:  # moves must reach the device in the order they were made
            try:
                await asyncio.to_thread(set_device_address, self.settings.interface, old, new, self.settings.network)
            except Exception as exc:
                log.error("vpn: cannot move %s to %s: %s", self.settings.interface, new, exc)

    # ----- the loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        next_tick = 0.0
        # checked on every turn: Python 3.11's wait_for can swallow a cancellation
        while self.plane is not None:
            try:
                self._refresh_claim()
                self._reconcile()
                now = time.monotonic()
                if now >= next_tick:
                    self._tick_links(now)
                    self._publish_status()
                    next_tick = now + self.settings.keepalive_interval
            except Exception:  # a bug here must not end the VPN
                log.exception("vpn: reconcile failed")
            try:
                wait = min(next_tick, self._refresh_at) - time.monotonic()
                await asyncio.wait_for(self._wake.wait(), max(0.05, wait))
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def _reconcile(self) -> None:
        plane = self.plane
        assert plane is not None
        # lapsed claims are left out: such a peer has no VIP, so its session (and route) goes
        claims = read_claims(self.node.ledger.items(BUCKET), self.settings.network, self._now_ms())
        self._settle_own_address(claims)
        vips = {p: vip for vip, c in holders(claims.values()).items() if (p := c.peer_id) != self.peer_id}
        self.vips = vips
        members = self.node.members()
        # every member with a VIP, neighbour or not: the key exchange dials the peer when the
        # node's bounded degree (p2p.connections) left it without a connection to it
        wanted = {p for p in vips if p in members}
        # peers that are gone: their session goes. Membership alone may flap (a libp2p connection
        # that drops and comes back): a peer that left it but still sends authentic datagrams keeps
        # its session until it falls silent for udp_timeout.
        now = time.monotonic()
        for peer_id in list(self.links):
            if peer_id not in claims:
                self._drop_session(peer_id, "its claim lapsed")
            elif peer_id not in members:
                heard = plane.last_heard(peer_id)
                if heard is None or now - heard >= self.settings.udp_timeout:
                    self._drop_session(peer_id, "left")
        for peer_id in wanted:
            link = self.links.get(peer_id)
            if link is None:
                self._ensure_exchange(peer_id)
                continue
            claim = claims[peer_id]
            host = udp_host(members.get(peer_id, {}), self.settings.network)
            link.endpoint = (host, claim.udp_port) if host and claim.udp_port else None
        # move VIPs: park the losers first so that winners find their address free
        for peer_id in self.links:
            current = plane.vip_of(peer_id)  # None exactly when the plane has no such peer
            if current is not None and peer_id not in vips and usable(current, self.settings.network):
                plane.park(peer_id)
        for _ in range(2):
            pending = False
            for peer_id, vip in vips.items():
                if peer_id in self.links and plane.has_peer(peer_id) and plane.vip_of(peer_id) != vip:
                    try:
                        plane.set_vip(peer_id, vip)
                    except ValueError:
                        holder = next((p for p in self.links if plane.vip_of(p) == vip), None)
                        if holder is not None and vips.get(holder) != vip:
                            plane.park(holder)
                        pending = True
            if not pending:
                break

    def _tick_links(self, now: float) -> None:
        plane = self.plane
        assert plane is not None
        for peer_id, link in list(self.links.items()):
            vip = self.vips.get(peer_id)
            mark = plane.last_heard(peer_id)
            if mark != link.last_mark:
                link.last_mark, link.last_progress = mark, now
            self._apply_path(peer_id, link, now)
            self._track_udp(peer_id, link, now)
            if link.ladder.current.kind == STREAM:
                # only on the stream: once on UDP, probes through the relay would keep its session
                # (and the peer's source there) alive for nothing
                self._warm_relay(peer_id, link)
                self._maybe_ask_relay(peer_id, link, now)
            if vip is not None:
                try:
                    self._keepalive(self, vip)
                except OSError:
                    self.counters["vpn_keepalive_errors"] += 1
            if now - link.last_progress > SILENCE_REKEY and now - link.keys_installed_at > SILENCE_REKEY:
                log.info("vpn: nothing authentic from %s for %.0f s: renegotiating keys", peer_id, SILENCE_REKEY)
                self._drop_session(peer_id, "silent")
        # all published as vpn_<name>: the data plane's names bare, ours without their vpn_ prefix
        published = dict(plane.counters)
        published.update((name.removeprefix("vpn_"), value) for name, value in self.counters.items())
        kinds = collections.Counter(link.ladder.current.kind for link in self.links.values())
        published["peers_udp"] = kinds[DIRECT] + kinds[PUNCHED]
        published["peers_punched"] = kinds[PUNCHED]
        published["peers_relay"] = kinds[RELAY]
        published["peers_stream"] = kinds[STREAM]
        self.relay_table.check(plane.source_of)
        published["relay_sessions"] = len(self.relay_table.sessions())
        self.node.set_counters("vpn", published)
        # the stream path lives on its libp2p connection: keep the connection manager from trimming it
        for peer_id, link in self.links.items():
            (self.node.protect if link.ladder.current.kind == STREAM else self.node.unprotect)(peer_id, PROTECTION_TAG)

    def add_path_source(self, source: PathSource) -> None:
        """Offer the paths of ``source`` (relayed datagrams …) to every link's ladder from now on."""
        self._path_sources.append(source)

    def _working_paths(self, peer_id: str, link: Link, now: float) -> list[Path]:
        """The paths to ``peer_id`` that work now: UDP if it does, each source's, the stream."""
        plane = self.plane
        assert plane is not None and link.sender is not None
        working: list[Path] = []
        if link.udp_up:
            target = self._udp_target(peer_id, link, now)
            if target is not None:
                # a punched endpoint that is the advertised one is a direct path (a public peer)
                punched = target in link.punched and target != link.endpoint
                working.append(Path(PUNCHED if punched else DIRECT, endpoint=target))
        for source in self._path_sources:
            try:
                working.extend(source.paths(peer_id, now))
            except Exception:  # a path source's bug must not cost the link its other paths
                self.counters["vpn_path_source_errors"] += 1
                log.debug("vpn: path source %r failed", source, exc_info=True)
        working.append(Path(STREAM, send=link.sender.send))
        return working

    def _udp_target(self, peer_id: str, link: Link, now: float) -> tuple[str, int] | None:
        """Where UDP to ``peer_id`` goes: where its authentic datagrams come from (a NATed peer is
        answered at its router's mapping, not at its LAN address), else a punched endpoint, else
        the advertised one."""
        plane = self.plane
        assert plane is not None
        source = None if self._heard_via_another_peer(peer_id) else plane.source_of(peer_id)
        target = udp_target(link.endpoint, source, plane.udp_heard(peer_id), now, self.settings.udp_timeout)
        if link.punched and (source is None or target != source):
            return min(link.punched)
        return target

    def _heard_via_another_peer(self, peer_id: str) -> bool:
        """True if the peer's datagrams last came from another peer's endpoint: a relay forwarded
        them (one this end relays through, or one it does not: its session here ended, or the
        other end alone asked for it). They moved the session there; they are neither a UDP path
        of ours to the peer nor where it is."""
        plane = self.plane
        if plane is None:
            return False
        source = plane.source_of(peer_id)
        return source is not None and any(plane.source_of(p) == source for p in self.links if p != peer_id)

    def _apply_path(self, peer_id: str, link: Link, now: float) -> None:
        """Let the link's ladder choose among the working paths and point the data plane at it."""
        plane = self.plane
        assert plane is not None and link.sender is not None
        before = link.ladder.current
        path = link.ladder.choose(now, self._working_paths(peer_id, link, now))
        if path.rung != before.rung:
            self.counters["vpn_path_switches"] += 1
            log.info("vpn: path to %s: %s (was %s)", peer_id, path.name, before.name)
        if path.endpoint is not None:
            if plane.endpoint_of(peer_id) != path.endpoint:
                plane.set_endpoint(peer_id, path.endpoint)
            return
        plane.set_fallback(peer_id, path.send or link.sender.send)
        if plane.endpoint_of(peer_id) is not None:
            plane.set_endpoint(peer_id, None)

    def _track_udp(self, peer_id: str, link: Link, now: float) -> None:
        """Whether UDP to the peer works: up once an authentic UDP datagram arrives, down after
        ``udp_timeout`` without one; while down, a probe to its advertised endpoint every retry
        interval (backing off when UDP came up and did not hold), and hole punching (:mod:`.punch`)."""
        plane = self.plane
        assert plane is not None
        s = self.settings
        if not s.udp:
            return
        heard = plane.udp_heard(peer_id)
        if link.udp_up:
            if now - max(heard or 0.0, link.since) > s.udp_timeout:
                log.info("vpn: no UDP from %s for %.0f s", peer_id, s.udp_timeout)
                link.udp_up, link.since, link.last_trial = False, now, now
            elif link.ladder.current.rank != 0:
                # UDP works but the ladder waits (its back-off) before moving up to it: keep the
                # path, and the NAT mappings along it, open meanwhile, or it lapses before its turn
                self._probe(peer_id, self._udp_target(peer_id, link, now))
            return
        if heard is not None and heard > link.since and not self._heard_via_another_peer(peer_id):
            log.info("vpn: UDP from %s works", peer_id)
            link.udp_up, link.since = True, now
            self._apply_path(peer_id, link, now)
            return
        # the first probe of a new link may beat the peer's installing of the keys (the
        # responder installs after its reply): the first seconds, one probe per tick
        early = now - link.keys_installed_at < EARLY_PROBES
        if early or link.hysteresis.may_try(now, link.last_trial):
            link.last_trial = now
            self._probe(peer_id, link.endpoint)
        if link.punching.due(now) and keyexchange.initiates(self.peer_id, peer_id) and self._own_endpoints():
            link.punching.running = True
            self._spawn(self._punch(peer_id, link))

    def _probe(self, peer_id: str, endpoint: tuple[str, int] | None) -> None:
        if endpoint is not None and self.plane is not None and self.address is not None:
            self.plane.probe(peer_id, endpoint, self.address.ip.packed)

    # ----- hole punching (:mod:`.punch`) ---------------------------------------------------------

    def _own_endpoints(self) -> list[tuple[str, int]]:
        """Where peers see our UDP datagrams come from (their ``observed`` of us), most seen first."""
        seen: collections.Counter[tuple[str, int]] = collections.Counter()
        for key, value in self.node.ledger.items(BUCKET).items():
            if not key.endswith("/links") or key.startswith(self.peer_id) or not isinstance(value, dict):
                continue
            row = value.get(self.peer_id)
            endpoint = punch.parse_endpoint(row.get("observed")) if isinstance(row, dict) else None
            if endpoint is not None:
                seen[endpoint] += 1
        return [endpoint for endpoint, _ in seen.most_common(punch.MAX_ENDPOINTS)]

    async def _punch(self, peer_id: str, link: Link) -> None:
        """Offer our public endpoints to the peer, take its own, and probe them (the initiator)."""
        self.counters["vpn_punch_attempts"] += 1
        try:
            stream = await self.node.open_stream(peer_id, PUNCH_PROTOCOL)
            try:
                await stream.write_frame(punch.encode(self._own_endpoints()))
                theirs = punch.decode(await asyncio.wait_for(stream.read_frame(punch.MAX_MESSAGE), punch.REPLY_TIMEOUT))
            finally:
                await stream.close()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # no stream, a timeout, a bad answer: an attempt that failed
            if isinstance(exc, punch.PunchError):
                self.counters["vpn_punch_bad_messages"] += 1
            log.debug("vpn: hole punching with %s: %s", peer_id, exc)
            link.punching.running = False
            link.punching.failed(time.monotonic())
            self.counters["vpn_punch_failures"] += 1
            return
        await self._burst(peer_id, link, theirs)

    async def _serve_punch(self, stream: Any) -> None:
        """The answering side: take the peer's endpoints, give ours, probe theirs."""
        peer_id = stream.peer_id
        link = self.links.get(peer_id)
        if link is None or link.punching.running or not link.punching.may_answer(time.monotonic()):
            self.counters["vpn_punch_refused"] += 1
            await stream.reset()
            return
        try:
            theirs = punch.decode(await asyncio.wait_for(stream.read_frame(punch.MAX_MESSAGE), punch.REPLY_TIMEOUT))
            await stream.write_frame(punch.encode(self._own_endpoints()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # garbage, an oversized frame, a stall or a reset: the peer's doing
            self.counters["vpn_punch_bad_messages"] += 1
            log.debug("vpn: bad punch message from %s: %s", peer_id, exc)
            try:
                await stream.reset()
            except Exception:
                pass
            return
        await stream.close()
        link.punching.running = True
        self.counters["vpn_punch_attempts"] += 1
        await self._burst(peer_id, link, theirs)

    async def _burst(self, peer_id: str, link: Link, endpoints: list[tuple[str, int]]) -> None:
        """Probe the peer's reported endpoints until UDP from it works or the burst is over."""
        link.punched = frozenset(endpoints)
        try:
            for _ in range(punch.BURST_PROBES if endpoints else 0):
                if self.links.get(peer_id) is not link or link.udp_up:
                    break
                for endpoint in endpoints:
                    self._probe(peer_id, endpoint)
                await asyncio.sleep(punch.BURST_INTERVAL)
            now = time.monotonic()
            # a success is UDP from an endpoint the peer reported: datagrams a relay forwards
            # (before this end knows it relays) do not count
            plane = self.plane
            if plane is not None and plane.source_of(peer_id) in endpoints and (plane.udp_heard(peer_id) or 0.0) > link.since:
                self.counters["vpn_punch_successes"] += 1
                log.info("vpn: hole punched to %s", peer_id)
                link.punching.succeeded(now)
            else:
                self.counters["vpn_punch_failures"] += 1
                log.info("vpn: hole punching to %s opened nothing (a symmetric NAT?): stays on %s", peer_id, link.path)
                link.punching.failed(now)
        finally:
            link.punching.running = False

    # ----- relayed datagrams (:mod:`.relaydgram`) --------------------------------------------------

    def _relay_paths(self, peer_id: str, now: float) -> list[Path]:
        """The relayed path to ``peer_id`` while it works: granted, the relay reached over UDP,
        and an authentic datagram through it since the grant and within ``udp_timeout``.

        A grant alone is no path: a relay that forwards nothing (or a member that offers to relay
        and does not) would otherwise take the link off the stream into a black hole until the
        timeout. The probes both ends send through a granted relay (:meth:`_warm_relay`) are
        what is heard first."""
        plane, link = self.plane, self.links.get(peer_id)
        if plane is None or link is None or link.relay is None:
            return []
        relay = link.relay
        endpoint = self._relay_endpoint(relay)
        heard = plane.relay_heard(peer_id) or 0.0
        if endpoint is None or now - max(heard, link.relay_since) > self.settings.udp_timeout:
            log.info("vpn: nothing from %s through %s for %.0f s", peer_id, relay, self.settings.udp_timeout)
            self._end_relay(peer_id, link, now)
            return []
        if not self._relay_carries(peer_id, link, now):
            return []  # granted, nothing through it yet
        return [Path(RELAY, via=relay, endpoint=endpoint)]

    def _relay_carries(self, peer_id: str, link: Link, now: float) -> bool:
        """Whether an authentic datagram from ``peer_id`` came through the link's relay since it
        was granted, and within ``udp_timeout``."""
        heard = (self.plane.relay_heard(peer_id) if self.plane is not None else None) or 0.0
        return heard > link.relay_since and now - heard <= self.settings.udp_timeout

    def _warm_relay(self, peer_id: str, link: Link) -> None:
        """A probe to the peer through the relay it granted, while the ladder waits (its back-off
        after a move up that did not hold) before moving to it: so the far end hears the relayed
        path work and keeps it, and it is still there when its turn comes. Without it a relay
        the ladder did not take within ``udp_timeout`` would fall silent and be given up unused."""
        if link.relay is not None:
            self._probe(peer_id, self._relay_endpoint(link.relay))

    def _relay_endpoint(self, relay: str) -> tuple[str, int] | None:
        """Where datagrams go to be relayed by ``relay``: its UDP endpoint while the link to it
        is on UDP (None otherwise: a relay reached only over the stream relays nothing)."""
        relay_link = self.links.get(relay)
        if self.plane is None or relay_link is None or relay_link.ladder.current.rank != 0:
            return None
        return self.plane.endpoint_of(relay)

    def _end_relay(self, peer_id: str, link: Link, now: float) -> None:
        if link.relay is not None:
            link.relay_backoff[link.relay] = now + RELAY_BACKOFF
            link.relay = None
        if self.plane is not None:
            self.plane.set_relayed_from(peer_id, None)

    def _use_relay(self, peer_id: str, relay: str) -> bool:
        """Offer ``relay`` to ``peer_id``'s ladder from now on; False if that cannot be."""
        plane, link, relay_link = self.plane, self.links.get(peer_id), self.links.get(relay)
        if plane is None or link is None or relay_link is None or not plane.has_peer(peer_id):
            return False
        source = plane.source_of(relay) or plane.endpoint_of(relay)
        if source is None:
            return False
        log.info("vpn: %s relays to %s", relay, peer_id)
        link.relay, link.relay_since = relay, time.monotonic()
        plane.set_relayed_from(peer_id, source)
        self.wake()
        return True

    def _relay_candidates(self, peer_id: str, now: float) -> list[str]:
        """Peers that may relay to ``peer_id``: reached over UDP, publicly reachable ones first."""
        link = self.links[peer_id]
        members = self.node.members()
        found = [
            p
            for p, other in self.links.items()
            if p != peer_id and other.ladder.current.rank == 0 and link.relay_backoff.get(p, 0.0) <= now
        ]
        return sorted(found, key=lambda p: (members.get(p, {}).get("reachability") != "public", p))

    def _maybe_ask_relay(self, peer_id: str, link: Link, now: float) -> None:
        # the side that initiates key exchanges asks, so that the pair asks once
        if link.relay is not None or link.relay_asking or not keyexchange.initiates(self.peer_id, peer_id):
            return
        if now - link.keys_installed_at < RELAY_ASK_DELAY:
            return
        candidates = self._relay_candidates(peer_id, now)
        if candidates:
            link.relay_asking = True
            self._spawn(self._ask_relay(peer_id, link, candidates[0]))

    async def _ask_relay(self, peer_id: str, link: Link, relay: str) -> None:
        try:
            key = self.plane.send_key_id(peer_id) if self.plane is not None else None
            if key is None:
                return
            stream = await self.node.open_stream(relay, RELAY_PROTOCOL)
            try:
                await stream.write_frame(encode_relay("open", peer=peer_id, key=key))
                answer = decode_relay(await asyncio.wait_for(stream.read_frame(RELAY_MAX_MESSAGE), RELAY_TIMEOUT * 2))
            finally:
                await stream.close()
            if answer["op"] == "ok" and self.links.get(peer_id) is link and self._use_relay(peer_id, relay):
                self.counters["vpn_relay_requests_granted"] += 1
                return
            log.info("vpn: %s does not relay to %s: %s", relay, peer_id, answer.get("reason", answer["op"]))
            self.counters["vpn_relay_requests_refused"] += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counters["vpn_relay_request_errors"] += 1
            log.debug("vpn: asking %s to relay to %s failed: %s", relay, peer_id, exc)
        finally:
            link.relay_asking = False
        link.relay_backoff[relay] = time.monotonic() + RELAY_BACKOFF

    def _relaying(self) -> bool:
        """True if this node relays datagrams for its peers now (``vpn.relay``)."""
        mode = self.settings.relay
        if mode == "off":
            return False
        if mode == "always":
            return True
        own = self.node.ledger.get(NODES_BUCKET, self.peer_id)
        return self._relay_enabled and isinstance(own, dict) and own.get("reachability") == "public"

    async def _serve_relay(self, stream: Any) -> None:
        peer_id = stream.peer_id
        try:
            message = decode_relay(await asyncio.wait_for(stream.read_frame(RELAY_MAX_MESSAGE), RELAY_TIMEOUT))
            if message["op"] == "open" and isinstance(message.get("peer"), str) and "key" in message:
                reason = await self._relay_open(peer_id, message["peer"], message["key"])
                reply = encode_relay("ok") if reason is None else encode_relay("refused", reason=reason)
            elif message["op"] == "offer" and isinstance(message.get("peer"), str) and "key" in message:
                reply = self._relay_offered(peer_id, message["peer"], message["key"])
            else:
                raise RelayMessageError(f"unexpected {message['op']!r}")
            await stream.write_frame(reply)
            await stream.close()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # garbage, an oversized frame, a reset or a stall: the peer's doing
            self.counters["vpn_relay_bad_messages"] += 1
            log.debug("vpn: bad relay request from %s: %s", peer_id, exc)
            try:
                await stream.reset()
            except Exception:
                pass

    def _reached_over_udp(self, peer_id: str) -> bool:
        link = self.links.get(peer_id)
        return (
            link is not None
            and link.ladder.current.rank == 0
            and self.plane is not None
            and self.plane.source_of(peer_id) is not None
        )

    async def _relay_open(self, a: str, b: str, a_key: int) -> str | None:
        """As the relay: ``a`` asks for a session to ``b``; None once it is open, else why not."""
        table = self.relay_table
        if self.plane is None or not self._relaying():
            reason: str | None = "not a relay"
        elif a == b or a not in self.links or b not in self.links:
            reason = "no session with both"
        elif not (self._reached_over_udp(a) and self._reached_over_udp(b)):
            reason = "no UDP path to both"
        else:
            reason = table.refusal(a, b)
        if reason is not None:
            self.counters["relay_refused_" + reason.replace(" ", "_").lower()] += 1
            return reason
        try:
            stream = await self.node.open_stream(b, RELAY_PROTOCOL)
            try:
                await stream.write_frame(encode_relay("offer", peer=a, key=a_key))
                answer = decode_relay(await asyncio.wait_for(stream.read_frame(RELAY_MAX_MESSAGE), RELAY_TIMEOUT))
            finally:
                await stream.close()
        except Exception as exc:  # b is gone, slow or garbled: a refusal for a, not a crash
            self.counters["relay_refused_peer_unreachable"] += 1
            log.debug("vpn: relay offer to %s failed: %s", b, exc)
            return "peer unreachable"
        if answer["op"] != "accept" or "key" not in answer:
            self.counters["relay_refused_by_peer"] += 1
            return f"refused by {b}: {answer.get('reason', answer['op'])}"
        plane = self.plane  # the VPN may have stopped meanwhile
        a_source = plane.source_of(a) if plane is not None else None
        b_source = plane.source_of(b) if plane is not None else None
        if a_source is None or b_source is None:
            self.counters["relay_refused_no_udp_path_to_both"] += 1
            return "no UDP path to both"
        return table.open(a, a_source, a_key, b, b_source, answer["key"])

    def _relay_offered(self, relay: str, a: str, a_key: int) -> bytes:
        """As the other end: ``relay`` offers to relay ``a``'s datagrams sealed under ``a_key``."""
        plane, link = self.plane, self.links.get(a)
        now = time.monotonic()
        key = plane.send_key_id(a) if plane is not None else None
        if plane is None or link is None or plane.receive_key_id(a) != a_key:
            reason = "no such session"
        elif link.relay_backoff.get(relay, 0.0) > now:
            # a relay that just failed this link: the same back-off as for the ones this end asks
            reason = "that relay failed this link lately"
        elif link.relay not in (None, relay) and self._relay_carries(a, link, now):
            # one working relay per link: an offer does not take the link off one that carries it
            reason = "relayed by another peer"
        elif key is None or not self._use_relay(a, relay):
            reason = "no UDP path to the relay"
        else:
            return encode_relay("accept", key=key)
        self.counters["vpn_relay_offers_refused"] += 1
        return encode_relay("refuse", reason=reason)

    def _send_keepalive(self, vip: ipaddress.IPv4Address) -> None:
        if self._keepalive_socket is None:
            self._keepalive_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._keepalive_socket.setblocking(False)
        self._keepalive_socket.sendto(b"", (str(vip), DISCARD_PORT))

    def _publish_status(self) -> None:
        links = {
            p: {
                "path": link.path,
                # where this peer's authentic UDP datagrams come from: its public endpoint when it
                # is behind a NAT (hole punching asks for it, :mod:`.punch`)
                "observed": _endpoint_text(self.plane.source_of(p)) if self.plane is not None else None,
                "vip": str(self.vips.get(p, "")),
                "endpoint": f"{link.endpoint[0]}:{link.endpoint[1]}" if link.endpoint else None,
            }
            for p, link in sorted(self.links.items())
        }
        if links != self._published_links:
            self._published_links = links
            self.node.ledger.set(BUCKET, f"{self.peer_id}/links", links)

    # ----- sessions -------------------------------------------------------------------------------

    def _ensure_exchange(self, peer_id: str) -> None:
        if peer_id in self._exchanging:
            return
        now = time.monotonic()
        if now - self._last_exchange.get(peer_id, -EXCHANGE_RETRY) < EXCHANGE_RETRY and peer_id not in self._wanted:
            return
        self._wanted.discard(peer_id)
        self._last_exchange[peer_id] = now
        task = asyncio.get_running_loop().create_task(self._exchange(peer_id), name=f"tunvpn-keys-{peer_id[-6:]}")
        self._exchanging[peer_id] = task
        task.add_done_callback(lambda _t: self._exchanging.pop(peer_id, None))

    async def _exchange(self, peer_id: str) -> None:
        try:
            if keyexchange.initiates(self.peer_id, peer_id):
                keys = await keyexchange.initiate(self.node, self.peer_id, peer_id)
                self._install(peer_id, keys)
                self.counters["vpn_key_exchanges"] += 1
            else:
                await keyexchange.request(self.node, peer_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counters["vpn_key_exchange_errors"] += 1
            log.debug("vpn: key exchange with %s failed: %s", peer_id, exc)

    async def _serve_keys(self, stream: Any) -> None:
        peer_id = stream.peer_id
        try:
            data = await asyncio.wait_for(stream.read_frame(keyexchange.MAX_MESSAGE), 10)
            op, hello = keyexchange.decode(data)
        except (ExchangeError, asyncio.TimeoutError) as exc:
            self.counters["vpn_key_exchange_errors"] += 1
            log.debug("vpn: bad key-exchange message from %s: %s", peer_id, exc)
            await stream.reset()
            return
        if op == "request":
            link = self.links.get(peer_id)
            fresh = link is not None and time.monotonic() - link.keys_installed_at < EXCHANGE_RETRY * 2
            if keyexchange.initiates(self.peer_id, peer_id) and self.plane is not None and not fresh:
                self._drop_session(peer_id, "peer asked for new keys")
                self._wanted.add(peer_id)
                self.wake()
            await stream.close()
            return
        if op != "hello" or hello is None or keyexchange.initiates(self.peer_id, peer_id) or self.plane is None:
            # the lower peer id initiates: a hello the other way round breaks that rule
            self.counters["vpn_key_exchange_errors"] += 1
            await stream.reset()
            return
        keys = await keyexchange.respond(stream, self.peer_id, hello)
        await stream.close()
        self._install(peer_id, keys)
        self.counters["vpn_key_exchanges"] += 1

    def _install(self, peer_id: str, keys: SessionKeys) -> None:
        plane = self.plane
        if plane is None:
            return
        vip = self.vips.get(peer_id)
        parked = vip is None or any(plane.vip_of(p) == vip for p in self.links if p != peer_id)
        if parked or vip is None:  # (vip is None means parked: the test is for the type checker)
            vip = parking_address()  # the next reconcile gives it its VIP
        link = self.links.get(peer_id)
        now = time.monotonic()
        fresh = link is None
        if link is None:
            link = self.links[peer_id] = Link(now)
            link.sender = FallbackSender(
                lambda: self.node.open_stream(peer_id, PACKETS_PROTOCOL), asyncio.get_running_loop(), self.counters
            )
            link.sender.start()
        link.keys_installed_at = link.last_progress = now
        if link.relay is not None:  # new keys: the relay's routes were made for the old key ids
            self._end_relay(peer_id, link, now)
            link.relay_backoff.clear()
        claim = parse_claim(peer_id, self.node.ledger.get(BUCKET, peer_id), self.settings.network, self._now_ms())
        host = udp_host(self.node.members().get(peer_id, {}), self.settings.network)
        link.endpoint = (host, claim.udp_port) if host and claim and claim.udp_port else None
        if link.udp_up:
            link.since = now  # new keys start a new session: its first UDP datagram is yet to come
        try:
            plane.add_peer(peer_id, vip, link.ladder.current.endpoint, keys)
        except ValueError as exc:  # a receive key id collision: astronomically rare, renegotiate
            log.warning("vpn: cannot add %s: %s", peer_id, exc)
            self._drop_session(peer_id, "install failed")
            return
        assert link.sender is not None  # made with the link, above
        plane.set_fallback(peer_id, link.sender.send)
        log.info("vpn: session with %s (%s)", peer_id, "no VIP yet" if parked else vip)
        if fresh and self.settings.udp:
            # a new link starts on the stream, which works as soon as there is a session, and
            # tries UDP at once: the peer answers over UDP when the probe gets through
            link.last_trial = now
            self._probe(peer_id, link.endpoint)
        self.wake()

    def _drop_session(self, peer_id: str, reason: str) -> None:
        link = self.links.pop(peer_id, None)
        self.node.unprotect(peer_id, PROTECTION_TAG)
        # the pairs this node relays for it end with it, and so do the paths it relayed for us
        self.relay_table.end_peer(peer_id, "left")
        for other_id, other in self.links.items():
            if other.relay == peer_id:
                self._end_relay(other_id, other, time.monotonic())
        if self.plane is not None:
            self.plane.remove_peer(peer_id)
        if link is not None:
            log.info("vpn: session with %s closed (%s)", peer_id, reason)
            if link.sender is not None:
                self._spawn(link.sender.stop())

    async def _serve_packets(self, stream: Any) -> None:
        peer_id = stream.peer_id

        async def deliver(datagrams: list[bytes]) -> None:
            plane = self.plane
            if plane is None:
                return
            delivered = await asyncio.to_thread(plane.inject_batch_from_fallback, peer_id, datagrams)
            self.counters["vpn_fallback_datagrams_received"] += len(datagrams)
            self.counters["vpn_fallback_datagrams_delivered"] += delivered

        await read_datagrams(stream, deliver, self.counters)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _RelayedPaths:
    """The relayed paths of a :class:`VPN`, as a :class:`~.paths.PathSource` of its ladders."""

    def __init__(self, vpn: VPN) -> None:
        self._vpn = vpn

    def paths(self, peer_id: str, now: float) -> list[Path]:
        return self._vpn._relay_paths(peer_id, now)
