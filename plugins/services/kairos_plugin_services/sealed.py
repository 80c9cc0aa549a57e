"""The side connection: a direct TCP connection whose every byte is sealed with AES-256-GCM.

The admitted libp2p stream (noise-encrypted and authenticated to both peer ids) carries the
negotiation: each end sends 32 random bytes there, and the exposing end a 16-byte ticket. Only
the two ends of that stream know the nonces, so keys derived from them with HKDF are known to
nobody else, and a side connection that proves it holds them is the peer of the stream:

- the connecting end opens TCP to the exposing node's side listener, sends the ticket in clear
  (it only says which negotiation this is), then a sealed ``HELLO`` record;
- the exposing end opens that record with the key derived for the ticket — anyone else's
  garbage fails and is dropped, the ticket stays waiting for the real peer — and answers with a
  sealed ``HELLO`` of its own, which the connecting end checks before it sends a byte of data.

Records are ``length (4 bytes) | kind (1 byte) | AES-GCM(data)``; the kind is authenticated as
associated data, and the nonce is a per-direction counter that is never sent, so a record that is
replayed, reordered, dropped or altered fails to open. The end of a direction is a sealed ``END``
record: a connection that closes without one was cut, and the relay aborts instead of passing a
truncated stream off as a clean end.

A proven side connection can also wait, idle, in a **pool** (negotiated ahead on the stream with a
``pool`` request instead of a service request): a new connection then sends its request as a
sealed ``OPEN`` record and gets the answer as a sealed ``ANSWER`` — one round trip on a plain TCP
connection instead of a libp2p stream open, a request, the side dial and the HELLOs.
"""

from __future__ import annotations

import asyncio
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TICKET_SIZE = 16
NONCE_SIZE = 32
#: plaintext bytes per record: large, so the per-record Python cost is spread over many bytes
RECORD_DATA = 256 * 1024
TAG_SIZE = 16
HEADER = struct.Struct(">IB")
KIND_HELLO, KIND_DATA, KIND_END = 1, 2, 3
#: on a pooled side connection (proven, idle): the connecting end's request and the exposing end's answer
KIND_OPEN, KIND_ANSWER = 4, 5
_INFO = b"kairos/service/1.0.0 side connection"


class SealError(Exception):
    """A record that does not open: forged, altered, replayed, reordered, or not a record."""


def new_nonce() -> bytes:
    """32 random bytes, one end's contribution to the keys."""
    return os.urandom(NONCE_SIZE)


def new_ticket() -> bytes:
    """16 random bytes naming one negotiation."""
    return os.urandom(TICKET_SIZE)


def derive_keys(connector_nonce: bytes, exposer_nonce: bytes, ticket: bytes) -> tuple[bytes, bytes]:
    """``(connector → exposer key, exposer → connector key)``, 32 bytes each."""
    if len(connector_nonce) != NONCE_SIZE or len(exposer_nonce) != NONCE_SIZE or len(ticket) != TICKET_SIZE:
        raise SealError("nonces of 32 bytes and a ticket of 16 are needed")
    material = HKDF(algorithm=hashes.SHA256(), length=64, salt=ticket, info=_INFO).derive(connector_nonce + exposer_nonce)
    return material[:32], material[32:]


class Sealer:
    """Seals the records of one direction."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._counter = 0

    def seal(self, kind: int, data: bytes = b"") -> bytes:
        """One record, ready to send."""
        nonce = self._counter.to_bytes(12, "big")
        self._counter += 1
        header_kind = bytes((kind,))
        sealed = self._aead.encrypt(nonce, data, header_kind)
        return HEADER.pack(len(sealed), kind) + sealed


class Opener:
    """Opens the records of one direction, in order."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._counter = 0

    def open(self, kind: int, sealed: bytes) -> bytes:
        """The data of a record whose header said ``kind``; :class:`SealError` when it does not open."""
        nonce = self._counter.to_bytes(12, "big")
        try:
            data = self._aead.decrypt(nonce, sealed, bytes((kind,)))
        except InvalidTag:
            raise SealError("a record failed authentication") from None
        self._counter += 1
        return data

    async def read(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        """The next record's ``(kind, data)``; :class:`SealError` when it does not open or the
        header is not one of ours, ``asyncio.IncompleteReadError`` when the connection ends."""
        length, kind = HEADER.unpack(await reader.readexactly(HEADER.size))
        if (
            kind not in (KIND_HELLO, KIND_DATA, KIND_END, KIND_OPEN, KIND_ANSWER)
            or not TAG_SIZE <= length <= RECORD_DATA + TAG_SIZE
        ):
            raise SealError(f"not a record (kind {kind}, length {length})")
        return kind, self.open(kind, await reader.readexactly(length))
