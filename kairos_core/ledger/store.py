"""Persistence of the ledger: one sqlite row per (bucket, key) holding the winning entry.

WAL mode with ``synchronous=NORMAL``: a committed transaction survives the process being killed
at any instant (it sits in the WAL, which the next open replays); only a power loss may drop the
last few commits, never leave a torn one. Each applied batch is one transaction, so a batch is on
disk entirely or not at all.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Iterator

from .clock import Version
from .entry import Entry

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    bucket   TEXT    NOT NULL,
    key      TEXT    NOT NULL,
    value    TEXT,               -- canonical JSON; NULL for a tombstone
    owner    TEXT    NOT NULL,
    wall_ms  INTEGER NOT NULL,
    counter  INTEGER NOT NULL,
    deleted  INTEGER NOT NULL,
    sig      BLOB    NOT NULL,
    PRIMARY KEY (bucket, key)
) WITHOUT ROWID
"""


class LedgerStore:
    """The sqlite file behind a ledger. ``":memory:"`` gives a throwaway store for tests."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        # The ledger may hand batches to a worker thread; one lock keeps the connection serial.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def load(self) -> Iterator[Entry]:
        """Every stored entry, tombstones included."""
        with self._lock:
            rows = self._db.execute("SELECT bucket, key, value, owner, wall_ms, counter, deleted, sig FROM entries").fetchall()
        for bucket, key, value, owner, wall_ms, counter, deleted, sig in rows:
            yield Entry(
                bucket,
                key,
                None if value is None else json.loads(value),
                owner,
                Version(wall_ms, counter, owner),
                bool(deleted),
                bytes(sig),
            )

    def write(self, entries: Iterable[Entry], removed: Iterable[tuple[str, str]] = ()) -> None:
        """Store ``entries`` (replacing their keys) and drop ``removed`` keys in one transaction."""
        rows = [
            (
                e.bucket,
                e.key,
                None if e.deleted else e.value_json,
                e.owner,
                e.version.wall_ms,
                e.version.counter,
                int(e.deleted),
                e.sig,
            )
            for e in entries
        ]
        gone = list(removed)
        if not rows and not gone:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO entries VALUES (?,?,?,?,?,?,?,?)", rows)
                self._db.executemany("DELETE FROM entries WHERE bucket=? AND key=?", gone)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def integrity_check(self) -> str:
        """sqlite's own verdict on the file: ``"ok"`` when sound."""
        with self._lock:
            return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])

    def count(self) -> int:
        """How many rows (entries and tombstones) the store holds."""
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM entries").fetchone()[0])

    def close(self) -> None:
        """Checkpoint the WAL and close the file."""
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._db.close()
