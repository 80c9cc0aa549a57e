"""Multiaddr text (``/ip4/10.0.0.5/tcp/4001/p2p/12D3KooW…``), read with py-multiaddr.

Addresses come from peers (mDNS TXT records, DHT provider records, ``nodes`` entries) and from
the config: every reader here gets ``None`` (or ``False``) for anything py-multiaddr does not
parse — an unknown protocol, an IPv4 part that is no IPv4 address, a port that is no number, a
peer id that is no peer id — never an exception. The text a caller passed in stays its own: these
functions only look into it, so an address advertised as written is passed on as written.
"""

from __future__ import annotations

import ipaddress

from multiaddr import Multiaddr

#: Longer text is not an address of ours (and would only cost parsing).
MAX_TEXT = 1024

Components = list[tuple[str, "str | None"]]


def components(text: object) -> Components | None:
    """``(protocol, value)`` pairs of a multiaddr (``value`` None for ``/quic-v1``, ``/ws`` …), or
    None when ``text`` is not a multiaddr."""
    if not isinstance(text, str) or not text.startswith("/") or len(text) > MAX_TEXT:
        return None
    try:
        return [(protocol.name, value) for protocol, value in Multiaddr(text).items()]
    except Exception:  # py-multiaddr raises ValueError, LookupError and its own errors for bad input
        return None


def peer_id(text: object) -> str | None:
    """The peer a multiaddr reaches: its last ``/p2p/<id>`` (a relayed address names the relay
    first and the target last), or None."""
    found = [value for protocol, value in components(text) or () if protocol == "p2p"]
    return found[-1] if found else None


def host_ip(text: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address a multiaddr starts with (``/ip4/…`` or ``/ip6/…``), or None (a DNS name,
    a relayed address without one, garbage)."""
    parts = components(text)
    if not parts or parts[0][0] not in ("ip4", "ip6") or parts[0][1] is None:
        return None
    return ipaddress.ip_address(parts[0][1])


def tcp_port(text: object) -> int | None:
    """The TCP port of a multiaddr, or None when it has none."""
    for protocol, value in components(text) or ():
        if protocol == "tcp" and value is not None:
            return int(value)
    return None


def is_concrete(text: object) -> bool:
    """True for a multiaddr without a wildcard IP (``0.0.0.0``, ``::``): one a peer can dial."""
    parts = components(text)
    return parts is not None and not has_wildcard(parts)


def has_wildcard(parts: Components) -> bool:
    """True when parsed ``components`` hold a wildcard IP (``0.0.0.0``, ``::``)."""
    return any(
        protocol in ("ip4", "ip6") and value is not None and ipaddress.ip_address(value).is_unspecified
        for protocol, value in parts
    )


def with_host(text: str, ip: str) -> str:
    """``text`` with its leading IP address replaced by ``ip`` (of the same family):
    ``/ip4/0.0.0.0/tcp/1`` with ``10.0.0.5`` is ``/ip4/10.0.0.5/tcp/1``.

    :raises ValueError: when ``text`` does not start with an IP address, or ``ip`` is not one of
        its family.
    """
    parts = components(text)
    if not parts or parts[0][0] not in ("ip4", "ip6"):
        raise ValueError(f"not an IP multiaddr: {text!r}")
    return str(Multiaddr.join(Multiaddr(f"/{parts[0][0]}/{ip}"), *Multiaddr(text).split()[1:]))
