"""The messages of ``/kairos/service/1.0.0``, as length-prefixed JSON frames.

1. connecting end → exposing end, the **request**:
   ``{"service": NAME, "protocol": "tcp"|"udp", "side": <base64 32-byte nonce> | null}``
2. exposing end → connecting end, the **answer**, once it has reached the target:
   ``{"ok": true, "side": null | {"ticket": b64, "nonce": b64, "port": P, "hosts": [...]}}`` or
   ``{"ok": false, "error": "…"}`` (then the stream is closed).
3. TCP only, connecting end → exposing end, the **mode**: ``{"mode": "side"}`` (the bytes go over
   the side connection, which is already proven: see :mod:`.sealed`) or ``{"mode": "stream"}``
   (the bytes follow on this stream, raw).

Instead of the request, a connecting end may send a **pool request** ``{"pool": <b64 nonce>}``:
the answer offers a side connection as above, the mode frame says whether it was made, and a
proven one then waits idle, both ends holding it, until the connecting end sends a service request
on it (sealed ``OPEN``, the same JSON with ``side: null``), answered by a sealed ``ANSWER`` (the
answer's JSON with ``side: null``); see :mod:`.sealed`.

After that a TCP service's bytes flow raw on the stream (or sealed on the side connection); a UDP
service's datagrams flow one per frame, both ways. Everything a peer sends is checked here: a
message that is not exactly of its shape is ``None`` and the stream is dropped and counted.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
from typing import Any

from .catalog import NAME_PATTERN, PROTOCOLS
from .sealed import NONCE_SIZE, TICKET_SIZE

PROTOCOL = "/kairos/service/1.0.0"
#: bytes a request, answer or mode frame may have (a longer one is never read: the stream is reset)
MAX_MESSAGE = 4096
#: a UDP datagram as one frame (the largest an IPv4 UDP payload can be, and then some)
MAX_DATAGRAM = 65535
MAX_HOSTS = 8


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any, size: int) -> bytes | None:
    if not isinstance(text, str) or len(text) > 64:
        return None
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if len(data) == size else None


def request(service: str, protocol: str, side_nonce: bytes | None) -> bytes:
    return encode({"service": service, "protocol": protocol, "side": b64(side_nonce) if side_nonce else None})


def parse_request(raw: bytes) -> tuple[str, str, bytes | None] | None:
    """``(service, protocol, side nonce or None)``, or None for anything else."""
    message = _decode(raw)
    if not isinstance(message, dict) or set(message) != {"service", "protocol", "side"}:
        return None
    service, protocol, side = message["service"], message["protocol"], message["side"]
    if not isinstance(service, str) or not NAME_PATTERN.fullmatch(service) or protocol not in PROTOCOLS:
        return None
    if side is None:
        return service, protocol, None
    nonce = _unb64(side, NONCE_SIZE)
    return None if nonce is None else (service, protocol, nonce)


def pool_request(side_nonce: bytes) -> bytes:
    return encode({"pool": b64(side_nonce)})


def parse_pool_request(raw: bytes) -> bytes | None:
    """The side nonce of a pool request, or None for anything else."""
    message = _decode(raw)
    if not isinstance(message, dict) or set(message) != {"pool"}:
        return None
    return _unb64(message["pool"], NONCE_SIZE)


def refusal(error: str) -> bytes:
    return encode({"ok": False, "error": error})


def acceptance(side: dict[str, Any] | None) -> bytes:
    return encode({"ok": True, "side": side})


def side_offer(ticket: bytes, nonce: bytes, port: int, hosts: list[str]) -> dict[str, Any]:
    return {"ticket": b64(ticket), "nonce": b64(nonce), "port": port, "hosts": hosts[:MAX_HOSTS]}


def parse_answer(raw: bytes) -> tuple[bool, str, dict[str, Any] | None] | None:
    """``(ok, error, side offer or None)``, or None when the answer is not one. A side offer
    comes back with ``ticket`` and ``nonce`` as bytes, checked."""
    message = _decode(raw)
    if not isinstance(message, dict) or not isinstance(message.get("ok"), bool):
        return None
    if not message["ok"]:
        error = message.get("error")
        if not isinstance(error, str):
            return None
        return False, "".join(c if c.isprintable() else "?" for c in error[:200]), None
    side = message.get("side")
    if side is None:
        return True, "", None
    if not isinstance(side, dict):
        return None
    ticket, nonce = _unb64(side.get("ticket"), TICKET_SIZE), _unb64(side.get("nonce"), NONCE_SIZE)
    port, hosts = side.get("port"), side.get("hosts")
    if ticket is None or nonce is None or not isinstance(port, int) or not 0 < port < 65536:
        return None
    # IP addresses only: an exposing node must not make us resolve names of its choosing
    if not isinstance(hosts, list) or not all(isinstance(h, str) and _is_ip(h) for h in hosts):
        return None
    return True, "", {"ticket": ticket, "nonce": nonce, "port": port, "hosts": hosts[:MAX_HOSTS]}


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def mode(side: bool) -> bytes:
    return encode({"mode": "side" if side else "stream"})


def parse_mode(raw: bytes) -> str | None:
    message = _decode(raw)
    if isinstance(message, dict) and set(message) == {"mode"} and message["mode"] in ("side", "stream"):
        return str(message["mode"])
    return None
