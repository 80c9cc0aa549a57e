"""Virtual IPs: who holds which address of the VPN's CIDR, decided the same way on every node.

Each node publishes a *claim* in the owner-keyed ``vpn`` bucket, key = its peer id::

    {"vip": "10.1.0.7", "udp_port": 51820, "claimed": [wall_ms, counter], "static": false,
     "expires": wall_ms}

``claimed`` is the hybrid-logical-clock time at which the node first claimed *that* address.
When several nodes claim one address, the holder is the one that ranks first — static claims
before automatic ones, then the lower ``(claimed, peer_id)`` — so every node that has the same
claims picks the same holder, and an address in use is never taken by a later claimant (a node
that claims after having heard of an older claim has a later HLC time). The losers move to a
free address (:func:`choose_address`) and claim again; the ledger converges, and so do the VIPs.

``expires`` (Unix time in ms) ends a claim: only its owner may write or delete its key, so a
node gone for good could otherwise keep its address forever. The owner re-writes its claim with
a later ``expires`` (same ``vip``, same ``claimed``) a few times per TTL (``vpn.claim_ttl``);
once ``expires`` is past, every node ignores the claim — it holds no address and takes none.
Whether a claim is alive is thus a function of the entry and the wall clock, so nodes agree
except while their clocks disagree about a claim's last moments (the TTL is long next to the
skew). An owner whose claim lapsed does not revive its old ``claimed``: it claims anew, and so
ranks after whoever took the address meanwhile. Claims without ``expires`` (written by older
versions) never expire.
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

IPv4 = ipaddress.IPv4Address


def wall_clock_ms() -> int:
    """Unix time in milliseconds: the clock ``expires`` is written and read by."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class Claim:
    """One node's claim on a virtual IP, as read from the ``vpn`` bucket."""

    peer_id: str
    vip: IPv4
    udp_port: int
    claimed: tuple[int, int]
    static: bool = False
    #: Unix time in ms at which the claim lapses; None: never (a claim from an older version).
    expires: int | None = None

    def alive(self, now_ms: int) -> bool:
        """True while the claim holds at wall time ``now_ms`` (it lapses at ``expires``)."""
        return self.expires is None or now_ms < self.expires

    def rank(self) -> tuple[int, int, int, str]:
        """Sort key: lower ranks first and holds the address."""
        return (0 if self.static else 1, self.claimed[0], self.claimed[1], self.peer_id)

    def to_value(self) -> dict[str, Any]:
        """The ledger value of this claim."""
        value: dict[str, Any] = {
            "vip": str(self.vip),
            "udp_port": self.udp_port,
            "claimed": list(self.claimed),
            "static": self.static,
        }
        if self.expires is not None:
            value["expires"] = self.expires
        return value


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def decode_claim(peer_id: str, value: Any, network: ipaddress.IPv4Network) -> Claim | None:
    """The claim in a ``vpn`` bucket value, alive or not; None if malformed or outside ``network``.

    Values come from peers: anything unexpected is rejected here rather than trusted later.
    """
    if not isinstance(value, dict):
        return None
    try:
        vip = IPv4(value["vip"])
        port = value.get("udp_port", 0)
        claimed = value["claimed"]
        expires = value.get("expires")
        if not _natural(port) or port > 65535:
            return None
        if not (isinstance(claimed, list) and len(claimed) == 2 and all(_natural(c) for c in claimed)):
            return None
        if expires is not None and not _natural(expires):
            return None
    except (KeyError, TypeError, ValueError):
        return None
    if not usable(vip, network):
        return None
    return Claim(peer_id, vip, port, (claimed[0], claimed[1]), bool(value.get("static", False)), expires)


def parse_claim(peer_id: str, value: Any, network: ipaddress.IPv4Network, now_ms: int | None = None) -> Claim | None:
    """The claim in a ``vpn`` bucket value if it is alive at wall time ``now_ms``, else None.

    ``now_ms`` defaults to the wall clock now; None too for a malformed value or one outside
    ``network`` (see :func:`decode_claim`).
    """
    claim = decode_claim(peer_id, value, network)
    if claim is None:
        return None
    return claim if claim.alive(wall_clock_ms() if now_ms is None else now_ms) else None


def read_claims(bucket: Mapping[str, Any], network: ipaddress.IPv4Network, now_ms: int | None = None) -> dict[str, Claim]:
    """Every valid claim alive at ``now_ms`` (default: now) in the items of the ``vpn`` bucket.

    Keys with a ``/`` are not claims. A lapsed claim is left out: its address is free.
    """
    now = wall_clock_ms() if now_ms is None else now_ms
    claims: dict[str, Claim] = {}
    for key, value in bucket.items():
        if "/" in key:
            continue
        claim = parse_claim(key, value, network, now)
        if claim is not None:
            claims[key] = claim
    return claims


def usable(vip: IPv4, network: ipaddress.IPv4Network) -> bool:
    """True if ``vip`` is a host address of ``network`` (not its network or broadcast address)."""
    if vip not in network:
        return False
    if network.prefixlen >= 31:
        return True
    return vip != network.network_address and vip != network.broadcast_address


def holders(claims: Iterable[Claim]) -> dict[IPv4, Claim]:
    """The winning claim of every claimed address."""
    best: dict[IPv4, Claim] = {}
    for claim in claims:
        current = best.get(claim.vip)
        if current is None or claim.rank() < current.rank():
            best[claim.vip] = claim
    return best


def vip_map(claims: Iterable[Claim]) -> dict[str, IPv4]:
    """Peer id → VIP, for the holders only: a peer whose claim lost has no VIP until it moves."""
    return {claim.peer_id: vip for vip, claim in holders(claims).items()}


def _host_count(network: ipaddress.IPv4Network) -> int:
    return network.num_addresses if network.prefixlen >= 31 else network.num_addresses - 2


def _nth_host(network: ipaddress.IPv4Network, index: int) -> IPv4:
    first = int(network.network_address) + (0 if network.prefixlen >= 31 else 1)
    return IPv4(first + index)


def candidate(peer_id: str, network: ipaddress.IPv4Network, attempt: int = 0) -> IPv4:
    """The address a node tries first (attempt 0), from a hash of its peer id."""
    digest = hashlib.sha256(f"kairos/tunvpn/vip/{peer_id}/{attempt}".encode()).digest()
    return _nth_host(network, int.from_bytes(digest[:8], "big") % _host_count(network))


def choose_address(peer_id: str, network: ipaddress.IPv4Network, taken: Iterable[IPv4], attempt: int = 0) -> IPv4 | None:
    """A free address for ``peer_id``: its candidate, else the next free one after it.

    ``attempt`` changes the starting point, so that two nodes that lost the same address do not
    both walk to the same next one. None when every address is taken.
    """
    used = set(taken)
    count = _host_count(network)
    start = int(candidate(peer_id, network, attempt)) - int(_nth_host(network, 0))
    for step in range(count):
        vip = _nth_host(network, (start + step) % count)
        if vip not in used:
            return vip
    return None
