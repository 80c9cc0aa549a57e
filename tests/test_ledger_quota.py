"""Per-owner quotas in open buckets (hardening, issue #12 Medium 4).

One insider wrote 100 values of 1 MiB and every node kept them: +530 MB of RSS and +100 MB of disk
each, and 20,000 tombstones for a week. Now an owner holds at most so many live keys, bytes of
values and tombstones in the open buckets: this node's writes past ``ledger.max_*_per_owner`` fail
with a one-line error, and peers' entries past the network's quota are refused and counted. The
unit tests use in-memory ledgers; the last test runs the attack against real nodes on loopback.
"""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_core.config import CORE_DEFAULTS, CORE_SCHEMA
from kairos_core.errors import KairosError
from kairos_core.identity import Identity
from kairos_core.ledger import Entry, HybridLogicalClock, Ledger, LedgerError, LedgerStore, Version
from kairos_core.ledger.policy import DEFAULT_QUOTA, NETWORK_QUOTA, OwnerQuota, Usage

ALICE, BOB, CAROL = (Identity.from_seed(bytes([n]) * 32) for n in (1, 2, 3))
NOW_MS = 1_700_000_000_000
SMALL = OwnerQuota(keys=4, bytes=400, tombstones=3)  # a network quota small enough to meet


class Wall:
    def __init__(self, ms: int = NOW_MS) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def make_ledger(identity: Identity = ALICE, wall: Wall | None = None, store: LedgerStore | None = None, **kw) -> Ledger:
    clock = HybridLogicalClock(identity.peer_id, now_ms=wall or Wall())
    return Ledger(identity, store or LedgerStore(":memory:"), clock=clock, **kw)


def signed(
    identity: Identity, key: str, value=None, *, ms: int = NOW_MS, counter: int = 0, bucket: str = "user", deleted: bool = False
) -> Entry:
    return Entry.signed(identity, bucket, key, None if deleted else value, Version(ms, counter, identity.peer_id), deleted)


def size(value) -> int:
    return len(Entry.signed(ALICE, "b", "k", value, Version(1, 0, ALICE.peer_id)).value_json.encode())


# -- the limits ----------------------------------------------------------------------------------


def test_the_config_declares_the_local_quotas_at_half_the_network_quota() -> None:
    ledger = CORE_DEFAULTS["ledger"]
    assert (ledger["max_keys_per_owner"], ledger["max_bytes_per_owner"], ledger["max_tombstones_per_owner"]) == DEFAULT_QUOTA
    ledger_schema = next(section for section in CORE_SCHEMA if section.name == "ledger")
    highest = {option.name: option.maximum for option in ledger_schema}
    assert (highest["max_keys_per_owner"], highest["max_bytes_per_owner"], highest["max_tombstones_per_owner"]) == DEFAULT_QUOTA
    # a peer may still hold our deleted keys live (or live keys as tombstones): our keys and
    # tombstones together never exceed either network limit; bytes get the same headroom
    assert DEFAULT_QUOTA.keys + DEFAULT_QUOTA.tombstones <= min(NETWORK_QUOTA.keys, NETWORK_QUOTA.tombstones)
    assert 2 * DEFAULT_QUOTA.bytes <= NETWORK_QUOTA.bytes
    # an insider's share stays modest: 16 MiB of values at most
    assert NETWORK_QUOTA.bytes <= 16 * 1024 * 1024


def test_a_config_over_the_quota_bound_is_refused() -> None:
    from kairos_core.config import resolve_config
    from kairos_core.errors import ConfigError
    from kairos_core.plugins import make_plugin_manager

    manager = make_plugin_manager(autoload=False)
    resolve_config({"ledger": {"max_keys_per_owner": 10}}, manager, env={})
    for option, value in (("max_keys_per_owner", 10_001), ("max_bytes_per_owner", 0), ("max_tombstones_per_owner", 20_000)):
        with pytest.raises(ConfigError, match=f"ledger.{option}: must be between"):
            resolve_config({"ledger": {option: value}}, manager, env={})


def test_the_local_quota_never_exceeds_the_network_quota() -> None:
    ledger = make_ledger(quota=OwnerQuota(100, 10_000, 100), network_quota=SMALL)
    assert ledger.quota == SMALL
    assert make_ledger(network_quota=SMALL).quota == SMALL
    assert make_ledger().quota == DEFAULT_QUOTA and make_ledger().network_quota == NETWORK_QUOTA


# -- local writes ----------------------------------------------------------------------------------


def test_a_local_write_past_the_key_quota_fails_with_a_clear_one_line_error() -> None:
    ledger = make_ledger(quota=OwnerQuota(keys=3, bytes=10_000, tombstones=10))
    for n in range(3):
        ledger.set("user", f"k{n}", n)
    with pytest.raises(LedgerError) as exc:
        ledger.set("user", "k3", 3)
    message = str(exc.value)
    assert message == "quota: this node would hold 4 live keys in open buckets, more than ledger.max_keys_per_owner=3"
    assert ledger.get("user", "k3") is None and ledger.store.count() == 3
    # at the limit, the owner still updates its keys, in another open bucket too
    ledger.set("user", "k0", "updated")
    with pytest.raises(LedgerError, match="max_keys_per_owner"):
        ledger.set("other", "k", 1)
    # a delete frees a live key (and takes a tombstone), so a new key fits again
    ledger.delete("user", "k1")
    ledger.set("user", "k3", 3)
    assert ledger.usage(ALICE.peer_id) == Usage(keys=3, bytes=size("updated") + size(2) + size(3), tombstones=1)


def test_local_byte_and_tombstone_quotas() -> None:
    ledger = make_ledger(quota=OwnerQuota(keys=100, bytes=25, tombstones=2))
    ledger.set("user", "a", "x" * 10)  # 12 bytes of JSON
    ledger.set("user", "b", "y" * 10)  # 24
    with pytest.raises(
        LedgerError, match=r"would hold 26 bytes of values in open buckets, more than ledger.max_bytes_per_owner=25"
    ):
        ledger.set("user", "c", 12)
    with pytest.raises(LedgerError, match="max_bytes_per_owner"):
        ledger.set("user", "a", "x" * 12)  # growing a key counts too
    ledger.set("user", "a", "x")  # shrinking one never fails
    ledger.set("user", "c", 12)
    ledger.delete("user", "a")
    ledger.delete("user", "never-written")  # a tombstone for a key we never held counts too
    with pytest.raises(LedgerError) as exc:
        ledger.delete("user", "b")
    assert str(exc.value) == (
        "quota: this node would hold 3 tombstones in open buckets, more than "
        "ledger.max_tombstones_per_owner=2 (they are pruned after ledger.tombstone_grace)"
    )
    assert "\n" not in str(exc.value)


def test_buckets_with_their_own_policy_are_not_counted() -> None:
    ledger = make_ledger(quota=OwnerQuota(keys=1, bytes=10, tombstones=1))
    ledger.set("nodes", ALICE.peer_id, {"hostname": "a" * 50})
    ledger.set("nodes", f"{ALICE.peer_id}/links", ["x" * 50])
    ledger.set("leader", f"kairos:000000000001:{ALICE.peer_id}", {"peer": ALICE.peer_id})
    assert ledger.usage(ALICE.peer_id) == Usage()
    ledger.set("user", "a", 1)
    assert ledger.usage(ALICE.peer_id) == Usage(keys=1, bytes=1)


# -- remote entries ----------------------------------------------------------------------------------


def test_remote_entries_past_the_network_quota_are_refused_counted_and_not_stored() -> None:
    ledger = make_ledger(network_quota=SMALL)
    updates = ledger.apply_remote([signed(BOB, f"k{n}", n) for n in range(10)])
    assert [u.key for u in updates] == ["k0", "k1", "k2", "k3"]  # judged in order within one batch
    assert ledger.counters["rejected_quota"] == 6
    assert ledger.usage(BOB.peer_id) == Usage(keys=4, bytes=4)
    assert ledger.store.count() == 4 and len(ledger) == 4
    # a later batch fares no better; the owner's own keys still update, other owners are unaffected
    assert ledger.apply_remote([signed(BOB, "k9", 9, ms=NOW_MS + 1)]) == []
    assert [u.value for u in ledger.apply_remote([signed(BOB, "k0", 5, ms=NOW_MS + 1)])] == [5]
    assert [u.key for u in ledger.apply_remote([signed(CAROL, f"c{n}", n) for n in range(4)])] == ["c0", "c1", "c2", "c3"]
    assert ledger.counters["rejected_quota"] == 7


def test_remote_byte_quota_allows_updates_that_do_not_grow() -> None:
    ledger = make_ledger(network_quota=SMALL)
    assert ledger.apply_remote([signed(BOB, "big", "x" * 300)])
    assert ledger.apply_remote([signed(BOB, "more", "y" * 150)]) == []
    assert ledger.apply_remote([signed(BOB, "big", "x" * 398, ms=NOW_MS + 1)])  # 400 bytes: just fits
    assert ledger.apply_remote([signed(BOB, "big", "x" * 399, ms=NOW_MS + 2)]) == []
    assert ledger.get("user", "big") == "x" * 398
    # one batch: the update that shrinks makes room for the new key after it, not before it
    shrink_then_grow = [signed(BOB, "big", "x", ms=NOW_MS + 3), signed(BOB, "more", "y" * 150)]
    assert [u.key for u in ledger.apply_remote(shrink_then_grow)] == ["big", "more"]
    assert ledger.usage(BOB.peer_id) == Usage(keys=2, bytes=3 + 152)


def test_overwriting_another_owners_key_moves_it_between_their_quotas() -> None:
    ledger = make_ledger(network_quota=SMALL)
    ledger.apply_remote([signed(BOB, f"k{n}", n) for n in range(4)])
    taken = [signed(CAROL, f"k{n}", "c", ms=NOW_MS + 1) for n in range(4)]
    assert len(ledger.apply_remote(taken)) == 4
    assert ledger.usage(BOB.peer_id) == Usage() and ledger.usage(CAROL.peer_id) == Usage(keys=4, bytes=12)
    assert len(ledger.apply_remote([signed(BOB, f"b{n}", n, ms=NOW_MS + 2) for n in range(4)])) == 4  # room again
    assert ledger.apply_remote([signed(CAROL, "c-new", "c", ms=NOW_MS + 3)]) == []  # Carol is full
    # within one batch too: Bob (with room after a delete) takes a key of Carol's, and the room
    # that leaves her takes her next entry
    ledger.apply_remote([signed(BOB, "b3", ms=NOW_MS + 3, deleted=True)])
    batch = [signed(BOB, "k0", "b", ms=NOW_MS + 4), signed(CAROL, "c-new", "c", ms=NOW_MS + 4)]
    assert len(ledger.apply_remote(batch)) == 2
    assert ledger.usage(BOB.peer_id) == Usage(keys=4, bytes=1 + 1 + 1 + 3, tombstones=1)
    assert ledger.usage(CAROL.peer_id) == Usage(keys=4, bytes=12)


def test_tombstones_count_until_pruned_and_expired_ones_count_for_nothing() -> None:
    wall = Wall()
    ledger = make_ledger(wall=wall, network_quota=SMALL, tombstone_grace=3600)
    tombs = [signed(BOB, f"gone{n}", ms=NOW_MS - n, deleted=True) for n in range(5)]
    assert len(ledger.apply_remote(tombs)) == 3  # three are kept
    assert ledger.usage(BOB.peer_id) == Usage(tombstones=3) and ledger.counters["rejected_quota"] == 2
    # a tombstone already past its grace deletes what it finds and is not kept: it needs no room
    old = NOW_MS - 3_601_000
    assert ledger.apply_remote([signed(CAROL, "x", 1, ms=old - 1)])
    assert ledger.apply_remote([signed(BOB, "x", ms=old, deleted=True)])
    assert ledger.get_entry("user", "x") is None and ledger.usage(BOB.peer_id) == Usage(tombstones=3)
    wall.ms += 3_601_000
    assert ledger.prune_tombstones() == 3
    assert ledger.usage(BOB.peer_id) == Usage()
    assert len(ledger.apply_remote([signed(BOB, "again", ms=wall.ms, deleted=True)])) == 1
    assert ledger.usage(BOB.peer_id) == Usage(tombstones=1)


def test_a_refused_entry_does_not_move_the_clock() -> None:
    ledger = make_ledger(network_quota=SMALL)
    ledger.apply_remote([signed(BOB, f"k{n}", n) for n in range(4)])
    before = ledger.clock.last
    assert ledger.apply_remote([signed(BOB, "ahead", 1, ms=NOW_MS + 20_000)]) == []
    assert ledger.clock.last == before


def test_accounting_follows_restarts_and_forgets_owners_that_hold_nothing(tmp_path) -> None:
    path = tmp_path / "ledger.sqlite3"
    roomy = OwnerQuota(keys=40, bytes=4000, tombstones=40)
    ledger = make_ledger(store=LedgerStore(path), network_quota=roomy)
    fakes = [Identity.generate() for _ in range(20)]
    ledger.apply_remote([signed(fake, f"f{n}", "x" * 100) for n, fake in enumerate(fakes)])
    ledger.apply_remote([signed(fake, "huge", "x" * 5000) for fake in fakes])  # refused: nothing kept
    ledger.apply_remote([signed(BOB, "b", [1, 2])])
    assert ledger._quotas.owners() == 21 and ledger.counters["rejected_quota"] == 20
    ledger.close()
    reopened = make_ledger(store=LedgerStore(path), network_quota=roomy)
    assert reopened.usage(fakes[0].peer_id) == Usage(keys=1, bytes=102)
    assert reopened.usage(BOB.peer_id) == Usage(keys=1, bytes=5)
    # once others overwrite the made-up owners' keys, nothing of them is left to account
    reopened.apply_remote([signed(CAROL, f"f{n}", ms=NOW_MS + 1, deleted=True) for n in range(20)])
    assert reopened._quotas.owners() == 2 and reopened.usage(CAROL.peer_id) == Usage(tombstones=20)
    reopened.close()


def test_a_store_over_the_quota_is_kept_but_cannot_grow(tmp_path) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = make_ledger(store=LedgerStore(path))
    ledger.apply_remote([signed(BOB, f"k{n}", n) for n in range(8)])
    ledger.close()
    reopened = make_ledger(store=LedgerStore(path), network_quota=SMALL)
    assert len(reopened) == 8 and reopened.usage(BOB.peer_id).keys == 8
    assert reopened.apply_remote([signed(BOB, "k8", 8)]) == []
    assert reopened.apply_remote([signed(BOB, "k0", 0, ms=NOW_MS + 1, deleted=True)])  # shrinking is fine
    reopened.close()


# -- convergence ---------------------------------------------------------------------------------

WRITERS = [ALICE, BOB, CAROL]
LOCAL = OwnerQuota(keys=3, bytes=60, tombstones=3)
NETWORK = OwnerQuota(keys=6, bytes=120, tombstones=6)

operations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, 2), st.sampled_from("abcdefg"), st.integers(0, 40)),
        st.tuples(st.just("delete"), st.integers(0, 2), st.sampled_from("abcdefg"), st.just(0)),
        st.tuples(st.just("gossip"), st.integers(0, 2), st.integers(0, 2), st.integers(0, 2**16)),
    ),
    max_size=60,
)


@pytest.mark.parametrize("network", [NETWORK, LOCAL], ids=["network-twice-local", "network-equal-local"])
@settings(max_examples=150, deadline=None)
@given(ops=operations)
def test_honest_writers_within_their_quota_always_converge(network: OwnerQuota, ops) -> None:
    """Three honest nodes write within their local quota and hear each other in any order, with
    any loss; after anti-entropy every node holds the same entries, none refused for good.

    With the network quota at twice the local one (as configured) a refusal takes a node far
    behind; with both equal, a node still holding an owner's older entries (a key deleted since, a
    value shrunk since) often refuses some of its newer ones for a while: anti-entropy merges them
    once it has caught up.
    """
    wall = Wall()
    ledgers = [make_ledger(identity, wall=wall, quota=LOCAL, network_quota=network) for identity in WRITERS]
    for op, who, key, arg in ops:
        wall.ms += 1
        node = ledgers[who]
        try:
            if op == "set":
                node.set("user", key, "v" * arg)
            elif op == "delete":
                node.delete("user", key)
        except LedgerError:
            pass  # over this node's own quota: the writer is told, nothing is written
        if op == "gossip" and who != key:
            # a lossy, reordered delivery of some of `who`'s entries to another node
            rng = random.Random(arg)
            sent = [e for e in node.entries() if rng.random() < 0.6]
            rng.shuffle(sent)
            ledgers[int(key)].apply_remote(sent)
    # anti-entropy: everyone offers everyone everything until nothing changes
    for _ in range(6):
        changed = False
        for source in ledgers:
            for target in ledgers:
                if source is not target and target.apply_remote(list(source.entries())):
                    changed = True
        if not changed:
            break
    states = [{(e.bucket, e.key): (e.version, e.sig) for e in node.entries()} for node in ledgers]
    assert states[0] == states[1] == states[2]
    for node in ledgers:
        for identity in WRITERS:
            held = node.usage(identity.peer_id)
            assert held.keys <= LOCAL.keys and held.bytes <= LOCAL.bytes and held.tombstones <= LOCAL.tombstones


# -- the attack against real nodes -------------------------------------------------------------------


def insiders_share(node, insider) -> tuple[int, int, int]:
    """Live keys, bytes of values and tombstones of ``insider`` that ``node`` holds, counted from
    its entries (not from the accounting under test)."""
    held = [e for e in node.ledger.entries() if e.owner == insider.peer_id and e.bucket == "junk"]
    live = [e for e in held if not e.deleted]
    return len(live), sum(len(e.value_json.encode()) for e in live), len(held) - len(live)


@pytest.mark.slow
async def test_one_insider_cannot_fill_every_nodes_memory_and_disk(kairos_network, monkeypatch):
    from kairos_core.api import APIClient

    # the network quota shrunk 64 times (16 MiB -> 256 KiB), so the attack's 100 values can be 16 KB
    quota = OwnerQuota(keys=40, bytes=256 * 1024, tombstones=40)
    monkeypatch.setattr("kairos_core.ledger.ledger.NETWORK_QUOTA", quota)
    net = await kairos_network(3, overrides={"ledger": {"max_keys_per_owner": 5}})
    await net.fully_connected()
    insider, *honest = net.nodes
    value = "x" * 16_000  # 16,002 bytes of JSON: 16 fit in 256 KiB
    for n in range(100):  # gossiped, and not kept by the insider itself
        insider.replicator.batcher.add(Entry.signed(insider.identity, "junk", f"blob-{n}", value, insider.ledger.clock.tick()))
    for n in range(100):
        insider.replicator.batcher.add(
            Entry.signed(insider.identity, "junk", f"gone-{n}", None, insider.ledger.clock.tick(), True)
        )
    insider.ledger.set("done", "marker", 1)  # gossiped after the forged entries
    await net.wait_for(lambda: all(node.ledger.get("done", "marker") == 1 for node in honest))
    await asyncio.sleep(1.0)  # stragglers

    for node in honest:
        keys, used, tombstones = insiders_share(node, insider)
        assert (keys, tombstones) == (16, 40) and used <= quota.bytes, (
            f"the insider holds {keys} keys, {used} bytes, {tombstones} tombstones"
        )
        assert node.ledger.usage(insider.peer_id) == Usage(keys + 1, used + 1, tombstones)  # and the marker
        on_disk = [e for e in node.ledger.store.load() if e.owner == insider.peer_id and e.bucket == "junk"]
        assert len(on_disk) == 16 + 40  # not 200 rows
        assert node.status()["counters"]["ledger_rejected_quota"] >= 84 + 60

    # honest writes still replicate everywhere; the writer past its own quota is told why, in one
    # line, through the API
    client = APIClient(honest[0].config.api_socket)
    for n in range(5):
        await asyncio.to_thread(client.request, "PUT", f"/api/ledger/cfg/k{n}", content=b"1")
    with pytest.raises(KairosError) as exc:
        await asyncio.to_thread(client.request, "PUT", "/api/ledger/cfg/k5", content=b"1")
    assert str(exc.value) == "quota: this node would hold 6 live keys in open buckets, more than ledger.max_keys_per_owner=5"
    honest[1].ledger.set("cfg", "other", 2)
    await net.wait_for(
        lambda: all(
            node.ledger.get("cfg", f"k{n}") == 1 and node.ledger.get("cfg", "other") == 2 for node in net.nodes for n in range(5)
        )
    )
