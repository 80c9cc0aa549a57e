"""AEAD sealing of gossip frames with keys that rotate by OTP window.

Frame layout (all integers big-endian)::

    version (1 byte) | window (8 bytes) | nonce (12 bytes) | AES-256-GCM ciphertext + 16-byte tag

The window travels in the clear so the receiver picks the right key at once instead of trying
three. The associated data binds version, topic and window: a frame cannot be moved to another
network's topic or replayed under another window's key. A frame that does not open is rejected as
a whole with a typed :class:`SealError` — never half-processed.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .keys import PROTOCOL_VERSION, KeySchedule

_HEADER = struct.Struct(">BQ")
NONCE_BYTES = 12
TAG_BYTES = 16
OVERHEAD = _HEADER.size + NONCE_BYTES + TAG_BYTES
# Remember this many nonces of opened frames to refuse replays. Replays are harmless to the
# ledger (merge is idempotent) but would cost CPU and inflate counters; older frames fall out
# with their window anyway.
REPLAY_MEMORY = 65536


class SealError(Exception):
    """A frame was refused. ``reason`` is a short stable word, used as a counter name."""

    reason = "invalid"


class FrameTooShort(SealError):
    """Shorter than the header, nonce and tag."""

    reason = "too_short"


class FrameTooLarge(SealError):
    """Larger than the token's ``max_message_size``."""

    reason = "too_large"


class UnknownVersion(SealError):
    """Sealed by a protocol version this node does not speak."""

    reason = "unknown_version"


class WindowNotAccepted(SealError):
    """Sealed in a window outside w-1..w+1 (a clock too far off, or an old frame)."""

    reason = "stale_window"


class AuthenticationFailed(SealError):
    """Does not open: another network's key or topic, or tampered with."""

    reason = "bad_seal"


class ReplayedFrame(SealError):
    """Opened once already (same nonce)."""

    reason = "replayed"


class Sealer:
    """Seals and opens frames for one topic under a token's key schedule."""

    def __init__(self, schedule: KeySchedule, topic: str | None = None, max_frame_size: int | None = None) -> None:
        self.schedule = schedule
        self.topic = (topic or schedule.topic).encode()
        self.max_frame_size = max_frame_size or schedule.token.max_message_size
        self._ciphers: dict[bytes, AESGCM] = {}  # seal key -> its cipher
        self._seen_nonces: OrderedDict[bytes, None] = OrderedDict()

    def _cipher(self, key: bytes) -> AESGCM:
        cipher = self._ciphers.get(key)
        if cipher is None:
            if len(self._ciphers) > 16:  # keep only windows near now (of two tokens at most)
                self._ciphers.clear()
            cipher = self._ciphers[key] = AESGCM(key)
        return cipher

    def _associated_data(self, header: bytes) -> bytes:
        return header + self.topic

    def seal(self, plaintext: bytes, now: float | None = None) -> bytes:
        """Seal ``plaintext`` under the current window's key."""
        if len(plaintext) + OVERHEAD > self.max_frame_size:
            raise FrameTooLarge(f"frame of {len(plaintext) + OVERHEAD} bytes exceeds {self.max_frame_size}")
        window_number = self.schedule.seal_window(now)
        header = _HEADER.pack(PROTOCOL_VERSION, window_number)
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = self._cipher(self.schedule.seal_key(window_number)).encrypt(nonce, plaintext, self._associated_data(header))
        return header + nonce + ciphertext

    def open(self, frame: bytes, now: float | None = None, check_replay: bool = True) -> bytes:
        """Open a frame sealed by any node of this network, or raise a :class:`SealError`."""
        if len(frame) > self.max_frame_size:
            raise FrameTooLarge(f"frame of {len(frame)} bytes exceeds {self.max_frame_size}")
        if len(frame) < OVERHEAD:
            raise FrameTooShort(f"frame of {len(frame)} bytes is shorter than the {OVERHEAD}-byte overhead")
        version, window_number = _HEADER.unpack_from(frame)
        if version != PROTOCOL_VERSION:
            raise UnknownVersion(f"frame version {version} is not {PROTOCOL_VERSION}")
        if window_number not in self.schedule.accepted_seal_windows(now):
            raise WindowNotAccepted(f"frame window {window_number} is outside the accepted windows")
        header = frame[: _HEADER.size]
        nonce = bytes(frame[_HEADER.size : _HEADER.size + NONCE_BYTES])
        if check_replay and nonce in self._seen_nonces:
            raise ReplayedFrame("frame was already opened once")
        # The current token's key first; during a rotation's grace window, the replaced one's too.
        body, associated = bytes(frame[_HEADER.size + NONCE_BYTES :]), self._associated_data(header)
        for key in self.schedule.seal_keys(window_number, now):
            try:
                plaintext = self._cipher(key).decrypt(nonce, body, associated)
                break
            except InvalidTag:
                continue
        else:
            raise AuthenticationFailed("frame does not open under this network's key")
        if check_replay:  # only authentic frames may occupy replay memory
            self._seen_nonces[nonce] = None
            if len(self._seen_nonces) > REPLAY_MEMORY:
                self._seen_nonces.popitem(last=False)
        return plaintext
