"""The replicated key/value ledger of one node: local writes, remote merges, watchers.

All entries live in memory (``bucket -> key -> Entry``) and are written through to the sqlite
store, one transaction per local write or remote batch. Reads never touch the disk.

The ledger is not thread-safe: call it from the event loop's thread. The one exception is
:meth:`Ledger.apply_remote_async`, which verifies signatures on a worker thread and then merges
on the caller's thread.

Quotas. In the open buckets one owner may hold at most :data:`~.policy.NETWORK_QUOTA` (live keys,
bytes of values, tombstones; the same on every node); this node's own writes are held to
``ledger.max_keys_per_owner``, ``max_bytes_per_owner`` and ``max_tombstones_per_owner`` (at most
half of that) and a write past them raises :class:`LedgerError`. A remote entry that would take
its owner past a network limit is refused, counted in ``rejected_quota``, and neither stored nor
merged nor allowed to move the clock. The judgement is the same rule with the same limits on
every node, and only what grows is judged: an update of one of the owner's keys that does not
grow its bytes always passes, and so does a delete while its tombstones are below their limit,
even for an owner past another limit.

Why nodes agree: an honest owner checks each write against its own view of what it holds, which
is the latest: another node can only be behind it (still hold a key the owner since deleted, a
value it since shrank, a key someone else since overwrote), and only while behind can it count
more for that owner than the owner does. The local limits are half the network's to leave room
for that, so honest entries are not refused in practice; one that is (by a node far behind) is
merged by the anti-entropy after that node caught up, since the owner's current holding fits
everywhere. An owner past a network limit signed entries no honest node writes: every node holds
at most the quota of its entries and refuses the rest, but which of them a node holds depends on
the order they arrived in, so nodes may keep different subsets of that owner's entries
(anti-entropy keeps offering the difference, refused and counted again) until they are
overwritten, deleted, or pruned as tombstones. Where such an owner overwrote someone else's
key, some nodes hold its entry and others the one it replaced, until the key is written again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Mapping

from ..events import LedgerUpdate
from ..identity import Identity
from .clock import HybridLogicalClock
from .entry import (
    MAX_REMOTE_VALUE_SIZE,
    DEFAULT_MAX_VALUE_SIZE,
    MAX_BUCKET_LENGTH,
    MAX_KEY_LENGTH,
    Entry,
    check_name,
    normalize_value,
)
from .codec import DEFAULT_MAX_BATCH_SIZE, decode_batch
from .errors import DecodeError, LedgerError, PolicyError
from .policy import (
    DEFAULT_QUOTA,
    NETWORK_QUOTA,
    NOTHING,
    QUOTA_UNITS,
    OpenPolicy,
    OwnerQuota,
    PolicyRegistry,
    QuotaAccount,
    RecordPolicy,
    Usage,
    WritePolicy,
)
from .store import LedgerStore

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.sqlite3"
DEFAULT_TOMBSTONE_GRACE = 7 * 24 * 3600.0
WATCH_QUEUE_SIZE = 10_000

Listener = Callable[[LedgerUpdate], None]

#: Names of the counters every ledger keeps (all start at zero).
COUNTERS = (
    "applied",
    "stale",
    "rejected_signature",
    "rejected_policy",
    "rejected_future",
    "rejected_quota",
    "rejected_invalid",
    "decode_errors",
    "sync_errors",
    "pruned",
    "watch_overflow",
    "listener_errors",
    "clock_capped",
)
# Config option of each quota field, in the messages of refused local writes.
_QUOTA_OPTIONS = {"keys": "max_keys_per_owner", "bytes": "max_bytes_per_owner", "tombstones": "max_tombstones_per_owner"}


class Ledger:
    """The ledger of one node.

    :param identity: signs local writes; its peer id owns them.
    :param store: where entries persist (loaded at construction).
    :param policies: write policies per bucket; a mapping or a :class:`PolicyRegistry`. Default:
        ``nodes`` owner-keyed, ``leader`` lease, others open (the node adds the policies plugins
        register through ``kairos_ledger_policies``).
    :param max_value_size: largest JSON value in bytes (``ledger.max_value_size``).
    :param tombstone_grace: seconds a tombstone is kept (``ledger.tombstone_grace``).
    :param clock: the hybrid logical clock; default one for ``identity`` on the wall clock.
    :param quota: what this node's own writes may hold in open buckets (``ledger.max_*_per_owner``);
        default :data:`~.policy.DEFAULT_QUOTA`, and never more than ``network_quota``.
    :param network_quota: what any owner's remote entries may hold in open buckets; default
        :data:`~.policy.NETWORK_QUOTA`. Change it for tests only: it must be the same everywhere.
    """

    def __init__(
        self,
        identity: Identity,
        store: LedgerStore,
        *,
        policies: PolicyRegistry | Mapping[str, WritePolicy] | None = None,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        tombstone_grace: float = DEFAULT_TOMBSTONE_GRACE,
        clock: HybridLogicalClock | None = None,
        quota: OwnerQuota | None = None,
        network_quota: OwnerQuota | None = None,
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id
        self.store = store
        self.policies = policies if isinstance(policies, PolicyRegistry) else PolicyRegistry(policies)
        self.max_value_size = max_value_size
        self.tombstone_grace = tombstone_grace
        self.clock = clock or HybridLogicalClock(self.peer_id)
        self.network_quota = network_quota or NETWORK_QUOTA
        self.quota = OwnerQuota(*map(min, quota or DEFAULT_QUOTA, self.network_quota))
        self.counters: Counter[str] = Counter({name: 0 for name in COUNTERS})
        self._buckets: dict[str, dict[str, Entry]] = {}
        self._tombstones: Counter[str] = Counter()  # per bucket: what bucket_sizes() leaves out
        # Open buckets, and the record buckets (revoked, rotation), where any token holder may
        # write under its own name: without a quota one owner could fill them without bound.
        self._quotas = QuotaAccount(lambda bucket: isinstance(self.policies.for_bucket(bucket), (OpenPolicy, RecordPolicy)))
        self._listeners: list[Listener] = []
        self._watchers: list[_Watch] = []
        # Rises on every change to what is held (a put, a drop): lets a reader cache what it
        # derives from all entries, such as the sync digest in ``kairos status``.
        self.changes = 0
        for entry in store.load():
            # everything stored is kept, within quotas or not (a store from before them, a lowered
            # limit): an owner past a limit just cannot grow further
            self._put(entry)
            self.clock.restore(entry.version)

    # -- reading -----------------------------------------------------------------------------

    def get(self, bucket: str, key: str) -> Any:
        """The value of ``key`` in ``bucket``, or None when absent or deleted (a fresh copy)."""
        entry = self.get_entry(bucket, key)
        if entry is None or entry.deleted:
            return None
        return json.loads(entry.value_json)

    def get_entry(self, bucket: str, key: str) -> Entry | None:
        """The winning entry of ``key``, tombstones included; None when never seen."""
        return self._buckets.get(bucket, {}).get(key)

    def items(self, bucket: str) -> dict[str, Any]:
        """Every live key of ``bucket`` and its value (fresh copies; tombstones left out)."""
        return {key: json.loads(entry.value_json) for key, entry in self._buckets.get(bucket, {}).items() if not entry.deleted}

    def buckets(self) -> list[str]:
        """The buckets that hold at least one live key, sorted."""
        return sorted(b for b, keys in self._buckets.items() if any(not e.deleted for e in keys.values()))

    def entries(self) -> Iterator[Entry]:
        """Every entry, tombstones included (what anti-entropy compares)."""
        for keys in self._buckets.values():
            yield from keys.values()

    def bucket_sizes(self) -> dict[str, int]:
        """Live keys per bucket (tombstones left out), without walking the entries (metrics)."""
        sizes = {bucket: len(keys) - self._tombstones[bucket] for bucket, keys in self._buckets.items()}
        return {bucket: size for bucket, size in sizes.items() if size}

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._buckets.values())

    def usage(self, owner: str) -> Usage:
        """What ``owner`` holds across the open buckets: live keys, bytes of values, tombstones."""
        return self._quotas.usage(owner)

    # -- local writes --------------------------------------------------------------------------

    def set(self, bucket: str, key: str, value: Any) -> Entry:
        """Write ``value`` (JSON data) to ``key``; returns the signed entry.

        Raises :class:`LedgerError` for a bad bucket, key or value, or when the write would take
        this node past one of its quotas in the open buckets (``ledger.max_*_per_owner``), and
        :class:`PolicyError` when the bucket's policy does not let this node write the key.
        """
        return self._write_local(bucket, key, normalize_value(value, self.max_value_size), deleted=False)

    def delete(self, bucket: str, key: str) -> Entry:
        """Delete ``key`` by writing a tombstone; returns it. Errors as for :meth:`set`."""
        return self._write_local(bucket, key, None, deleted=True)

    def _write_local(self, bucket: str, key: str, value: Any, *, deleted: bool) -> Entry:
        check_name("bucket", bucket, MAX_BUCKET_LENGTH)
        check_name("key", key, MAX_KEY_LENGTH)
        current = self.get_entry(bucket, key)
        # after the entry it replaces even when that one is further ahead than our clock may go
        version = self.clock.tick_after(current.version if current is not None else None)
        entry = Entry.signed(self.identity, bucket, key, value, version, deleted)
        if not self.policies.allows(entry, current, self._now()):
            raise PolicyError(
                f"{self.policies.for_bucket(bucket).name} bucket {bucket!r}: key {key!r} is not this node's to write"
            )
        over = self._quotas.over(self.peer_id, self._growth(entry, current), self.quota)
        if over is not None:
            field, would_hold, limit = over
            hint = " (they are pruned after ledger.tombstone_grace)" if field == "tombstones" else ""
            raise LedgerError(
                f"quota: this node would hold {would_hold} {QUOTA_UNITS[field]} in open buckets, "
                f"more than ledger.{_QUOTA_OPTIONS[field]}={limit}{hint}"
            )
        self.store.write([entry])
        self._put(entry)
        self._emit([_update(entry, local=True)])
        return entry

    # -- remote entries -----------------------------------------------------------------------

    def apply_remote(self, entries: Iterable[Entry]) -> list[LedgerUpdate]:
        """Merge entries received from peers; return the changes, in order.

        Each entry is validated, checked against the clock drift bound, compared with what we
        hold (older or equal ones are ignored as ``stale``), checked against the bucket policy, its
        owner's signature and, in open buckets, its owner's quota, then merged. Rejections are
        counted, never raised. All accepted entries are persisted in one transaction before
        listeners hear of them.
        """
        return self._apply(entries, verified=None)

    async def apply_remote_async(self, entries: Iterable[Entry]) -> list[LedgerUpdate]:
        """:meth:`apply_remote`, with signature checks (~0.1 ms each) on a worker thread, so a
        large batch does not stall the event loop.

        Only entries newer than what we hold are checked: the merge drops the others as stale
        before it looks at a signature. In a busy network most entries a sync or a second gossip
        path brings are ones we already hold (two thirds of them, measured at N = 50), and their
        checks were most of the CPU a node spent on the ledger.
        """
        batch = list(entries)
        worth = [self._maybe_newer(e) for e in batch]
        if not any(worth):
            return self._apply(batch, verified=[None] * len(batch))
        verdicts = await asyncio.to_thread(lambda: [_verify_quietly(e) if w else None for e, w in zip(batch, worth)])
        return self._apply(batch, verified=verdicts)

    def _maybe_newer(self, entry: Entry) -> bool:
        """Whether ``entry`` could win against what we hold now (a malformed one: let the merge say)."""
        try:
            return entry.newer_than(self.get_entry(entry.bucket, entry.key))
        except Exception:
            return True

    async def apply_delta(self, data: bytes, max_size: int = DEFAULT_MAX_BATCH_SIZE) -> list[LedgerUpdate]:
        """Decode a gossip delta (:func:`~.codec.encode_batch` bytes) and merge it.

        Never raises for bad input: undecodable bytes count in ``decode_errors`` and change
        nothing; bad entries inside a well-formed batch are rejected one by one as usual.
        """
        try:
            entries = decode_batch(data, max_size, max_value_size=MAX_REMOTE_VALUE_SIZE)
        except DecodeError:
            self.counters["decode_errors"] += 1
            return []
        return await self.apply_remote_async(entries)

    def _apply(self, entries: Iterable[Entry], verified: list[bool | None] | None) -> list[LedgerUpdate]:
        # verified: a verdict per entry computed ahead (off the event loop), None where it was not
        # (the entry was stale then; what we hold can change meanwhile, so it is checked here if
        # it gets that far)
        now = self._now()
        prune_before_ms = int((now - self.tombstone_grace) * 1000)
        staged: dict[tuple[str, str], Entry] = {}
        # what the staged entries count against their owners' quotas, and the change they make
        staged_share: dict[tuple[str, str], Usage] = {}
        pending: dict[str, Usage] = {}
        capped_before = self.clock.capped
        for index, entry in enumerate(entries):
            try:
                entry.validate(MAX_REMOTE_VALUE_SIZE)
            except (LedgerError, AttributeError, TypeError):
                self.counters["rejected_invalid"] += 1
                continue
            ident = (entry.bucket, entry.key)
            current = staged.get(ident) or self.get_entry(*ident)
            if not entry.newer_than(current):
                self.counters["stale"] += 1
                continue
            if not self.clock.acceptable(entry.version):
                self.clock.rejected_future += 1
                self.counters["rejected_future"] += 1
                continue
            if not self.policies.allows(entry, current, now):
                self.counters["rejected_policy"] += 1
                continue
            verdict = verified[index] if verified is not None else None
            good = verdict if verdict is not None else _verify_quietly(entry)
            if not good:
                self.counters["rejected_signature"] += 1
                continue
            # a tombstone past its grace is not kept (below), so it counts for nothing
            share = NOTHING if entry.deleted and entry.version.wall_ms < prune_before_ms else self._quotas.share(entry)
            replaced = NOTHING
            if current is not None:
                replaced = staged_share[ident] if ident in staged else self._quotas.share(current)
            growth = share - replaced if current is not None and current.owner == entry.owner else share
            if self._quotas.over(entry.owner, growth, self.network_quota, pending.get(entry.owner, NOTHING)):
                self.counters["rejected_quota"] += 1
                continue
            self.clock.observe(entry.version)
            staged[ident] = entry
            staged_share[ident] = share
            pending[entry.owner] = pending.get(entry.owner, NOTHING) + growth
            if current is not None and current.owner != entry.owner:
                pending[current.owner] = pending.get(current.owner, NOTHING) - replaced
        self.counters["clock_capped"] += self.clock.capped - capped_before
        if not staged:
            return []
        keep: list[Entry] = []
        removed: list[tuple[str, str]] = []
        updates: list[LedgerUpdate] = []
        for ident, entry in staged.items():
            current = self.get_entry(*ident)
            if entry.deleted and entry.version.wall_ms < prune_before_ms:
                # A tombstone already past its grace: it still deletes what we hold, but is not kept.
                if current is not None:
                    removed.append(ident)
                    if not current.deleted:
                        updates.append(_update(entry, local=False))
                continue
            keep.append(entry)
            updates.append(_update(entry, local=False))
        self.store.write(keep, removed)
        for bucket, key in removed:
            self._drop(bucket, key)
        for entry in keep:
            self._put(entry)
        self.counters["applied"] += len(keep)
        self._emit(updates)
        return updates

    # -- maintenance ---------------------------------------------------------------------------

    def prune_tombstones(self) -> int:
        """Forget tombstones older than the grace period; returns how many went."""
        cutoff_ms = int((self._now() - self.tombstone_grace) * 1000)
        old = [(e.bucket, e.key) for e in self.entries() if e.deleted and e.version.wall_ms < cutoff_ms]
        self.store.write([], old)
        for bucket, key in old:
            self._drop(bucket, key)
        self.counters["pruned"] += len(old)
        return len(old)

    def count(self, counter: str, n: int = 1) -> None:
        """Add to a counter (the codec and sync layers report ``decode_errors`` here)."""
        self.counters[counter] += n

    def close(self) -> None:
        """End every watcher and close the store."""
        for watch in list(self._watchers):
            watch.close()
        self.store.close()

    # -- change notification -------------------------------------------------------------------

    def add_listener(self, callback: Listener) -> None:
        """Call ``callback(update)`` for every change, local or remote, after it is persisted.

        Callbacks run synchronously in the writer's thread; one that raises is logged and counted
        and the others still run.
        """
        self._listeners.append(callback)

    def remove_listener(self, callback: Listener) -> None:
        """Stop calling ``callback``."""
        self._listeners.remove(callback)

    def watch(self, bucket: str | None = None) -> AsyncIterator[LedgerUpdate]:
        """An async iterator of the changes from now on, of one bucket or all.

        It registers at once (changes made before the first ``await`` are not missed) and ends
        after ``aclose()`` or when the ledger closes. A consumer that falls more than
        ``WATCH_QUEUE_SIZE`` changes behind loses the oldest (counted in ``watch_overflow``).
        """
        watch = _Watch(self, bucket)
        self._watchers.append(watch)
        return watch

    def _emit(self, updates: list[LedgerUpdate]) -> None:
        for update in updates:
            for callback in list(self._listeners):
                try:
                    callback(update)
                except Exception:
                    self.counters["listener_errors"] += 1
                    log.exception("ledger listener %r failed", callback)
            for watch in list(self._watchers):
                if watch.bucket is None or watch.bucket == update.bucket:
                    watch.push(update)

    def _put(self, entry: Entry) -> None:
        """Hold ``entry`` in memory (the caller persisted it), replacing its key's entry."""
        self.changes += 1
        keys = self._buckets.setdefault(entry.bucket, {})
        old = keys.get(entry.key)
        if old is not None:
            self._quotas.remove(old)
        keys[entry.key] = entry
        self._quotas.add(entry)
        self._tombstones[entry.bucket] += int(entry.deleted) - int(old is not None and old.deleted)

    def _drop(self, bucket: str, key: str) -> None:
        self.changes += 1
        keys = self._buckets.get(bucket)
        if keys is not None:
            old = keys.pop(key, None)
            if old is not None:
                self._quotas.remove(old)
                self._tombstones[bucket] -= int(old.deleted)
            if not keys:
                del self._buckets[bucket]
                self._tombstones.pop(bucket, None)

    def _growth(self, entry: Entry, current: Entry | None) -> Usage:
        """How much holding ``entry`` instead of ``current`` adds to what its owner holds."""
        share = self._quotas.share(entry)
        if current is not None and current.owner == entry.owner:
            return share - self._quotas.share(current)
        return share

    def _now(self) -> float:
        return self.clock.now_ms() / 1000.0


class _Watch:
    """One ``watch()`` consumer: a bounded queue fed by the ledger."""

    _CLOSED = object()

    def __init__(self, ledger: Ledger, bucket: str | None) -> None:
        self.ledger = ledger
        self.bucket = bucket
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=WATCH_QUEUE_SIZE)
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._closed = False

    def push(self, item: Any) -> None:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is not None and running is not self._loop:
            try:
                self._loop.call_soon_threadsafe(self._put, item)
            except RuntimeError:  # that loop is closed: nobody is left to read
                pass
        else:
            self._put(item)

    def _put(self, item: Any) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.ledger.counters["watch_overflow"] += 1
        self._queue.put_nowait(item)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self in self.ledger._watchers:
                self.ledger._watchers.remove(self)
            self.push(self._CLOSED)

    def __aiter__(self) -> "_Watch":
        return self

    async def __anext__(self) -> LedgerUpdate:
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is self._CLOSED:
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        """Stop watching."""
        self.close()


def _update(entry: Entry, *, local: bool) -> LedgerUpdate:
    return LedgerUpdate(
        bucket=entry.bucket,
        key=entry.key,
        value=None if entry.deleted else json.loads(entry.value_json),
        owner=entry.owner,
        version=tuple(entry.version),
        deleted=entry.deleted,
        local=local,
    )


def _verify_quietly(entry: Entry) -> bool:
    try:
        return entry.verify()
    except Exception:  # a malformed entry (wrong types) is simply not a valid signature
        return False


def open_ledger(
    identity: Identity,
    state_dir: Path | str,
    settings: Mapping[str, Any] | None = None,
    *,
    policies: PolicyRegistry | Mapping[str, WritePolicy] | None = None,
) -> Ledger:
    """Open (or create) the ledger file in ``state_dir``.

    ``settings`` is the ``ledger:`` config section: ``max_value_size`` (bytes),
    ``tombstone_grace`` (seconds) and, optionally, ``max_clock_drift`` (seconds, default 60) and
    the quotas of this node's own writes ``max_keys_per_owner``, ``max_bytes_per_owner`` and
    ``max_tombstones_per_owner`` (default :data:`~.policy.DEFAULT_QUOTA`).
    """
    settings = settings or {}
    Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    store = LedgerStore(Path(state_dir) / LEDGER_FILE)
    drift_ms = int(float(settings.get("max_clock_drift", 60.0)) * 1000)
    return Ledger(
        identity,
        store,
        policies=policies,
        max_value_size=int(settings.get("max_value_size", DEFAULT_MAX_VALUE_SIZE)),
        tombstone_grace=float(settings.get("tombstone_grace", DEFAULT_TOMBSTONE_GRACE)),
        clock=HybridLogicalClock(identity.peer_id, max_drift_ms=drift_ms),
        quota=OwnerQuota(
            keys=int(settings.get("max_keys_per_owner", DEFAULT_QUOTA.keys)),
            bytes=int(settings.get("max_bytes_per_owner", DEFAULT_QUOTA.bytes)),
            tombstones=int(settings.get("max_tombstones_per_owner", DEFAULT_QUOTA.tombstones)),
        ),
        network_quota=NETWORK_QUOTA,
    )
