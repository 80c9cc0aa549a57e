"""The sqlite store: restart resumes, batches are atomic, kill -9 leaves a consistent file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kairos_core.identity import Identity
from kairos_core.ledger import Entry, Ledger, LedgerStore, Version, open_ledger

ALICE, BOB = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)
BATCH = 100


def test_restart_resumes_from_disk(tmp_path: Path) -> None:
    ledger = open_ledger(ALICE, tmp_path, {"max_value_size": 1000})
    ledger.set("user", "a", {"x": 1})
    ledger.delete("user", "b")
    remote = Entry.signed(BOB, "nodes", BOB.peer_id, {"h": "bob"}, Version(ledger.clock.now_ms(), 3, BOB.peer_id))
    ledger.apply_remote([remote])
    last = ledger.clock.last
    ledger.close()

    again = open_ledger(ALICE, tmp_path)
    assert again.get("user", "a") == {"x": 1}
    assert again.get_entry("user", "b").deleted
    assert again.get_entry("nodes", BOB.peer_id) == remote
    assert all(e.verify() for e in again.entries())
    # The clock resumes past everything on disk, so new writes still win.
    assert again.set("user", "a", 2).version > max(last, remote.version)
    again.close()


def test_the_file_is_in_wal_mode(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "l.db")
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_a_failed_batch_leaves_nothing_behind(tmp_path: Path) -> None:
    store = LedgerStore(tmp_path / "l.db")
    good = Entry.signed(ALICE, "user", "a", 1, Version(1, 0, ALICE.peer_id))

    class Broken(Entry):
        @property
        def value_json(self) -> str:  # type: ignore[override]
            raise RuntimeError("disk on fire")

    broken = Broken("user", "b", 1, ALICE.peer_id, Version(1, 0, ALICE.peer_id), False, good.sig)
    with pytest.raises(RuntimeError):
        store.write([good, broken])
    assert store.count() == 0
    store.close()


CHILD = textwrap.dedent(
    """
    import sys
    from kairos_core.identity import Identity
    from kairos_core.ledger import Entry, Version, open_ledger
    alice, bob = Identity.from_seed(b"\\x01" * 32), Identity.from_seed(b"\\x02" * 32)
    ledger = open_ledger(alice, sys.argv[1])
    # Resume after the last step whose batch (its second write) landed.
    start = 1 + max((int(e.key.split("/")[0]) for e in ledger.entries() if e.bucket == "batch"), default=-1)
    i = start
    while True:
        ledger.set("seq", f"{i:08d}", {"i": i, "pad": "x" * 200})
        now = ledger.clock.now_ms()
        batch = [Entry.signed(bob, "batch", f"{i:08d}/{j:03d}", j, Version(now, j, bob.peer_id))
                 for j in range(%d)]
        ledger.apply_remote(batch)
        if i %% 7 == 0 and i:
            ledger.delete("seq", f"{i - 1:08d}")
        print(i, flush=True)
        i += 1
"""
    % BATCH
)


@pytest.mark.slow
def test_kill_9_during_a_burst_of_writes_leaves_a_consistent_store(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    acknowledged = -1
    for round_ in range(3):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, env=env)
        try:
            # Let it write a while past the point it resumed from, then kill it mid-stream.
            target = acknowledged + 40 + 13 * round_
            for line in child.stdout:
                acknowledged = int(line)
                if acknowledged >= target:
                    break
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL

        store = LedgerStore(tmp_path / "ledger.sqlite3")
        assert store.integrity_check() == "ok"
        ledger = Ledger(ALICE, store)
        entries = list(ledger.entries())
        assert entries and all(e.verify() for e in entries)
        seq = ledger._buckets["seq"]
        # Every acknowledged write is there (as a value or a later tombstone).
        assert all(f"{i:08d}" in seq for i in range(acknowledged + 1))
        # Each remote batch went in whole or not at all.
        per_batch: dict[str, int] = {}
        for key in ledger._buckets.get("batch", {}):
            per_batch[key.split("/")[0]] = per_batch.get(key.split("/")[0], 0) + 1
        assert set(per_batch.values()) == {BATCH}
        assert all(f"{i:08d}" in per_batch for i in range(acknowledged + 1))
        ledger.close()
