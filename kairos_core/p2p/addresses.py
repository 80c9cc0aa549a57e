"""Concrete addresses for a host that listens on a wildcard (trap 6: never advertise 0.0.0.0)."""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct

from .. import multiaddrs

_SIOCGIFADDR = 0x8915


def is_tunnel_device(name: str) -> bool:
    """True for TUN/TAP devices (the VPN's own interface among them).

    Their addresses are never advertised for dialling: peers would try to reach us through the
    overlay that itself rides on the connection they are trying to make.
    """
    return os.path.exists(f"/sys/class/net/{name}/tun_flags")


def interface_ipv4_addresses() -> list[str]:
    """The IPv4 address of every up interface but tunnels, loopback last (Linux ioctl; no extra package)."""
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            if is_tunnel_device(name):
                continue
            try:
                packed = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # interface without an IPv4 address
                continue
            address = socket.inet_ntoa(packed[20:24])
            if address not in found:
                found.append(address)
    return sorted(found, key=lambda a: ipaddress.ip_address(a).is_loopback)


def interface_ipv6_addresses() -> list[str]:
    """Global and loopback IPv6 addresses (link-local ones need a zone and are skipped)."""
    found: list[str] = []
    try:
        with open("/proc/net/if_inet6") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if not fields or (len(fields) > 5 and is_tunnel_device(fields[5])):
            continue
        address = ipaddress.IPv6Address(int(fields[0], 16))
        if address.is_link_local:
            continue
        if str(address) not in found:
            found.append(str(address))
    return sorted(found, key=lambda a: ipaddress.ip_address(a).is_loopback)


def expand_wildcard(multiaddr_text: str) -> list[str]:
    """``/ip4/0.0.0.0/tcp/N`` → one address per interface; anything else unchanged."""
    host = multiaddrs.host_ip(multiaddr_text)
    if host is None or not host.is_unspecified:
        return [multiaddr_text]
    found = interface_ipv4_addresses() if host.version == 4 else interface_ipv6_addresses()
    return [multiaddrs.with_host(multiaddr_text, ip) for ip in found]


def port_in_use(multiaddr_text: str) -> bool:
    """True when a fixed TCP port of ``/ip4|ip6/<addr>/tcp/<port>`` is already bound.

    libp2p listens with SO_REUSEPORT (for hole punching), so a second listener on a busy port
    would silently share it with the first (trap 5). A plain bind, without that option, tells.
    """
    parts = multiaddrs.components(multiaddr_text)
    if not parts or len(parts) < 2 or parts[0][0] not in ("ip4", "ip6") or parts[1][0] != "tcp" or parts[1][1] == "0":
        return False
    (protocol, host), (_, port) = parts[0], parts[1]
    family = socket.AF_INET if protocol == "ip4" else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        try:
            probe.bind((host, int(port or 0)))
        except OSError:
            return True
    return False
