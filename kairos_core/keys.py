"""Everything derived from the network token: OTP windows, rendezvous names, topic and keys.

Time is cut into windows ``w = floor(unix_time / interval)``. A time-derived value is accepted for
windows ``w-1, w, w+1``, so nodes whose clocks differ by less than one interval always agree.

Each derived value is ``HKDF-SHA256(ikm, info=<purpose label>)``; for time-derived values the
``ikm`` is the OTP of the window, ``HMAC-SHA256(key, 8-byte big-endian w)`` (EdgeVPN's OTP before
its base64/truncation/MD5 steps, which we drop: full 256-bit keys). A distinct label per purpose
means that learning one derived value (a rendezvous name is public on the LAN) reveals nothing of
another (the seal key).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from functools import lru_cache

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .token import NetworkToken

PROTOCOL_VERSION = 1
LABEL_RENDEZVOUS = b"kairos/v1/rendezvous"
LABEL_SEAL = b"kairos/v1/seal"
LABEL_TOPIC = b"kairos/v1/topic"
LABEL_ADMISSION = b"kairos/v1/admission"


def window(now: float, interval: int) -> int:
    """The OTP window that ``now`` (unix seconds) falls in."""
    return int(now // interval)


def otp(key: str, window_number: int) -> bytes:
    """The raw 32-byte OTP of ``key`` for one window (windows start at 0)."""
    if window_number < 0:
        raise ValueError(f"no OTP window before 0 (asked for {window_number})")
    return hmac.new(key.encode(), struct.pack(">Q", window_number), hashlib.sha256).digest()


def derive(ikm: bytes, label: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 of ``ikm`` for one purpose."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label).derive(ikm)


class _TokenKeys:
    """The values one token yields (a :class:`KeySchedule` holds one or two: see rotation)."""

    def __init__(self, token: NetworkToken) -> None:
        self.token = token
        self.admission_key = derive(token.crypto.key.encode(), LABEL_ADMISSION)
        # Bounded caches: a node only ever asks for a handful of windows around now.
        self.seal_key = lru_cache(maxsize=8)(self._derive_seal_key)
        self.rendezvous = lru_cache(maxsize=8)(self._derive_rendezvous)

    def _derive_seal_key(self, window_number: int) -> bytes:
        return derive(otp(self.token.crypto.key, window_number), LABEL_SEAL)

    def _derive_rendezvous(self, window_number: int) -> str:
        return derive(otp(self.token.dht.key, window_number), LABEL_RENDEZVOUS, 16).hex()


class KeySchedule:
    """The values the network token yields, per window, with the clock as a parameter for tests.

    After a rotation (:meth:`rotate`, ``kairos token rotate``) the schedule holds two tokens until
    the grace window ends: the new one, which seals, proves and announces, and the old one, still
    accepted (admission proofs, sealed frames, rendezvous names) so that members that have not
    switched yet are not split off. Once the window ends only the new one counts, and a node that
    holds only the old token (a revoked one) opens nothing.
    """

    def __init__(self, token: NetworkToken, clock=time.time) -> None:
        self.clock = clock
        self._current = _TokenKeys(token)
        self._previous: _TokenKeys | None = None
        self.grace_until = 0.0
        # The topic depends on the room only, which a rotation keeps (token.rotated_token).
        self.topic = "/kairos/1/" + derive(token.room.encode(), LABEL_TOPIC, 16).hex()

    @property
    def token(self) -> NetworkToken:
        """The token this node seals, proves and announces with."""
        return self._current.token

    @property
    def admission_key(self) -> bytes:
        """The admission key of :attr:`token`."""
        return self._current.admission_key

    # --- rotation ----------------------------------------------------------------------------
    def rotate(self, new_token: NetworkToken, grace_until: float) -> None:
        """Switch to ``new_token``; the current one stays accepted until ``grace_until`` (unix s)."""
        if new_token.room != self.token.room or new_token.crypto.interval != self.token.crypto.interval:
            raise ValueError("a rotated token keeps the room and the intervals of the one it replaces")
        if new_token == self.token:
            return
        # grace first: the trio thread may read the schedule meanwhile, and any order it sees of
        # these three assignments accepts at least the token it held before
        self.grace_until = grace_until
        self._previous, self._current = self._current, _TokenKeys(new_token)

    def previous(self, now: float | None = None) -> NetworkToken | None:
        """The token replaced by the last rotation while its grace window lasts, else None."""
        if self._previous is None or (self.clock() if now is None else now) >= self.grace_until:
            return None
        return self._previous.token

    def _accepted(self, now: float | None = None) -> list[_TokenKeys]:
        if self.previous(now) is None:
            return [self._current]
        return [self._current, self._previous]  # type: ignore[list-item]

    def admission_keys(self, now: float | None = None) -> list[bytes]:
        """The admission keys accepted now: the current token's first, then the replaced one's."""
        return [keys.admission_key for keys in self._accepted(now)]

    def seal_keys(self, window_number: int, now: float | None = None) -> list[bytes]:
        """The seal keys that open frames of ``window_number`` now (the current token's first)."""
        return [keys.seal_key(window_number) for keys in self._accepted(now)]

    # --- windows -----------------------------------------------------------------------------
    def seal_window(self, now: float | None = None) -> int:
        """The current window of the crypto OTP."""
        return window(self.clock() if now is None else now, self.token.crypto.interval)

    def dht_window(self, now: float | None = None) -> int:
        """The current window of the DHT OTP."""
        return window(self.clock() if now is None else now, self.token.dht.interval)

    def accepted_seal_windows(self, now: float | None = None) -> tuple[int, ...]:
        """The windows whose seal keys open frames now: current first, then w-1, then w+1."""
        w = self.seal_window(now)
        return (w, w - 1, w + 1) if w > 0 else (w, w + 1)

    # --- derived values ----------------------------------------------------------------------
    def seal_key(self, window_number: int) -> bytes:
        """The AES-256 key that seals gossip frames in one window (the current token's)."""
        return self._current.seal_key(window_number)

    def rendezvous(self, window_number: int) -> str:
        """The rendezvous name (DHT key and mDNS instance name) of one window; 32 hex chars."""
        return self._current.rendezvous(window_number)

    def current_rendezvous(self, now: float | None = None) -> tuple[str, ...]:
        """The names to announce and look up now: this window's, then the previous one's, then
        (during a rotation's grace window) the replaced token's.

        In window 0 there is no previous window — and a Kairos token (interval = max int64) is in
        window 0 forever — so only one name per token is returned.
        """
        w = self.dht_window(now)
        names: list[str] = []
        for keys in self._accepted(now):
            names.extend((keys.rendezvous(w), keys.rendezvous(w - 1)) if w > 0 else (keys.rendezvous(w),))
        return tuple(names)
