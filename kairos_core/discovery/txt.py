"""The TXT record of a kairos mDNS announcement: who the peer is and where to dial it.

Version 1 holds ``v=1``, ``id=<peer id>`` and the node's concrete multiaddrs, space-separated and
cut into ``a0``, ``a1``, … so that no TXT string exceeds 255 bytes however long the list. The
record comes from the LAN, so decoding trusts nothing: a record that is not a well-formed
announcement raises :class:`MalformedAnnouncement`, addresses that do not parse
(:mod:`kairos_core.multiaddrs`) or that name another peer are left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .. import multiaddrs
from ..identity import public_key_from_peer_id

TXT_VERSION = b"1"
# One TXT string holds at most 255 bytes, ``a<n>=`` included.
TXT_CHUNK = 200
MAX_TXT_CHUNKS = 40
MAX_ADDRS = 32
MAX_ADDR_LENGTH = 400
# A TXT record larger than this is not one of ours (and an mDNS packet is ~9 kB at most anyway).
MAX_TXT_BYTES = 9000
# Printable ASCII without spaces: spaces separate addresses in the TXT chunks.
_MULTIADDR_RE = re.compile(r"^(/[\x21-\x2e\x30-\x7e]+)+$")


class MalformedAnnouncement(ValueError):
    """A TXT record that is not a valid kairos announcement."""


@dataclass(frozen=True)
class Announcement:
    """What one TXT record says: who the peer is and where to dial it."""

    peer_id: str
    addrs: tuple[str, ...]


def usable_multiaddr(addr: object, peer_id: str | None = None) -> bool:
    """True for a well-formed, concrete multiaddr (no ``0.0.0.0`` or ``::``) that fits the record;
    with ``peer_id``, one whose ``/p2p/`` parts name that peer only."""
    if not isinstance(addr, str) or len(addr) > MAX_ADDR_LENGTH or _MULTIADDR_RE.match(addr) is None:
        return False
    parts = multiaddrs.components(addr)  # parsed once: this runs for every address a LAN announces
    if parts is None or multiaddrs.has_wildcard(parts):
        return False
    return peer_id is None or all(value == peer_id for protocol, value in parts if protocol == "p2p")


def encode_txt(peer_id: str, addrs: Iterable[str]) -> dict[bytes, bytes]:
    """The TXT properties announcing ``peer_id`` at ``addrs``.

    Unusable addresses (wildcards, junk) are left out; ``ValueError`` when none is left. The
    space-separated address list is cut into ``a0``, ``a1``, … so that no TXT string exceeds 255
    bytes however long the list.
    """
    usable = list(dict.fromkeys(a for a in addrs if usable_multiaddr(a)))[:MAX_ADDRS]
    if not usable:
        raise ValueError("no concrete multiaddr to announce (wildcard addresses are never announced)")
    joined = " ".join(usable).encode()
    chunks = [joined[i : i + TXT_CHUNK] for i in range(0, len(joined), TXT_CHUNK)]
    props = {b"v": TXT_VERSION, b"id": peer_id.encode()}
    props.update({f"a{i}".encode(): chunk for i, chunk in enumerate(chunks)})
    return props


def pack_txt(props: Mapping[bytes, bytes | None]) -> bytes:
    """The wire form of TXT properties (length-prefixed ``key=value`` strings)."""
    out = bytearray()
    for key, value in props.items():
        item = key if value is None else key + b"=" + value
        if len(item) > 255:
            raise ValueError(f"TXT string for {key!r} is {len(item)} bytes (max 255)")
        out += bytes((len(item),)) + item
    return bytes(out)


def unpack_txt(text: bytes) -> dict[bytes, bytes | None]:
    """Parse the wire form of a TXT record; :class:`MalformedAnnouncement` when it is broken."""
    if len(text) > MAX_TXT_BYTES:
        raise MalformedAnnouncement(f"TXT record of {len(text)} bytes")
    props: dict[bytes, bytes | None] = {}
    index = 0
    while index < len(text):
        length = text[index]
        index += 1
        if index + length > len(text):
            raise MalformedAnnouncement("truncated TXT string")
        item = text[index : index + length]
        index += length
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        # RFC 6763 §6.4: a repeated key is ignored after its first occurrence.
        props.setdefault(key, value if sep else None)
    return props


def decode_txt(record: bytes | Mapping[bytes, bytes | None]) -> Announcement:
    """The announcement in a TXT record (wire bytes or parsed properties).

    Raises :class:`MalformedAnnouncement` for anything that is not a well-formed version-1
    record with a valid ed25519 peer id and at least one usable address. Addresses that are
    unusable, or that name a different peer in their ``/p2p/`` part, are left out.
    """
    props = unpack_txt(record) if isinstance(record, (bytes, bytearray)) else record
    if props.get(b"v") != TXT_VERSION:
        raise MalformedAnnouncement(f"TXT version {props.get(b'v')!r} is not {TXT_VERSION!r}")
    raw_id = props.get(b"id")
    if not raw_id:
        raise MalformedAnnouncement("TXT record has no peer id")
    try:
        peer_id = raw_id.decode("ascii")
        public_key_from_peer_id(peer_id)
    except (UnicodeDecodeError, ValueError):
        raise MalformedAnnouncement("TXT peer id is not an ed25519 peer id") from None
    chunks = []
    for i in range(MAX_TXT_CHUNKS + 1):
        chunk = props.get(f"a{i}".encode())
        if chunk is None:
            break
        chunks.append(chunk)
    if not chunks or len(chunks) > MAX_TXT_CHUNKS:
        raise MalformedAnnouncement(f"TXT record has {len(chunks)} address chunks")
    try:
        joined = b"".join(chunks).decode("ascii")
    except UnicodeDecodeError:
        raise MalformedAnnouncement("TXT addresses are not ASCII") from None
    # An honest record holds at most MAX_ADDRS addresses; looking at twice as many bounds what
    # parsing a record made of junk can cost (each candidate is parsed by py-multiaddr).
    addrs = [a for a in joined.split(" ")[: 2 * MAX_ADDRS] if usable_multiaddr(a, peer_id)]
    if not addrs:
        raise MalformedAnnouncement("TXT record has no usable address")
    return Announcement(peer_id, tuple(dict.fromkeys(addrs[:MAX_ADDRS])))
