"""Merge rules as properties: commutative, associative, idempotent, order-insensitive, and
protected by signatures and ownership."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_core.identity import Identity
from kairos_core.ledger import Entry, Ledger, LedgerStore, Version, merge

IDENTITIES = [Identity.from_seed(bytes([n]) * 32) for n in range(1, 4)]
NOW_MS = 1_700_000_000_000

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def entries(draw, keys=("a", "b", "c")) -> Entry:
    identity = draw(st.sampled_from(IDENTITIES))
    deleted = draw(st.booleans())
    version = Version(NOW_MS + draw(st.integers(0, 5)), draw(st.integers(0, 3)), identity.peer_id)
    value = None if deleted else draw(json_values)
    return Entry.signed(identity, "user", draw(st.sampled_from(keys)), value, version, deleted)


same_key = entries(keys=("k",))


def new_ledger(identity: Identity = IDENTITIES[0]) -> Ledger:
    from kairos_core.ledger import HybridLogicalClock

    clock = HybridLogicalClock(identity.peer_id, now_ms=lambda: NOW_MS)
    return Ledger(identity, LedgerStore(":memory:"), clock=clock)


def state(ledger: Ledger) -> dict:
    return {(e.bucket, e.key): (e.version, e.deleted, e.value_json, e.sig) for e in ledger.entries()}


@given(same_key, same_key)
def test_merge_is_commutative(a: Entry, b: Entry) -> None:
    assert merge(a, b) == merge(b, a)


@given(same_key, same_key, same_key)
def test_merge_is_associative(a: Entry, b: Entry, c: Entry) -> None:
    assert merge(merge(a, b), c) == merge(a, merge(b, c))


@given(same_key)
def test_merge_is_idempotent(a: Entry) -> None:
    assert merge(a, a) == a
    assert merge(a, None) == a and merge(None, a) == a


@given(same_key, same_key)
def test_merge_picks_the_greater_version(a: Entry, b: Entry) -> None:
    assert merge(a, b).version == max(a.version, b.version)


@settings(max_examples=60, deadline=None)
@given(st.lists(entries(), min_size=1, max_size=12), st.randoms(use_true_random=False))
def test_any_interleaving_and_duplication_converges(writes: list[Entry], rnd) -> None:
    reference = new_ledger()
    reference.apply_remote(writes)
    expected = state(reference)
    # Replay shuffled, with duplicates, in batches of random sizes, into a fresh ledger.
    replay = writes + rnd.sample(writes, k=len(writes) // 2)
    rnd.shuffle(replay)
    other = new_ledger(IDENTITIES[1])
    while replay:
        n = rnd.randint(1, len(replay))
        other.apply_remote(replay[:n])
        replay = replay[n:]
    assert state(other) == expected
    # And the winner per key is the greatest version written for it.
    for ident, (version, *_rest) in expected.items():
        assert version == max(w.version for w in writes if (w.bucket, w.key) == ident)


@settings(max_examples=20, deadline=None)
@given(st.lists(entries(), min_size=1, max_size=5))
def test_every_permutation_gives_the_same_state(writes: list[Entry]) -> None:
    states = []
    for order in itertools.islice(itertools.permutations(writes), 24):
        ledger = new_ledger()
        for w in order:
            ledger.apply_remote([w])
        states.append(state(ledger))
    assert all(s == states[0] for s in states)


def test_a_forged_signature_is_rejected_and_counted() -> None:
    ledger = new_ledger()
    good = Entry.signed(IDENTITIES[1], "user", "k", 1, Version(NOW_MS, 0, IDENTITIES[1].peer_id))
    forged = Entry(good.bucket, good.key, 2, good.owner, good.version, False, good.sig)
    assert ledger.apply_remote([forged]) == []
    assert ledger.get("user", "k") is None
    assert ledger.counters["rejected_signature"] == 1
    assert len(ledger.apply_remote([good])) == 1
    assert ledger.get("user", "k") == 1


def test_an_entry_signed_by_someone_else_than_its_owner_is_rejected() -> None:
    ledger = new_ledger()
    victim, forger = IDENTITIES[1], IDENTITIES[2]
    signed_by_forger = Entry.signed(forger, "user", "k", 1, Version(NOW_MS, 0, forger.peer_id))
    claimed = Entry("user", "k", 1, victim.peer_id, Version(NOW_MS, 0, victim.peer_id), False, signed_by_forger.sig)
    assert ledger.apply_remote([claimed]) == []
    assert ledger.counters["rejected_signature"] == 1


def test_a_write_to_another_peers_owned_key_is_rejected() -> None:
    ledger = new_ledger()
    writer, owner = IDENTITIES[1], IDENTITIES[2]
    intruder = Entry.signed(writer, "nodes", owner.peer_id, {"ip": "6.6.6.6"}, Version(NOW_MS, 0, writer.peer_id))
    assert ledger.apply_remote([intruder]) == []
    assert ledger.counters["rejected_policy"] == 1
    own = Entry.signed(owner, "nodes", owner.peer_id + "/addrs", ["x"], Version(NOW_MS, 0, owner.peer_id))
    assert len(ledger.apply_remote([own])) == 1


def test_versions_too_far_ahead_are_refused_and_do_not_move_the_clock() -> None:
    ledger = new_ledger()
    future = Entry.signed(IDENTITIES[1], "user", "k", 1, Version(NOW_MS + 61_000, 0, IDENTITIES[1].peer_id))
    assert ledger.apply_remote([future]) == []
    assert ledger.counters["rejected_future"] == 1
    assert ledger.set("user", "mine", 1).version.wall_ms == NOW_MS


def test_a_remote_tombstone_deletes_and_an_older_write_cannot_resurrect() -> None:
    ledger = new_ledger()
    peer = IDENTITIES[1]
    old = Entry.signed(peer, "user", "k", "v1", Version(NOW_MS, 0, peer.peer_id))
    tomb = Entry.signed(peer, "user", "k", None, Version(NOW_MS, 1, peer.peer_id), deleted=True)
    ledger.apply_remote([tomb, old])
    assert ledger.get("user", "k") is None
    assert ledger.get_entry("user", "k").deleted
    assert ledger.counters["stale"] == 1


def test_a_local_write_after_a_merge_wins_over_it() -> None:
    ledger = new_ledger()
    peer = IDENTITIES[1]
    ahead = Entry.signed(peer, "user", "k", "remote", Version(NOW_MS + 30_000, 4, peer.peer_id))
    ledger.apply_remote([ahead])
    mine = ledger.set("user", "k", "local")
    assert mine.version > ahead.version
    assert ledger.get("user", "k") == "local"
