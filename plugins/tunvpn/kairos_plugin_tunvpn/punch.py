"""UDP hole punching for the data plane, coordinated over an admitted stream (``/kairos/vpn/punch/1.0.0``).

Two nodes behind NATs reach each other only through a relay, but each knows where its UDP
datagrams appear on the internet: a peer that hears them publishes where they come from
(``observed`` in its ``vpn/<peer>/links`` entry). When a link is not on UDP, the side with the
lower peer id sends its observed endpoints to the other over a stream; the other answers with
its own, and both send a burst of sealed keepalives (:meth:`~.sendpath.SendPath.probe`) to the
endpoints the other reported. Each side's first probe opens its own NAT's mapping towards the
other, so the other's probes get in: through NATs that keep a flow's port for every destination
(port-preserving), the path opens within a burst. Through a symmetric NAT the mapping towards
the other differs from the one the public peer saw, nothing arrives, and the attempt fails after
the burst; it is counted and tried again after :data:`RETRY` seconds, doubling up to
:data:`MAX_RETRY`.

Limits: probes go only to endpoints the peer itself reported over its admitted stream, at most
:data:`MAX_ENDPOINTS` of them, :data:`BURST_PROBES` probes per endpoint and attempt; a peer gets
one answer per :data:`ANSWER_INTERVAL`; a message that does not parse is counted and the stream reset.

Messages are single JSON frames: ``{"op": "punch", "endpoints": ["203.0.113.7:4242", …]}``, the
answer the same.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PUNCH_PROTOCOL = "/kairos/vpn/punch/1.0.0"
MAX_MESSAGE = 512
MAX_ENDPOINTS = 4
BURST_PROBES = 15
BURST_INTERVAL = 0.2
RETRY = 10.0
MAX_RETRY = 600.0
ANSWER_INTERVAL = 5.0
REPLY_TIMEOUT = 5.0


class PunchError(Exception):
    """The peer sent something that is not a punch message."""


def parse_endpoint(text: Any) -> tuple[str, int] | None:
    """``"ip:port"`` as ``(ip, port)`` if it is a unicast IPv4 endpoint, else None."""
    if not isinstance(text, str) or text.count(":") != 1:
        return None
    host, _, port_text = text.partition(":")
    try:
        ip = ipaddress.IPv4Address(host)
        port = int(port_text)
    except ValueError:
        return None
    if (
        not 0 < port < 65536
        or ip.is_unspecified
        or ip.is_multicast
        or ip.is_loopback
        or ip == ipaddress.IPv4Address("255.255.255.255")
    ):
        return None
    return str(ip), port


def encode(endpoints: Iterable[tuple[str, int]]) -> bytes:
    """One punch message offering ``endpoints`` (the first :data:`MAX_ENDPOINTS`)."""
    listed = [f"{host}:{port}" for host, port in list(endpoints)[:MAX_ENDPOINTS]]
    return json.dumps({"op": "punch", "endpoints": listed}).encode()


def decode(data: bytes) -> list[tuple[str, int]]:
    """The endpoints of a punch message; :class:`PunchError` for anything malformed, and no other
    exception whatever ``data`` holds (a peer controls it)."""
    try:
        message = json.loads(data)
    except (ValueError, TypeError, RecursionError):
        raise PunchError("not a punch message") from None
    if not isinstance(message, dict) or message.get("op") != "punch" or not isinstance(message.get("endpoints"), list):
        raise PunchError("not a punch message")
    listed = message["endpoints"]
    if len(listed) > MAX_ENDPOINTS:
        raise PunchError(f"more than {MAX_ENDPOINTS} endpoints")
    endpoints = []
    for text in listed:
        endpoint = parse_endpoint(text)
        if endpoint is None:
            raise PunchError(f"not a public IPv4 endpoint: {str(text)[:40]!r}")
        endpoints.append(endpoint)
    return endpoints


@dataclass
class PunchState:
    """One link's hole punching: when the next attempt may start, and how the last ones went."""

    next_at: float = 0.0
    failures: int = 0
    running: bool = False
    answered_at: float = -1e9

    def due(self, now: float) -> bool:
        return not self.running and now >= self.next_at

    def failed(self, now: float) -> None:
        """An attempt opened nothing: back off (:data:`RETRY` … :data:`MAX_RETRY`)."""
        self.failures += 1
        self.next_at = now + min(MAX_RETRY, RETRY * 2 ** min(self.failures - 1, 16))

    def succeeded(self, now: float) -> None:
        self.failures = 0
        self.next_at = now + RETRY

    def may_answer(self, now: float) -> bool:
        """One answer per :data:`ANSWER_INTERVAL`: a peer cannot make us probe in a loop."""
        if now - self.answered_at < ANSWER_INTERVAL:
            return False
        self.answered_at = now
        return True
