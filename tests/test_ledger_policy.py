"""Write policies: open, owner-keyed and first-writer buckets, locally and from peers."""

import pytest

from kairos_core.identity import Identity
from kairos_core.ledger import (
    FIRST_WRITER, LEASE, OPEN, OWNER_KEYED, Entry, HybridLogicalClock, Ledger, LedgerStore, PolicyError,
    PolicyRegistry, Version,
)

ALICE, BOB = Identity.from_seed(b"\x01" * 32), Identity.from_seed(b"\x02" * 32)
NOW = 1_700_000_000.0


def ledger_of(identity: Identity, **kw) -> Ledger:
    clock = HybridLogicalClock(identity.peer_id, now_ms=lambda: int(NOW * 1000))
    return Ledger(identity, LedgerStore(":memory:"), clock=clock, **kw)


def remote(identity: Identity, bucket: str, key: str, value, ms_offset: int = 0, deleted: bool = False) -> Entry:
    version = Version(int(NOW * 1000) + ms_offset, 0, identity.peer_id)
    return Entry.signed(identity, bucket, key, None if deleted else value, version, deleted)


def test_default_registry() -> None:
    registry = PolicyRegistry()
    assert registry.for_bucket("nodes") is OWNER_KEYED
    assert registry.for_bucket("vpn") is OWNER_KEYED
    assert registry.for_bucket("leader") is LEASE
    assert registry.for_bucket("anything") is OPEN


def test_a_namespaced_registry_applies_the_core_policies_under_its_prefix() -> None:
    registry = PolicyRegistry(namespace="net1/")
    assert registry.for_bucket("net1/nodes") is OWNER_KEYED
    assert registry.for_bucket("net1/leader") is LEASE
    assert registry.for_bucket("nodes") is OPEN
    assert registry.for_bucket("net2/nodes") is OPEN
    ledger = ledger_of(ALICE, policies=registry)
    with pytest.raises(PolicyError):
        ledger.set("net1/nodes", BOB.peer_id, 1)


def test_owner_keyed_accepts_own_id_and_paths_under_it_only() -> None:
    ledger = ledger_of(ALICE)
    ledger.set("nodes", ALICE.peer_id, {"h": "a"})
    ledger.set("vpn", ALICE.peer_id + "/ip", "10.1.0.1")
    for key in (BOB.peer_id, BOB.peer_id + "/ip", ALICE.peer_id + "x", "x/" + ALICE.peer_id):
        with pytest.raises(PolicyError):
            ledger.set("vpn", key, 1)
    assert ledger.items("vpn") == {ALICE.peer_id + "/ip": "10.1.0.1"}


FIRST_WRITER_LEADER = {"leader": FIRST_WRITER}


def test_first_writer_holds_a_live_lease_against_others() -> None:
    ledger = ledger_of(ALICE, policies=FIRST_WRITER_LEADER)
    ledger.set("leader", "lease", {"peer": ALICE.peer_id, "epoch": 1, "expires": NOW + 10})
    claim = remote(BOB, "leader", "lease", {"peer": BOB.peer_id, "epoch": 2, "expires": NOW + 20}, 5)
    assert ledger.apply_remote([claim]) == []
    assert ledger.counters["rejected_policy"] == 1
    # The holder may renew.
    ledger.set("leader", "lease", {"peer": ALICE.peer_id, "epoch": 1, "expires": NOW + 30})


def test_first_writer_allows_takeover_of_an_expired_lease_or_a_tombstone() -> None:
    ledger = ledger_of(ALICE, policies=FIRST_WRITER_LEADER)
    ledger.set("leader", "lease", {"peer": ALICE.peer_id, "epoch": 1, "expires": NOW - 1})
    claim = remote(BOB, "leader", "lease", {"peer": BOB.peer_id, "epoch": 2, "expires": NOW + 20}, 5)
    assert len(ledger.apply_remote([claim])) == 1
    with pytest.raises(PolicyError):
        ledger.set("leader", "lease", {"peer": ALICE.peer_id, "epoch": 3})
    bob_gone = remote(BOB, "leader", "lease", None, 10, deleted=True)
    ledger.apply_remote([bob_gone])
    ledger.set("leader", "lease", {"peer": ALICE.peer_id, "epoch": 3})
    assert ledger.get("leader", "lease")["epoch"] == 3


def test_first_writer_without_expires_never_lapses() -> None:
    ledger = ledger_of(ALICE, policies=FIRST_WRITER_LEADER)
    ledger.set("leader", "pinned", {"peer": ALICE.peer_id})
    assert ledger.apply_remote([remote(BOB, "leader", "pinned", "mine", 5)]) == []


def test_custom_policies_replace_the_defaults() -> None:
    ledger = ledger_of(ALICE, policies={"user": OWNER_KEYED})
    with pytest.raises(PolicyError):
        ledger.set("user", "shared", 1)
    ledger.set("nodes", "anything", 1)  # no longer owned in this registry


def test_lease_values_must_name_their_writer() -> None:
    ledger = ledger_of(ALICE)
    ledger.set("leader", "lease", {"peer": ALICE.peer_id, "epoch": 1, "expires": NOW + 10})
    with pytest.raises(PolicyError):
        ledger.set("leader", "lease", {"peer": BOB.peer_id, "epoch": 1})
    with pytest.raises(PolicyError):
        ledger.set("leader", "lease", "not a lease")
    in_alices_name = remote(BOB, "leader", "lease", {"peer": ALICE.peer_id, "epoch": 9}, 5)
    assert ledger.apply_remote([in_alices_name]) == []
    assert ledger.counters["rejected_policy"] == 1


def claims(policies) -> tuple[Ledger, Ledger, Entry, Entry]:
    """Two peers claim a lapsed lease within the same millisecond, each before hearing the other."""
    alice, bob = ledger_of(ALICE, policies=policies), ledger_of(BOB, policies=policies)
    a = alice.set("leader", "lease", {"peer": ALICE.peer_id, "epoch": 2, "expires": NOW + 10})
    b = bob.set("leader", "lease", {"peer": BOB.peer_id, "epoch": 2, "expires": NOW + 10})
    alice.apply_remote([b])
    bob.apply_remote([a])
    return alice, bob, a, b


def test_racing_claims_converge_under_the_lease_policy() -> None:
    alice, bob, a, b = claims(None)
    winner = max(a, b, key=lambda e: e.version)
    assert alice.get_entry("leader", "lease") == bob.get_entry("leader", "lease") == winner


def test_racing_claims_split_under_first_writer_which_is_why_it_is_not_the_leader_default() -> None:
    alice, bob, a, b = claims(FIRST_WRITER_LEADER)
    assert alice.get_entry("leader", "lease") != bob.get_entry("leader", "lease")
