"""The VPN's wire format: one sealed inner IP packet per UDP datagram (big-endian)::

    kind=1 (1) | epoch (1) | csum_start (1) | csum_offset (1) | key id (4) | counter (8)
    | AES-256-GCM(inner IP packet) with the 16 header bytes as associated data | tag (16)

The nonce is the header's last 12 bytes (key id + counter): unique per key, never sent twice.

``csum_start/csum_offset`` are non-zero when the inner packet's L4 checksum is partial (the
receiving kernel finishes it): see :mod:`.vnet`.

Besides the layout, the views the data plane seals into and opens from: per position of a train
of equal-sized datagrams, the ``encrypt_into`` / ``decrypt_into`` arguments as memoryviews, made
once per datagram size and reused for every train (:func:`seal_slots`, :func:`open_slots`).
"""

from __future__ import annotations

import struct
from typing import Any

from .crypto import TAG_BYTES
from .vnet import VNET_HDR_LEN

WIRE_HEADER = struct.Struct("!BBBBIQ")
HEADER_BYTES = WIRE_HEADER.size
OVERHEAD = HEADER_BYTES + TAG_BYTES
KIND_DATA = 1
MAX_UDP_PAYLOAD = 65507  # the largest UDP payload over IPv4
WIRE_WORDS = struct.Struct("!QQ")  # a wire header as two integers: (kind … key id) and counter
KEY_ID = struct.Struct("!I")  # at offset 4 of a wire header

#: the ``encrypt_into`` arguments at one train position: nonce, inner packet, associated data, destination
SealSlot = tuple[memoryview, memoryview, memoryview, memoryview]
#: one train position for opening: the datagram, the ``decrypt_into`` arguments (nonce, sealed
#: packet, associated data, destination) and the inner packet's length
OpenSlot = tuple[memoryview, memoryview, memoryview, memoryview, memoryview, int]
#: the per-thread cache of open slots by datagram size (``-size``: the C path's inner-packet views)
OpenViews = dict[int, list[Any]]


def seal_slots(out_view: memoryview, size: int, length: int, slots: int) -> list[SealSlot]:
    """The ``encrypt_into`` arguments (nonce, inner packet, associated data, destination) of an
    inner packet of ``length`` bytes at each of ``slots`` train positions ``size`` bytes apart."""
    views: list[SealSlot] = []
    for slot in range(slots):
        at = slot * size
        body = at + HEADER_BYTES
        views.append(
            (
                out_view[at + 4 : body],
                out_view[body : body + length],
                out_view[at:body],
                out_view[body : body + length + TAG_BYTES],
            )
        )
    return views


def open_slots(view: memoryview, rx_view: memoryview, size: int, slots: int) -> list[OpenSlot]:
    """Per train position of ``size``-byte datagrams in ``view``: the datagram, the
    ``decrypt_into`` arguments (nonce, sealed packet, associated data, destination in
    ``rx_view`` after the vnet header) and the inner packet's length."""
    length = size - OVERHEAD
    inner = rx_view[VNET_HDR_LEN : VNET_HDR_LEN + length]
    views: list[OpenSlot] = []
    for slot in range(slots):
        datagram = view[slot * size : slot * size + size]
        views.append((datagram, datagram[4:HEADER_BYTES], datagram[HEADER_BYTES:], datagram[:HEADER_BYTES], inner, length))
    return views
