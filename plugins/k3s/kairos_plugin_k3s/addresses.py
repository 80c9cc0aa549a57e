"""Which address and interface k3s uses on a node: the VPN's when there is one.

The VPN plugin (tunvpn) owns the config section ``vpn`` (``interface``, default ``edgevpn0``) and
publishes each node's virtual IP in the ledger bucket ``vpn`` under the node's peer id as
``{"vip": "10.1.0.2"}`` (a ``/prefix`` suffix is tolerated). Without that plugin, or with the VPN
switched off, k3s uses the node's own address.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from kairos_core.plugin import multiaddr_ip

from .validate import clean_ip

VPN_SECTION = "vpn"
VPN_BUCKET = "vpn"
DEFAULT_VPN_INTERFACE = "edgevpn0"


def vpn_in_use(config: Any) -> bool:
    """Whether a VPN plugin is installed and not switched off (``vpn.enable`` / Kairos's ``vpn.create``)."""
    if VPN_SECTION not in config:
        return False
    section = config[VPN_SECTION]
    return all(section.get(flag, True) is not False for flag in ("enable", "create", "use"))


def vpn_interface(config: Any) -> str | None:
    """The VPN's interface name, or None without a VPN."""
    if not vpn_in_use(config):
        return None
    return str(config[VPN_SECTION].get("interface") or DEFAULT_VPN_INTERFACE)


def vpn_address(ledger: Any, peer_id: str) -> str | None:
    """``peer_id``'s virtual IP from the ledger, or None when not (yet, or validly) published.

    Only an entry ``peer_id`` signed itself counts: the VPN plugin makes the bucket owner-keyed,
    but k3s must not hand another node's say to ``--node-ip`` where that plugin is absent.
    """
    entry = ledger.get_entry(VPN_BUCKET, peer_id) if hasattr(ledger, "get_entry") else None
    if entry is not None and entry.owner != peer_id:
        return None
    value = ledger.get(VPN_BUCKET, peer_id)
    vip = value.get("vip") if isinstance(value, dict) else None
    if not isinstance(vip, str):
        return None
    try:
        return clean_ip(str(ipaddress.ip_interface(vip.strip()).ip))
    except ValueError:
        return None


def own_address(multiaddrs: list[str]) -> str | None:
    """The best of a node's listen addresses: a routable IPv4 one, else any, loopback last."""
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for addr in multiaddrs:
        ip = multiaddr_ip(addr)
        if ip is not None and not ip.is_unspecified:
            found.append(ip)
    if not found:
        return None
    found.sort(key=lambda ip: (ip.is_loopback, ip.is_link_local, ip.version))
    return str(found[0])
