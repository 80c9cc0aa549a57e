"""Write policies: open, owner-keyed and first-writer buckets, locally and from peers."""

import pytest

from kairos_core.identity import Identity
from kairos_core.ledger import (
    LEASE,
    OPEN,
    OWNER_KEYED,
    Entry,
    HybridLogicalClock,
    Ledger,
    LedgerStore,
    PolicyError,
    PolicyRegistry,
    Version,
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
    assert registry.for_bucket("leader") is LEASE
    assert registry.for_bucket("vpn") is OPEN  # plugins register their buckets (kairos_ledger_policies)
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
    registry = PolicyRegistry()
    registry.register("vpn", OWNER_KEYED)
    ledger = ledger_of(ALICE, policies=registry)
    ledger.set("nodes", ALICE.peer_id, {"h": "a"})
    ledger.set("vpn", ALICE.peer_id + "/ip", "10.1.0.1")
    for key in (BOB.peer_id, BOB.peer_id + "/ip", ALICE.peer_id + "x", "x/" + ALICE.peer_id):
        with pytest.raises(PolicyError):
            ledger.set("vpn", key, 1)
    assert ledger.items("vpn") == {ALICE.peer_id + "/ip": "10.1.0.1"}


def test_custom_policies_replace_the_defaults() -> None:
    ledger = ledger_of(ALICE, policies={"user": OWNER_KEYED})
    with pytest.raises(PolicyError):
        ledger.set("user", "shared", 1)
    ledger.set("nodes", "anything", 1)  # no longer owned in this registry


def lease_key(peer) -> str:
    return f"kairos:000000000002:{peer.peer_id}"


def test_leases_are_written_under_and_name_their_writer() -> None:
    ledger = ledger_of(ALICE)
    ledger.set("leader", lease_key(ALICE), {"peer": ALICE.peer_id, "epoch": 2})
    with pytest.raises(PolicyError):
        ledger.set("leader", lease_key(ALICE), {"peer": BOB.peer_id, "epoch": 2})
    with pytest.raises(PolicyError):
        ledger.set("leader", lease_key(ALICE), "not a lease")
    with pytest.raises(PolicyError):
        ledger.set("leader", lease_key(BOB), {"peer": ALICE.peer_id, "epoch": 2})  # bob's key
    with pytest.raises(PolicyError):
        ledger.delete("leader", lease_key(BOB))  # nor may alice delete bob's claim
    in_alices_name = remote(BOB, "leader", lease_key(ALICE), {"peer": ALICE.peer_id, "epoch": 9}, 5)
    assert ledger.apply_remote([in_alices_name]) == []
    assert ledger.counters["rejected_policy"] == 1


def claims(policies) -> tuple[Ledger, Ledger, Entry, Entry]:
    """Two peers claim a lapsed lease within the same millisecond, each before hearing the other."""
    alice, bob = ledger_of(ALICE, policies=policies), ledger_of(BOB, policies=policies)
    a = alice.set("leader", lease_key(ALICE), {"peer": ALICE.peer_id, "epoch": 2})
    b = bob.set("leader", lease_key(BOB), {"peer": BOB.peer_id, "epoch": 2})
    alice.apply_remote([b])
    bob.apply_remote([a])
    return alice, bob, a, b


def test_racing_claims_converge_under_the_lease_policy() -> None:
    alice, bob, a, b = claims(None)
    # each claim lives under its own key: both nodes hold both, and the election picks one
    for ledger in (alice, bob):
        assert ledger.get_entry("leader", lease_key(ALICE)) == a
        assert ledger.get_entry("leader", lease_key(BOB)) == b


def test_the_public_list_of_core_buckets_is_the_list_the_core_guards() -> None:
    # CORE_BUCKETS is what plugins and the TCP API refuse to write; DEFAULT_POLICIES what the
    # ledger guards: a bucket missing from the first (revoked and rotation were) is writable
    # over the dashboard's listener
    from kairos_core.ledger.policy import DEFAULT_POLICIES
    from kairos_core.plugin import CORE_BUCKETS

    assert set(CORE_BUCKETS) == set(DEFAULT_POLICIES)
