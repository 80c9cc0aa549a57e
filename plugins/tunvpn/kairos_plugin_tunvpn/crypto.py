"""Per-pair session keys, counter nonces, a sliding replay window and key epochs.

Two nodes agree a shared secret (the lead does that over an admitted libp2p stream) and each
derives the same :class:`SessionKeys`, mirrored: A's send key is B's receive key. Each direction
has its own key and its own *key id*, a 32-bit number in every datagram that tells the receiver
which peer (and so which key) a datagram claims to come from, without trusting its address.

Nonces are the 4-byte key id + the 8-byte big-endian packet counter of the sending side,
strictly increasing per key, so never reused. Keys move through *epochs*: the sender switches
to ``next = HKDF(current, "next")`` after :attr:`SendState.rekey_after_packets` packets or
:attr:`SendState.rekey_after_seconds` seconds, restarting its counter. The receiver accepts the
current epoch, the previous one (packets still in flight) and the next one (the switch itself);
each epoch has its own :class:`ReplayWindow`.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from . import fastpath
from .fastpath import GcmKey


def fast_key(key: bytes) -> "GcmKey | None":
    """The C cipher of ``key``, or None on the pure-Python path (see :mod:`.fastpath`)."""
    return GcmKey(key) if fastpath.enabled() else None


KEY_BYTES = 32
TAG_BYTES = 16
REPLAY_WINDOW_BITS = 2048
# AES-GCM with 96-bit counter nonces is safe far beyond this; rekeying keeps per-key volume and
# key lifetime small, like WireGuard's two-minute sessions.
REKEY_AFTER_PACKETS = 1 << 32
REKEY_AFTER_SECONDS = 120.0
_NONCE = struct.Struct("!IQ")
_LABEL = b"kairos/v1/tunvpn/"


def derive(ikm: bytes, label: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 of ``ikm`` for one purpose: no salt, ``info = label``, ``length`` bytes.

    Every session key, key id and epoch key comes from here, so its output is the wire format:
    two versions that derive differently cannot talk. The tests pin known vectors.
    """
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label).derive(ikm)


def nonce_for(key_id: int, counter: int) -> bytes:
    """The 12-byte AES-GCM nonce of packet number ``counter`` under the key with ``key_id``."""
    return _NONCE.pack(key_id, counter)


def next_epoch_key(key: bytes) -> bytes:
    """The key of the epoch after the one whose key is ``key`` (one-way: old keys stay secret)."""
    return derive(key, _LABEL + b"next-epoch")


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


@dataclass(frozen=True)
class SessionKeys:
    """The keys of one node for talking to one peer: a send and a receive key, each with an id."""

    send_key: bytes
    receive_key: bytes
    send_key_id: int
    receive_key_id: int

    @classmethod
    def derive(cls, shared_secret: bytes, local_id: str | bytes, remote_id: str | bytes) -> "SessionKeys":
        """Derive the keys of ``local_id`` towards ``remote_id`` from a secret both sides know.

        The remote side calls this with the ids swapped and gets the mirror image.
        """
        if len(shared_secret) < 16:
            raise ValueError("a session secret needs at least 16 bytes")
        local, remote = _as_bytes(local_id), _as_bytes(remote_id)
        if local == remote:
            raise ValueError("a session needs two different ends")

        def direction(sender: bytes, receiver: bytes) -> tuple[bytes, int]:
            label = _LABEL + len(sender).to_bytes(2, "big") + sender + receiver
            key = derive(shared_secret, label + b"/key")
            key_id = int.from_bytes(derive(shared_secret, label + b"/id", 4), "big")
            return key, key_id

        send_key, send_key_id = direction(local, remote)
        receive_key, receive_key_id = direction(remote, local)
        return cls(send_key, receive_key, send_key_id, receive_key_id)

    def mirror(self) -> "SessionKeys":
        """The same session seen from the other end (handy in tests)."""
        return SessionKeys(self.receive_key, self.send_key, self.receive_key_id, self.send_key_id)


class ReplayWindow:
    """Accepts each counter once, and nothing older than ``size`` below the highest seen.

    The window is one Python integer used as a bitmap: bit ``i`` set = counter ``highest - i``
    was seen. :meth:`check` is cheap and side-effect free, so a datagram is checked before the
    costly decryption and :meth:`update` is called only once it proved authentic — forged
    datagrams never move the window.

    ``highest``, ``bits`` (the bitmap) and ``mask`` (``size`` one bits) are public so that a hot
    loop may run the same logic on local variables and store them back; bits above ``mask`` do
    not matter to :meth:`check`.
    """

    __slots__ = ("size", "highest", "bits", "mask")

    def __init__(self, size: int = REPLAY_WINDOW_BITS) -> None:
        if size < 1:
            raise ValueError("a replay window needs at least one bit")
        self.size = size
        self.highest = -1
        self.bits = 0
        self.mask = (1 << size) - 1

    def check(self, counter: int) -> bool:
        """True if ``counter`` is new and not too old."""
        if counter > self.highest:
            return True
        age = self.highest - counter
        return age < self.size and not (self.bits >> age) & 1

    def update(self, counter: int) -> None:
        """Record ``counter`` as seen (call only after :meth:`check` and authentication)."""
        if counter > self.highest:
            shift = counter - self.highest
            self.bits = ((self.bits << shift) | 1) & self.mask if shift < self.size else 1
            self.highest = counter
        else:
            self.bits |= 1 << (self.highest - counter)

    def accept(self, counter: int) -> bool:
        """:meth:`check` then :meth:`update`; True if the counter was accepted."""
        if not self.check(counter):
            return False
        self.update(counter)
        return True


class Reservation(NamedTuple):
    """Counters ``first .. first + count - 1`` of ``epoch``, to seal with ``aead`` (or ``fast``,
    the same key in C, when built)."""

    epoch: int
    aead: AESGCM
    first: int
    rekeyed: bool
    fast: "GcmKey | None" = None


class SendState:
    """The sending side of a session: current epoch, its cipher and the next packet counter.

    Threads that send to one peer (one per TUN queue) take their counters with :meth:`reserve`,
    which is atomic: two threads never seal with the same (key, counter) nonce.
    """

    def __init__(
        self,
        keys: SessionKeys,
        rekey_after_packets: int = REKEY_AFTER_PACKETS,
        rekey_after_seconds: float = REKEY_AFTER_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key_id = keys.send_key_id
        self.rekey_after_packets = rekey_after_packets
        self.rekey_after_seconds = rekey_after_seconds
        self._clock = clock
        self._key = keys.send_key
        self.epoch = 0
        self.aead = AESGCM(self._key)
        self.fast = fast_key(self._key)
        self.counter = 0
        self.epoch_started = clock()
        self._lock = threading.Lock()

    def reserve(self, count: int) -> Reservation:
        """Take ``count`` consecutive counters, with the epoch and ciphers they belong to.

        Moves to the next epoch first when ``count`` more packets would pass a rekey limit
        (``rekeyed`` is then True).
        """
        with self._lock:
            rekeyed = self.due(count)
            if rekeyed:
                self.advance()
            first = self.counter
            self.counter = first + count
            return Reservation(self.epoch, self.aead, first, rekeyed, self.fast)

    def due(self, upcoming: int = 1) -> bool:
        """True if sending ``upcoming`` more packets under this epoch would pass a rekey limit."""
        return (
            self.counter + upcoming > self.rekey_after_packets or self._clock() - self.epoch_started >= self.rekey_after_seconds
        )

    def advance(self) -> None:
        """Switch to the next epoch: new key, counter back to 0."""
        self._key = next_epoch_key(self._key)
        self.epoch += 1
        self.aead = AESGCM(self._key)
        self.fast = fast_key(self._key)
        self.counter = 0
        self.epoch_started = self._clock()


class _ReceiveEpoch:
    __slots__ = ("number", "key", "aead", "fast", "window")

    def __init__(self, number: int, key: bytes, window_bits: int) -> None:
        self.number = number
        self.key = key
        self.aead = AESGCM(key)
        self.fast = fast_key(key)
        self.window = ReplayWindow(window_bits)


class ReceiveState:
    """The receiving side of a session: the previous, current and (lazily) next epoch."""

    def __init__(self, keys: SessionKeys, window_bits: int = REPLAY_WINDOW_BITS) -> None:
        self.key_id = keys.receive_key_id
        self._window_bits = window_bits
        self.current = _ReceiveEpoch(0, keys.receive_key, window_bits)
        self.previous: _ReceiveEpoch | None = None
        self._next: _ReceiveEpoch | None = None

    def epoch_for(self, epoch_byte: int) -> _ReceiveEpoch | None:
        """The epoch a datagram's 8-bit epoch number points at, or None if not accepted."""
        current = self.current
        if epoch_byte == current.number & 0xFF:
            return current
        if epoch_byte == (current.number + 1) & 0xFF:
            if self._next is None:
                self._next = _ReceiveEpoch(current.number + 1, next_epoch_key(current.key), self._window_bits)
            return self._next
        previous = self.previous
        if previous is not None and epoch_byte == previous.number & 0xFF:
            return previous
        return None

    def confirm(self, epoch: _ReceiveEpoch) -> None:
        """An authentic datagram arrived under ``epoch``: if it is the next one, switch to it."""
        if epoch is self._next:
            self.previous = self.current
            self.current = epoch
            self._next = None
