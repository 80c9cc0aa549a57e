"""Admission: a peer gets in only by proving it holds the network token (docs/architecture.md §4).

libp2p's noise handshake proves *who* a peer is; this proves it is one of *us*. Right after a
connection is up, the dialler opens ``/kairos/admit/1.0.0`` and the two sides exchange:

1. dialler → listener: ``VERSION (1 byte, 2) ‖ nonce_d (32 bytes)``
2. listener → dialler: ``nonce_l (32 bytes) ‖ n (1 byte, 1..MAX_KEYS) ‖ n × proof_l (32 bytes)``
3. dialler → listener: ``proof_d (32 bytes)``
4. listener → dialler: ``VERDICT_ADMITTED (1 byte)``; on a bad proof it resets the stream instead.

A node holds one admission key, or two during a token rotation's grace window (the new token's
and the replaced one's, see :mod:`kairos_core.keys`). The listener proves under each of its keys;
the dialler answers under the first of its own keys that one of those proofs verifies, and the
listener accepts an answer under any of its keys. So a member that has not received the new token
yet and one that has still admit each other, both ways, while the grace window lasts. A version-1
hello (one proof in step 2) is still answered, under the listener's current key.

Each proof is ``HMAC-SHA256(admission_key, encoding)`` where the encoding is::

    b"kairos/admit/v1" ‖ role (b"L" listener, b"D" dialler) ‖ challenge nonce (32 bytes)
    ‖ len(dialler id) (2 bytes, big-endian) ‖ dialler id bytes
    ‖ len(listener id) (2 bytes, big-endian) ‖ listener id bytes

with peer ids as their raw multihash bytes (base58-decoded). The nonce is the *other* side's
fresh challenge, so a recorded proof never answers a new one; both ids are bound, so a proof cannot
be relayed to a third peer or reflected back with the roles swapped; the role byte keeps the
listener's proof from ever serving as the dialler's.

The crypto (:func:`admission_proof`, :func:`verify_admission_proof`) is pure; :func:`admit_as_dialler`
and :func:`admit_as_listener` run the exchange over any object with ``read(n)``/``write(data)``
coroutines, so they are tested without libp2p too.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from typing import Awaitable, Callable, Protocol, Sequence

import base58

from .errors import AdmissionError

ADMIT_PROTOCOL = "/kairos/admit/1.0.0"
ADMIT_VERSION = 2
ADMIT_VERSION_SINGLE_KEY = 1
# The most admission keys a listener proves under (two during a rotation's grace window).
MAX_KEYS = 4
NONCE_SIZE = 32
PROOF_SIZE = 32
VERDICT_ADMITTED = b"\x01"
ROLE_DIALLER = b"D"
ROLE_LISTENER = b"L"
_DOMAIN = b"kairos/admit/v1"


class ByteChannel(Protocol):
    """The little a handshake needs from a stream."""

    def read(self, n: int) -> Awaitable[bytes]:
        """Up to ``n`` bytes; ``b""`` at end of stream."""

    def write(self, data: bytes) -> Awaitable[None]:
        """Send ``data``."""


def fresh_nonce() -> bytes:
    """A 32-byte random challenge."""
    return secrets.token_bytes(NONCE_SIZE)


def _peer_id_bytes(peer_id: str) -> bytes:
    try:
        raw = base58.b58decode(peer_id)
    except Exception as exc:  # junk text is a caller bug, not a crypto failure
        raise ValueError(f"not a base58 peer id: {peer_id[:60]!r}") from exc
    if not raw or len(raw) > 0xFFFF:
        raise ValueError("peer id has an impossible length")
    return raw


def proof_message(role: bytes, nonce: bytes, dialler_id: str, listener_id: str) -> bytes:
    """The exact bytes a proof authenticates (see the module docstring)."""
    if role not in (ROLE_DIALLER, ROLE_LISTENER):
        raise ValueError("role is b'D' or b'L'")
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"a nonce is {NONCE_SIZE} bytes")
    dialler, listener = _peer_id_bytes(dialler_id), _peer_id_bytes(listener_id)
    return b"".join(
        (
            _DOMAIN,
            role,
            nonce,
            struct.pack(">H", len(dialler)),
            dialler,
            struct.pack(">H", len(listener)),
            listener,
        )
    )


def admission_proof(key: bytes, role: bytes, nonce: bytes, dialler_id: str, listener_id: str) -> bytes:
    """The 32-byte proof that the side playing ``role`` holds ``key``, answering ``nonce``."""
    return hmac.new(key, proof_message(role, nonce, dialler_id, listener_id), hashlib.sha256).digest()


def verify_admission_proof(key: bytes, role: bytes, nonce: bytes, dialler_id: str, listener_id: str, proof: bytes) -> bool:
    """True when ``proof`` is the right answer; constant-time, never raises on peer-made junk."""
    if len(proof) != PROOF_SIZE or len(nonce) != NONCE_SIZE:
        return False
    try:
        expected = admission_proof(key, role, nonce, dialler_id, listener_id)
    except ValueError:
        return False
    return hmac.compare_digest(expected, proof)


async def read_exactly(channel: ByteChannel, n: int) -> bytes:
    """Exactly ``n`` bytes or :class:`AdmissionError` (the peer hung up or sent too little)."""
    chunks: list[bytes] = []
    remaining = n
    while remaining:
        chunk = await channel.read(remaining)
        if not chunk:
            raise AdmissionError("peer closed the admission stream early")
        if len(chunk) > remaining:  # a reader that ignores n must not smuggle extra bytes in
            raise AdmissionError("admission stream returned more than asked")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _key_list(keys: bytes | Sequence[bytes]) -> list[bytes]:
    listed = [keys] if isinstance(keys, (bytes, bytearray)) else list(keys)
    if not 1 <= len(listed) <= MAX_KEYS:
        raise ValueError(f"admission takes 1 to {MAX_KEYS} keys")
    return [bytes(key) for key in listed]


async def admit_as_dialler(channel: ByteChannel, keys: bytes | Sequence[bytes], dialler_id: str, listener_id: str) -> None:
    """Run the dialler's side with ``keys`` (one, or the current and the replaced token's during a
    rotation); returns when both sides proved a common token, else raises."""
    ours = _key_list(keys)
    nonce_d = fresh_nonce()
    await channel.write(bytes([ADMIT_VERSION]) + nonce_d)
    head = await read_exactly(channel, NONCE_SIZE + 1)
    nonce_l, count = head[:NONCE_SIZE], head[NONCE_SIZE]
    if not 1 <= count <= MAX_KEYS:
        raise AdmissionError(f"listener {listener_id} sent {count} proofs")
    if nonce_l == nonce_d:
        raise AdmissionError("listener echoed our nonce")
    proofs = await read_exactly(channel, count * PROOF_SIZE)
    theirs = [proofs[i * PROOF_SIZE : (i + 1) * PROOF_SIZE] for i in range(count)]
    common = next(
        (
            key
            for key in ours
            for proof_l in theirs
            if verify_admission_proof(key, ROLE_LISTENER, nonce_d, dialler_id, listener_id, proof_l)
        ),
        None,
    )
    if common is None:
        raise AdmissionError(f"listener {listener_id} does not hold the network token")
    await channel.write(admission_proof(common, ROLE_DIALLER, nonce_l, dialler_id, listener_id))
    verdict = await read_exactly(channel, 1)
    if verdict != VERDICT_ADMITTED:
        raise AdmissionError(f"listener {listener_id} refused our proof")


async def admit_as_listener(
    channel: ByteChannel,
    keys: bytes | Sequence[bytes],
    dialler_id: str,
    listener_id: str,
    nonce_factory: Callable[[], bytes] = fresh_nonce,
) -> None:
    """Run the listener's side with ``keys`` (see :func:`admit_as_dialler`); returns when the
    dialler proved one of them, else raises."""
    ours = _key_list(keys)
    hello = await read_exactly(channel, 1 + NONCE_SIZE)
    if hello[0] not in (ADMIT_VERSION, ADMIT_VERSION_SINGLE_KEY):
        raise AdmissionError(f"unknown admission version {hello[0]}")
    nonce_d = hello[1:]
    nonce_l = nonce_factory()
    if nonce_l == nonce_d:  # astronomically unlikely; refusing keeps the proofs unambiguous
        raise AdmissionError("dialler sent our nonce")
    proofs = [admission_proof(key, ROLE_LISTENER, nonce_d, dialler_id, listener_id) for key in ours]
    if hello[0] == ADMIT_VERSION_SINGLE_KEY:
        await channel.write(nonce_l + proofs[0])
    else:
        await channel.write(nonce_l + bytes([len(proofs)]) + b"".join(proofs))
    proof_d = await read_exactly(channel, PROOF_SIZE)
    if not any(verify_admission_proof(key, ROLE_DIALLER, nonce_l, dialler_id, listener_id, proof_d) for key in ours):
        raise AdmissionError(f"dialler {dialler_id} does not hold the network token")
    await channel.write(VERDICT_ADMITTED)
