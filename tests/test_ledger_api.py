"""The Ledger API: reads, writes, deletes, listeners, watchers, tombstone pruning."""

from __future__ import annotations

import asyncio

import pytest

from kairos_core.events import LedgerUpdate
from kairos_core.identity import Identity
from kairos_core.ledger import Entry, HybridLogicalClock, Ledger, LedgerError, LedgerStore, Version

ALICE, BOB = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)


class Wall:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def __call__(self) -> int:
        return self.ms


def make_ledger(wall: Wall | None = None, **kw) -> Ledger:
    clock = HybridLogicalClock(ALICE.peer_id, now_ms=wall or Wall())
    return Ledger(ALICE, LedgerStore(":memory:"), clock=clock, **kw)


def test_set_get_items_delete() -> None:
    ledger = make_ledger()
    entry = ledger.set("user", "a", {"n": 1})
    assert entry.owner == ALICE.peer_id and entry.verify()
    ledger.set("user", "b", [1, 2])
    assert ledger.get("user", "a") == {"n": 1}
    assert ledger.items("user") == {"a": {"n": 1}, "b": [1, 2]}
    tomb = ledger.delete("user", "a")
    assert tomb.deleted and tomb.verify() and tomb.version > entry.version
    assert ledger.get("user", "a") is None
    assert ledger.get_entry("user", "a") == tomb
    assert ledger.items("user") == {"b": [1, 2]}
    ledger.delete("user", "b")
    assert ledger.buckets() == []
    assert ledger.get("nothing", "here") is None


def test_returned_values_are_copies() -> None:
    ledger = make_ledger()
    ledger.set("user", "a", {"n": [1]})
    ledger.get("user", "a")["n"].append(2)
    ledger.items("user")["a"]["n"].append(3)
    assert ledger.get("user", "a") == {"n": [1]}


def test_bad_writes_raise_ledger_error() -> None:
    ledger = make_ledger(max_value_size=10)
    with pytest.raises(LedgerError):
        ledger.set("user", "a", "x" * 20)
    with pytest.raises(LedgerError):
        ledger.set("", "a", 1)
    with pytest.raises(LedgerError):
        ledger.set("user", "a", {1, 2})
    assert len(ledger) == 0


def test_listeners_hear_local_and_remote_changes_and_failures_are_isolated() -> None:
    ledger = make_ledger()
    heard: list[LedgerUpdate] = []

    def broken(update: LedgerUpdate) -> None:
        raise RuntimeError("plugin bug")

    ledger.add_listener(broken)
    ledger.add_listener(heard.append)
    ledger.set("user", "a", 1)
    remote = Entry.signed(BOB, "user", "b", 2, Version(ledger.clock.now_ms(), 0, BOB.peer_id))
    ledger.apply_remote([remote])
    ledger.apply_remote([remote])  # a duplicate is no change
    assert [(u.key, u.value, u.local, u.owner) for u in heard] == [("a", 1, True, ALICE.peer_id), ("b", 2, False, BOB.peer_id)]
    assert heard[1].version == tuple(remote.version)
    assert ledger.counters["listener_errors"] == 2
    ledger.remove_listener(heard.append)
    ledger.set("user", "c", 3)
    assert len(heard) == 2


async def test_watch_yields_changes_of_its_bucket_from_registration_on() -> None:
    ledger = make_ledger()
    everything = ledger.watch()
    users = ledger.watch("user")
    ledger.set("user", "a", 1)  # before the first await: must not be missed
    ledger.set("other", "x", 0)
    ledger.delete("user", "a")
    got = [await asyncio.wait_for(users.__anext__(), 1) for _ in range(2)]
    assert [(u.key, u.value, u.deleted) for u in got] == [("a", 1, False), ("a", None, True)]
    all_got = [await asyncio.wait_for(everything.__anext__(), 1) for _ in range(3)]
    assert [u.bucket for u in all_got] == ["user", "other", "user"]
    await users.aclose()
    ledger.set("user", "b", 2)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(users.__anext__(), 1)


async def test_watch_ends_when_the_ledger_closes() -> None:
    ledger = make_ledger()
    seen = []

    async def consume() -> None:
        async for update in ledger.watch():
            seen.append(update.key)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)
    ledger.set("user", "a", 1)
    await asyncio.sleep(0.01)
    ledger.close()
    await asyncio.wait_for(task, 1)
    assert seen == ["a"]


async def test_updates_from_a_worker_thread_reach_watchers() -> None:
    ledger = make_ledger()
    watch = ledger.watch("user")
    remote = Entry.signed(BOB, "user", "t", "x", Version(ledger.clock.now_ms(), 0, BOB.peer_id))
    await asyncio.to_thread(ledger.apply_remote, [remote])
    update = await asyncio.wait_for(watch.__anext__(), 1)
    assert update.key == "t" and not update.local


async def test_apply_remote_async_verifies_off_the_loop() -> None:
    ledger = make_ledger()
    now = ledger.clock.now_ms()
    good = [Entry.signed(BOB, "user", f"k{i}", i, Version(now, i, BOB.peer_id)) for i in range(50)]
    bad = Entry(good[0].bucket, "forged", 1, BOB.peer_id, Version(now, 99, BOB.peer_id), False, good[0].sig)
    updates = await ledger.apply_remote_async(good + [bad])
    assert len(updates) == 50
    assert ledger.counters["rejected_signature"] == 1


async def test_entries_we_already_hold_are_not_checked_again(monkeypatch) -> None:
    """A sync or a second gossip path mostly brings entries we hold: their signatures are not
    checked (the merge drops them as stale first), a newer one's still is, and a forged newer
    one is still refused."""
    ledger = make_ledger()
    now = ledger.clock.now_ms()
    held = [Entry.signed(BOB, "user", f"k{i}", i, Version(now, i, BOB.peer_id)) for i in range(5)]
    assert len(await ledger.apply_remote_async(held)) == 5
    checked = []
    real_verify = Entry.verify
    monkeypatch.setattr(Entry, "verify", lambda self: checked.append(self.key) or real_verify(self))
    newer = Entry.signed(BOB, "user", "k0", "new", Version(now + 1, 0, BOB.peer_id))
    forged = Entry("user", "k1", "forged", BOB.peer_id, Version(now + 1, 0, BOB.peer_id), False, newer.sig)
    updates = await ledger.apply_remote_async([*held, newer, forged])
    assert [u.key for u in updates] == ["k0"]
    assert sorted(checked) == ["k0", "k1"]
    assert ledger.counters["stale"] == 5 and ledger.counters["rejected_signature"] == 1
    assert ledger.get("user", "k0") == "new" and ledger.get("user", "k1") == 1
    # only stale ones: nothing checked, nothing sent to a worker thread
    checked.clear()
    assert await ledger.apply_remote_async(held) == [] and checked == []


def test_tombstones_are_pruned_after_the_grace_period() -> None:
    wall = Wall()
    ledger = make_ledger(wall, tombstone_grace=60)
    ledger.set("user", "keep", 1)
    ledger.delete("user", "gone")
    wall.ms += 30_000
    assert ledger.prune_tombstones() == 0
    wall.ms += 31_000
    assert ledger.prune_tombstones() == 1
    assert ledger.get_entry("user", "gone") is None
    assert ledger.store.count() == 1
    # A tombstone older than the grace still deletes what it supersedes, but is not kept.
    old = Version(wall.ms - 120_000, 0, BOB.peer_id)
    ledger.apply_remote([Entry.signed(BOB, "user", "stale", "v", Version(old.wall_ms - 1, 0, BOB.peer_id))])
    updates = ledger.apply_remote([Entry.signed(BOB, "user", "stale", None, old, deleted=True)])
    assert [u.deleted for u in updates] == [True]
    assert ledger.get_entry("user", "stale") is None


async def test_apply_delta_merges_good_batches_and_counts_garbage() -> None:
    from kairos_core.ledger import encode_batch

    ledger = make_ledger()
    remote = Entry.signed(BOB, "user", "g", [1], Version(ledger.clock.now_ms(), 0, BOB.peer_id))
    assert [u.key for u in await ledger.apply_delta(encode_batch([remote]))] == ["g"]
    assert await ledger.apply_delta(b"\x00garbage") == []
    assert await ledger.apply_delta(encode_batch([remote]), max_size=10) == []
    assert ledger.counters["decode_errors"] == 2
    assert ledger.get("user", "g") == [1]


def test_remote_values_are_judged_by_one_limit_for_all_nodes(tmp_path):
    """A node allowed bigger writes must not split the ledger from nodes with the default limit."""
    from kairos_core.identity import Identity
    from kairos_core.ledger import Ledger, LedgerStore

    big_writer = Ledger(Identity.generate(), LedgerStore(tmp_path / "a.db"), max_value_size=1024 * 1024)
    default = Ledger(Identity.generate(), LedgerStore(tmp_path / "b.db"))
    entry = big_writer.set("files", "blob", "x" * 100_000)
    assert [u.key for u in default.apply_remote([entry])] == ["blob"]
    assert default.get("files", "blob") == "x" * 100_000
    with pytest.raises(LedgerError, match="max_value_size"):
        default.set("files", "mine", "x" * 100_000)  # its own writes keep its own limit
