"""Anti-entropy: two ledgers compare digests and exchange what the other lacks (sans-IO).

The protocol runs over any ordered, reliable message channel (:class:`SyncChannel`); the node
binds it to a libp2p stream on ``/kairos/sync/1.1.0`` with length-prefixed frames, the tests to a
TCP socket on loopback. Both peers run :func:`sync_ledgers`; the exchange is symmetric, so there
is no initiator role and both sides end up with the union of their states.

Every (bucket, key) falls in one of 256 ranges by the first byte of ``sha256(bucket NUL key)``.

0. ROOT (``/kairos/sync/1.1.0``) — each side sends 16 bytes: the hash of its whole digest. Equal
   roots end the session there. Between agreeing ledgers — every periodic sync of an idle
   network — that is 17 bytes each way instead of a digest of ~16 bytes per non-empty range.
   ``/kairos/sync/1.0.0``, which nodes of kairos-core 0.1.0 speak, starts at DIGEST; both are
   served, and a node opens 1.1.0 where the peer offers it.
1. DIGEST — each side sends the hash of every range (16 bytes of sha256 over the sorted
   ``(bucket, key, version)`` records; all zeros for an empty range). Both sides now know the
   same set of differing ranges.
2. VERSIONS — for each differing range that is non-empty on *both* sides, each sends its
   ``key -> version`` list (in frames, then an end marker). Ranges empty on one side skip this:
   the empty side needs all of it and has nothing to give, so a late joiner costs one round trip.
3. ENTRIES — each side sends the entries the other lacks or holds at an older version (codec
   batches, then an end marker) and merges what it receives through ``apply_remote``: signatures,
   policies and the drift bound apply as for gossip.

Each phase sends and receives concurrently, so two peers writing large phases to each other can
never deadlock on full transport buffers. Each frame is size-limited and validated; a violation
raises :class:`SyncError` (and is counted in the ledger's ``sync_errors``).

Frames are encoded as they are sent, one at a time, never all first: a peer that asks for the
whole ledger (an empty digest) again and again costs the sender one frame of memory beyond the
entries it already holds, not a second copy of the ledger per session. Names a peer sends are
checked for length before anything else uses them, and are hashed without the range cache, so
made-up keys cannot fill it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import weakref
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from typing import Iterable, Iterator, Protocol

from .clock import MAX_COUNTER, MAX_WALL_MS, Version
from .codec import decode_batch, iter_batches
from .entry import MAX_BUCKET_LENGTH, MAX_KEY_LENGTH, MAX_PEER_ID_LENGTH, MAX_REMOTE_VALUE_SIZE, Entry, check_name
from .errors import DecodeError, LedgerError, SyncError
from .ledger import Ledger

PROTOCOL_ID = "/kairos/sync/1.1.0"
# Served and spoken still, for peers that do not offer 1.1.0 (no ROOT phase).
LEGACY_PROTOCOL_ID = "/kairos/sync/1.0.0"
RANGES = 256
RANGE_HASH_SIZE = 16
EMPTY_RANGE = bytes(RANGE_HASH_SIZE)
DEFAULT_MAX_FRAME = (1 << 20) + 1024
DEFAULT_MAX_ITEMS = 1_000_000
# The digest frame must fit in one frame.
MIN_FRAME = 2 + RANGES * RANGE_HASH_SIZE

_ROOT = b"R"
_DIGEST = b"D"
_VERSIONS = b"V"
_VERSIONS_END = b"v"
_ENTRIES = b"E"
_ENTRIES_END = b"e"
_WIRE_VERSION = 2  # 2: compact digest (bitmap + non-empty ranges)
ROOT_SIZE = 16


class SyncChannel(Protocol):
    """An ordered, reliable, message-preserving channel to one peer."""

    async def send(self, data: bytes) -> None:
        """Send one message."""
        ...

    async def recv(self) -> bytes:
        """Receive the next message; raise on end of stream."""
        ...


@dataclass
class SyncResult:
    """What one anti-entropy session did, from this side's view."""

    differing_ranges: int = 0
    versions_sent: int = 0
    versions_received: int = 0
    entries_sent: int = 0
    entries_received: int = 0
    entries_applied: int = 0
    entries_skipped: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0


def _range(bucket: str, key: str) -> int:
    return hashlib.sha256(f"{bucket}\x00{key}".encode()).digest()[0]


# Cached for the keys this ledger holds (hashed again every session); a peer's names go through
# _range, so they never take a place here.
range_of = lru_cache(maxsize=1 << 17)(_range)
range_of.__doc__ = """The digest range (0‥255) of a key."""


def _record(entry: Entry) -> bytes:
    v = entry.version
    return json.dumps([entry.bucket, entry.key, v.wall_ms, v.counter, v.peer_id]).encode() + b"\n"


class _View:
    """The entries one side offers in this session, grouped by range."""

    def __init__(self, ledger: Ledger) -> None:
        cutoff_ms = int((ledger.clock.now_ms() / 1000 - ledger.tombstone_grace) * 1000)
        self.ranges: list[dict[tuple[str, str], Entry]] = [{} for _ in range(RANGES)]
        for entry in ledger.entries():
            if entry.deleted and entry.version.wall_ms < cutoff_ms:
                continue  # due for pruning: not worth shipping
            self.ranges[range_of(entry.bucket, entry.key)][(entry.bucket, entry.key)] = entry

    def digest(self) -> bytes:
        hashes = []
        for group in self.ranges:
            if not group:
                hashes.append(EMPTY_RANGE)
                continue
            h = hashlib.sha256()
            for ident in sorted(group):
                h.update(_record(group[ident]))
            hashes.append(h.digest()[:RANGE_HASH_SIZE])
        return b"".join(hashes)


def digest_root(digest: bytes) -> bytes:
    """The ROOT phase's hash of a whole digest: equal roots, equal digests."""
    return hashlib.sha256(digest).digest()[:ROOT_SIZE]


_fingerprints: weakref.WeakKeyDictionary[Ledger, tuple[int, str]] = weakref.WeakKeyDictionary()


def ledger_fingerprint(ledger: Ledger) -> str:
    """A short hex digest of what a sync session compares: two nodes that show the same one hold
    the same entries and versions, and a sync between them would exchange nothing (tombstones
    already due for pruning left out, as the session leaves them out).

    Computed again only when the ledger changed since the last call, so ``kairos status`` can
    show it on every call and a fleet's nodes can be compared at a glance."""
    cached = _fingerprints.get(ledger)
    if cached is not None and cached[0] == ledger.changes:
        return cached[1]
    value = digest_root(_View(ledger).digest()).hex()[:16]
    _fingerprints[ledger] = (ledger.changes, value)
    return value


async def sync_ledgers(
    ledger: Ledger,
    channel: SyncChannel,
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    max_items: int = DEFAULT_MAX_ITEMS,
    timeout: float | None = 60.0,
    compare_roots: bool = True,
) -> SyncResult:
    """Run one anti-entropy session with the peer at the other end of ``channel``.

    ``compare_roots`` runs the ROOT phase first (``PROTOCOL_ID``); False speaks
    ``LEGACY_PROTOCOL_ID``, which starts at the digest. Both ends must use the same.

    Frames never exceed ``max_frame``, nor the channel's own ``max_frame`` attribute when it has
    one (both peers must agree on the limit: derive it from something they share, like the token).
    Returns what was exchanged. Raises :class:`SyncError` when the peer breaks the protocol,
    ``TimeoutError`` after ``timeout`` seconds, and whatever the channel raises when it fails.
    """
    channel_limit = getattr(channel, "max_frame", None)
    if isinstance(channel_limit, int) and channel_limit > 0:
        max_frame = min(max_frame, channel_limit)
    if max_frame < MIN_FRAME:
        raise ValueError(f"sync needs frames of at least {MIN_FRAME} bytes, not {max_frame}")
    if isinstance(channel_limit, int) and channel_limit > max_frame:
        # The channel reads frames up to its own limit (a stream's is the token's message size,
        # 20 MiB by default) before the session could refuse one: narrow it to the session's, so
        # an oversized frame is refused at its length prefix, never buffered.
        channel.max_frame = max_frame
    try:
        async with asyncio.timeout(timeout):
            return await _Session(ledger, channel, max_frame, max_items).run(compare_roots)
    except SyncError:
        ledger.count("sync_errors")
        raise


_BITMAP_BYTES = RANGES // 8


def pack_digest(digest: bytes) -> bytes:
    """A bitmap of the non-empty ranges, then their hashes: small ledgers send a few hundred
    bytes instead of 4 KiB, which matters for the periodic sync of an idle network."""
    bitmap = bytearray(_BITMAP_BYTES)
    hashes = []
    for r in range(RANGES):
        chunk = digest[r * RANGE_HASH_SIZE : (r + 1) * RANGE_HASH_SIZE]
        if chunk != EMPTY_RANGE:
            bitmap[r // 8] |= 1 << (r % 8)
            hashes.append(chunk)
    return bytes(bitmap) + b"".join(hashes)


def unpack_digest(packed: bytes) -> bytes:
    """The full 256-range digest from :func:`pack_digest`; :class:`SyncError` when malformed."""
    if len(packed) < _BITMAP_BYTES:
        raise SyncError("digest frame too short")
    bitmap, hashes = packed[:_BITMAP_BYTES], packed[_BITMAP_BYTES:]
    present = [r for r in range(RANGES) if bitmap[r // 8] >> (r % 8) & 1]
    if len(hashes) != len(present) * RANGE_HASH_SIZE:
        raise SyncError("digest frame does not match its bitmap")
    full = bytearray(RANGES * RANGE_HASH_SIZE)
    for index, r in enumerate(present):
        chunk = hashes[index * RANGE_HASH_SIZE : (index + 1) * RANGE_HASH_SIZE]
        if chunk == EMPTY_RANGE:
            raise SyncError("digest frame marks an empty range present")
        full[r * RANGE_HASH_SIZE : (r + 1) * RANGE_HASH_SIZE] = chunk
    return bytes(full)


class _Session:
    def __init__(self, ledger: Ledger, channel: SyncChannel, max_frame: int, max_items: int) -> None:
        self.ledger = ledger
        self.channel = channel
        self.max_frame = max_frame
        self.max_items = max_items
        self.result = SyncResult()

    async def run(self, compare_roots: bool = True) -> SyncResult:
        started = time.perf_counter()
        view = _View(self.ledger)
        ours = view.digest()
        if compare_roots:
            root = digest_root(ours)
            if await self._exchange([_ROOT + root], self._recv_root) == root:
                self.result.seconds = time.perf_counter() - started
                return self.result  # the same entries at the same versions: nothing to exchange
        theirs = await self._exchange([_DIGEST + bytes([_WIRE_VERSION]) + pack_digest(ours)], self._recv_digest)
        differing = [r for r in range(RANGES) if ours[r * 16 : (r + 1) * 16] != theirs[r * 16 : (r + 1) * 16]]
        self.result.differing_ranges = len(differing)
        if differing:
            both = {
                r
                for r in differing
                if ours[r * 16 : (r + 1) * 16] != EMPTY_RANGE and theirs[r * 16 : (r + 1) * 16] != EMPTY_RANGE
            }
            their_versions: dict[tuple[str, str], Version] = {}
            if both:
                mine = [e for r in sorted(both) for e in view.ranges[r].values()]
                self.result.versions_sent = len(mine)
                frames = chain(self._version_frames(mine), [_VERSIONS_END])
                their_versions = await self._exchange(frames, lambda: self._recv_versions(both))
            wanted = []
            for r in differing:
                group = view.ranges[r]
                if r in both:
                    wanted.extend(
                        e for ident, e in group.items() if ident not in their_versions or e.version > their_versions[ident]
                    )
                else:
                    wanted.extend(group.values())  # the peer's range is empty (or ours is, then this is nothing)
            self.result.entries_sent = len(wanted)
            await self._exchange(chain(self._entry_frames(wanted), [_ENTRIES_END]), self._recv_entries)
        self.result.seconds = time.perf_counter() - started
        return self.result

    def _entry_frames(self, wanted: list[Entry]) -> Iterator[bytes]:
        """The entries frames, each encoded only when the previous one was sent."""
        for batch in iter_batches(wanted, self.max_frame - 1):
            if len(batch) + 1 > self.max_frame:
                # One entry bigger than a frame (a frame limit below the value cap): sending it
                # would fail the whole session every time, so it is left to gossip.
                self.result.entries_skipped += 1
                self.result.entries_sent -= 1
                continue
            yield _ENTRIES + batch

    async def _exchange(self, frames: Iterable[bytes], receive):  # type: ignore[no-untyped-def]
        async def send_all() -> None:
            # frames may be a generator: each is encoded here, after the one before was sent
            for frame in frames:
                self.result.bytes_sent += len(frame)
                await self.channel.send(frame)
                del frame  # not kept alive while the next one is encoded

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(send_all())
                received = group.create_task(receive())
        except BaseExceptionGroup as failed:
            # Surface the first real failure (a SyncError, a closed channel), not the group.
            raise failed.exceptions[0] from None
        return received.result()

    async def _next(self) -> bytes:
        frame = await self.channel.recv()
        if not isinstance(frame, (bytes, bytearray)) or not frame:
            raise SyncError("empty or non-bytes frame")
        if len(frame) > self.max_frame:
            raise SyncError(f"frame of {len(frame)} bytes exceeds {self.max_frame}")
        self.result.bytes_received += len(frame)
        return bytes(frame)

    async def _recv_root(self) -> bytes:
        frame = await self._next()
        if frame[:1] != _ROOT or len(frame) != 1 + ROOT_SIZE:
            raise SyncError("expected a root frame")
        return frame[1:]

    async def _recv_digest(self) -> bytes:
        frame = await self._next()
        if frame[:1] != _DIGEST or len(frame) < 2:
            raise SyncError("expected a digest frame")
        if frame[1] != _WIRE_VERSION:
            raise SyncError(f"unsupported sync version {frame[1]}")
        return unpack_digest(frame[2:])

    def _version_frames(self, entries: list[Entry]) -> Iterator[bytes]:
        budget = self.max_frame - 64
        peers: dict[str, int] = {}
        rows: list[str] = []
        size = 0
        for e in entries:
            if e.owner not in peers:
                peers[e.owner] = len(peers)
                size += len(e.owner) + 3
            row = json.dumps([e.bucket, e.key, e.version.wall_ms, e.version.counter, peers[e.owner]])
            rows.append(row)
            size += len(row) + 1
            if size > budget:
                yield _encode_versions(peers, rows)
                peers, rows, size = {}, [], 0
        if rows:
            yield _encode_versions(peers, rows)

    async def _recv_versions(self, both: set[int]) -> dict[tuple[str, str], Version]:
        versions: dict[tuple[str, str], Version] = {}
        while True:
            frame = await self._next()
            if frame == _VERSIONS_END:
                return versions
            if frame[:1] != _VERSIONS:
                raise SyncError("expected a versions frame")
            for bucket, key, version in _decode_versions(frame[1:]):
                self.result.versions_received += 1
                if self.result.versions_received > self.max_items:
                    raise SyncError(f"more than {self.max_items} versions")
                if _range(bucket, key) in both:  # anything else was not asked for
                    versions[(bucket, key)] = version

    async def _recv_entries(self) -> None:
        while True:
            frame = await self._next()
            if frame == _ENTRIES_END:
                return
            if frame[:1] != _ENTRIES:
                raise SyncError("expected an entries frame")
            try:
                entries = decode_batch(frame[1:], self.max_frame, max_value_size=MAX_REMOTE_VALUE_SIZE)
            except DecodeError as exc:
                self.ledger.count("decode_errors")
                raise SyncError(f"bad entries frame: {exc}") from None
            self.result.entries_received += len(entries)
            if self.result.entries_received > self.max_items:
                raise SyncError(f"more than {self.max_items} entries")
            updates = await self.ledger.apply_remote_async(entries)
            self.result.entries_applied += len(updates)


def _encode_versions(peers: dict[str, int], rows: list[str]) -> bytes:
    return _VERSIONS + ('{"p":%s,"r":[%s]}' % (json.dumps(list(peers)), ",".join(rows))).encode()


def _decode_versions(payload: bytes) -> Iterable[tuple[str, str, Version]]:
    """The ``(bucket, key, version)`` rows of a versions frame; :class:`SyncError` for anything
    malformed, whatever it is: every name is checked as an entry's would be, so nothing that
    comes out can fail later (a lone surrogate used to raise ``UnicodeEncodeError`` in
    :func:`range_of`)."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        raise SyncError("versions frame is not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("p"), list) or not isinstance(doc.get("r"), list):
        raise SyncError("malformed versions frame")
    peers = doc["p"]
    try:
        for peer in peers:
            check_name("peer id", peer, MAX_PEER_ID_LENGTH)
    except LedgerError:
        raise SyncError("malformed peer table") from None
    out = []
    for row in doc["r"]:
        if not (isinstance(row, list) and len(row) == 5):
            raise SyncError("malformed version row")
        bucket, key, wall_ms, counter, index = row
        if not (
            isinstance(bucket, str)
            and isinstance(key, str)
            and type(wall_ms) is int
            and 0 <= wall_ms <= MAX_WALL_MS
            and type(counter) is int
            and 0 <= counter <= MAX_COUNTER
            and type(index) is int
            and 0 <= index < len(peers)
        ):
            raise SyncError("malformed version row")
        try:
            check_name("bucket", bucket, MAX_BUCKET_LENGTH)
            check_name("key", key, MAX_KEY_LENGTH)
        except LedgerError as exc:
            raise SyncError(f"malformed version row: {exc}") from None
        out.append((bucket, key, Version(wall_ms, counter, peers[index])))
    return out
