"""Role planning (pure); in real ledgers, the epoch fencing of role entries and whose join data counts."""

from __future__ import annotations

import pytest

from kairos_core.election import LEADER_BUCKET, lease_key, parse_lease, winner
from kairos_core.identity import Identity
from kairos_core.ledger.ledger import open_ledger
from kairos_plugin_k3s.cluster_state import (
    KUBECONFIG_KEY,
    MASTER_IP_KEY,
    TOKEN_KEY,
    ClusterState,
    candidate_key,
    cluster_bucket,
    legacy_role_key,
    own_key,
    role_key,
)
from kairos_plugin_k3s.roles import CLUSTER_INIT, MASTER, MASTER_HA, WORKER, plan_roles

NET = "kairos"
BUCKET = cluster_bucket(NET)
TOKEN = "K10" + "ab" * 32 + "::server:" + "cd" * 16


def test_ha_plan_has_one_clusterinit_then_ha_masters_then_workers():
    nodes = {p: "" for p in "abcdef"}
    plan = plan_roles(nodes, {}, ha=True, masters=3, minimum_nodes=4)
    assert sorted(plan.values()) == sorted([CLUSTER_INIT, MASTER_HA, MASTER_HA, WORKER, WORKER, WORKER])


def test_plan_waits_for_minimum_nodes_only_before_the_first_assignment():
    assert plan_roles({"a": "", "b": ""}, {}, ha=False, masters=1, minimum_nodes=3) == {}
    assert plan_roles({"c": ""}, {"a": MASTER, "b": WORKER}, ha=False, masters=1, minimum_nodes=3) == {"c": WORKER}


def test_plan_is_sticky_and_counts_masters_that_are_down():
    # "a" (clusterinit) and "b" (ha) are not alive: they still count, no second clusterinit.
    assigned = {"a": CLUSTER_INIT, "b": MASTER_HA}
    plan = plan_roles({"c": "", "d": "", "e": ""}, assigned, ha=True, masters=3, minimum_nodes=1)
    assert sorted(plan.values()) == [MASTER_HA, WORKER, WORKER]
    assert "a" not in plan and "b" not in plan
    # everything assigned: nothing to write
    assert plan_roles({"a": "", "b": ""}, assigned, ha=True, masters=3, minimum_nodes=1) == {}


def test_plan_respects_hints():
    plan = plan_roles({"a": "worker", "b": "", "z": "master"}, {}, ha=False, masters=1, minimum_nodes=3)
    assert plan == {"z": MASTER, "a": WORKER, "b": WORKER}
    # a worker hint never becomes a master even when masters are missing
    plan = plan_roles({"a": "worker", "b": "worker"}, {}, ha=True, masters=3, minimum_nodes=2)
    assert set(plan.values()) == {WORKER}


def _ledger(tmp_path, name):
    # values up to what any node accepts from a peer, so a test can publish oversized garbage
    return open_ledger(Identity.generate(), tmp_path / name, {"max_value_size": 1024 * 1024})


def _lease_holder(ledger):
    """A stand-in for NodeView.lease_holder on a bare ledger: the winning valid lease of an epoch
    (a node also wants the lease attested by its members; these ledgers have no members)."""

    def holder(epoch):
        leases = [
            parse_lease(NET, key, value, ledger.get_entry(LEADER_BUCKET, key).owner)
            for key, value in ledger.items(LEADER_BUCKET).items()
        ]
        return getattr(winner([lease for lease in leases if lease and lease.epoch == epoch]), "peer", None)

    return holder


def _state(ledger, **options):
    return ClusterState(ledger, NET, lease_holder=_lease_holder(ledger), **options)


def _hold_lease(ledger, epoch):
    ledger.set(
        "leader",
        lease_key(NET, epoch, ledger.peer_id),
        {"peer": ledger.peer_id, "epoch": epoch, "state": "held", "claimed": [1000 + epoch, 0]},
    )


def _sync(*ledgers):
    entries = [e for ledger in ledgers for e in ledger.entries()]
    for ledger in ledgers:
        ledger.apply_remote(entries)


def test_a_role_written_by_a_lower_epoch_loses(tmp_path):
    old, new, reader = (_ledger(tmp_path, n) for n in ("old", "new", "reader"))
    _hold_lease(old, 1)
    _hold_lease(new, 2)
    target = "12D3KooWTarget"
    _state(new).assign(target, MASTER_HA, 2, new.peer_id)
    _sync(old, new)
    # the deposed leader writes later (a newer version) but in its old epoch
    _state(old).assign(target, WORKER, 1, old.peer_id)
    _sync(old, new, reader)
    for ledger in (old, new, reader):
        record = _state(ledger).role_of(target)
        assert (record.role, record.epoch, record.leader) == (MASTER_HA, 2, new.peer_id)


def test_role_entries_without_a_lease_or_with_garbage_are_ignored(tmp_path):
    leader, intruder, reader = (_ledger(tmp_path, n) for n in ("leader", "intruder", "reader"))
    _hold_lease(leader, 1)
    _state(leader).assign("12D3KooWA", WORKER, 1, leader.peer_id)
    # a node that never held epoch 9 writes a "higher" role: not fenced in, so ignored
    _state(intruder).assign("12D3KooWA", CLUSTER_INIT, 9, intruder.peer_id)
    intruder.set(BUCKET, role_key(intruder.peer_id, "12D3KooWB", 1), "garbage")
    intruder.set(BUCKET, role_key(intruder.peer_id, "12D3KooWC", 1), {"role": "emperor", "epoch": 1, "leader": intruder.peer_id})
    # under the leader's key and in its name (these ledgers have no bucket policy: the reader checks)
    intruder.set(BUCKET, role_key(leader.peer_id, "12D3KooWD", 1), {"role": CLUSTER_INIT, "epoch": 1, "leader": leader.peer_id})
    intruder.set(NET, legacy_role_key("12D3KooWE", 1), {"role": CLUSTER_INIT, "epoch": 1, "leader": leader.peer_id})
    _sync(leader, intruder, reader)
    state = _state(reader)
    roles = state.roles()
    assert {peer: r.role for peer, r in roles.items()} == {"12D3KooWA": WORKER}
    assert state.ignored == 5


def test_only_the_winner_of_an_epoch_assigns_in_it(tmp_path):
    # Two nodes claimed epoch 1 at once, and the later claimant assigned roles before it heard of
    # the earlier claim: its lease is valid, but it never led epoch 1, so its roles do not count.
    early, late, reader = (_ledger(tmp_path, n) for n in ("early", "late", "reader"))
    _hold_lease(early, 1)
    late.set("leader", lease_key(NET, 1, late.peer_id), {"peer": late.peer_id, "epoch": 1, "state": "held", "claimed": [5000, 0]})
    _state(late).assign("12D3KooWA", CLUSTER_INIT, 1, late.peer_id)
    _state(late).assign("12D3KooWB", CLUSTER_INIT, 1, late.peer_id)
    _state(early).assign("12D3KooWA", WORKER, 1, early.peer_id)
    _sync(early, late, reader)
    for ledger in (early, late, reader):
        state = _state(ledger)
        assert {peer: (r.role, r.leader) for peer, r in state.roles().items()} == {"12D3KooWA": (WORKER, early.peer_id)}
        assert state.ignored == 2 and state.init_master() is None


def _cluster(tmp_path, *masters):
    """A leader holding epoch 1 that made the first of ``masters`` the init master, the others HA."""
    leader = _ledger(tmp_path, "leader")
    _hold_lease(leader, 1)
    state = _state(leader)
    for index, master in enumerate(masters):
        state.assign(master.peer_id, MASTER_HA if index else CLUSTER_INIT, 1, leader.peer_id)
    return leader


@pytest.mark.parametrize(
    "key, prop", [(MASTER_IP_KEY, "master_address"), (TOKEN_KEY, "node_token"), (KUBECONFIG_KEY, "kubeconfig")]
)
@pytest.mark.parametrize("garbage", [{"not": "a string"}, "", "x" * 300_000])
def test_garbage_join_data_of_the_init_master_reads_as_absent_and_is_counted(tmp_path, key, prop, garbage):
    init, reader = _ledger(tmp_path, "init"), _ledger(tmp_path, "reader")
    leader = _cluster(tmp_path, init)
    init.set(BUCKET, own_key(init.peer_id, key), garbage)
    _sync(leader, init, reader)
    state = _state(reader)
    assert getattr(state, prop) is None
    assert getattr(state, prop) is None
    assert state.rejected == {"invalid_value": 1}  # once per entry, however often it is read


@pytest.mark.parametrize("bad", ["$(touch /tmp/pwned)", "`id`", "K10ab::server:x y", "K10ab\n", "a;b", "K" * 257, "tok'en"])
def test_a_token_that_is_not_plain_is_refused_even_from_the_init_master(tmp_path, bad):
    init, ha, reader = _ledger(tmp_path, "init"), _ledger(tmp_path, "ha"), _ledger(tmp_path, "reader")
    leader = _cluster(tmp_path, init, ha)
    init.set(BUCKET, own_key(init.peer_id, TOKEN_KEY), bad)
    _sync(leader, init, ha, reader)
    state = _state(reader)
    assert state.node_token is None and state.rejected["invalid_value"] == 1
    ha.set(BUCKET, own_key(ha.peer_id, TOKEN_KEY), TOKEN)  # an HA master's token is the fallback
    _sync(ha, reader)
    assert state.node_token == TOKEN


def test_join_data_counts_only_from_the_masters_the_leader_named(tmp_path):
    init, ha, insider, reader = (_ledger(tmp_path, n) for n in ("init", "ha", "insider", "reader"))
    leader = _cluster(tmp_path, init, ha)
    forged = {MASTER_IP_KEY: "203.0.113.66", TOKEN_KEY: "K10" + "ee" * 32 + "::server:evil", KUBECONFIG_KEY: "clusters: []\n"}
    for key, value in forged.items():
        insider.set(BUCKET, own_key(insider.peer_id, key), value)
    _sync(leader, init, ha, insider, reader)
    state = _state(reader)
    assert state.masters() == [init.peer_id, ha.peer_id]
    assert (state.master_address, state.node_token, state.kubeconfig) == (None, None, None)
    assert state.rejected == {"untrusted_writer": 3}

    init.set(BUCKET, own_key(init.peer_id, MASTER_IP_KEY), "10.1.0.1")
    init.set(BUCKET, own_key(init.peer_id, TOKEN_KEY), TOKEN)
    ha.set(BUCKET, own_key(ha.peer_id, TOKEN_KEY), "K10" + "00" * 32 + "::server:ha")
    # a key in the init master's name but signed by the insider: the policy refuses it on real
    # nodes; these bare ledgers have none, and the reader still ignores it
    # (the insider first takes in init's write, so its clock puts its own after it even within
    # the same millisecond)
    insider.apply_remote([init.get_entry(BUCKET, own_key(init.peer_id, MASTER_IP_KEY))])
    insider.set(BUCKET, own_key(init.peer_id, MASTER_IP_KEY), "203.0.113.67")
    _sync(init, ha, reader)
    reader.apply_remote([insider.get_entry(BUCKET, own_key(init.peer_id, MASTER_IP_KEY))])
    assert reader.get(BUCKET, own_key(init.peer_id, MASTER_IP_KEY)) == "203.0.113.67"  # newer: it won the key
    assert state.master_address is None and state.rejected["forged_key"] == 1
    init.set(BUCKET, own_key(init.peer_id, MASTER_IP_KEY), "10.1.0.1")
    _sync(init, reader)
    assert (state.master_address, state.node_token) == ("10.1.0.1", TOKEN)  # the init master's, before the HA one's
    assert state.rejected == {"untrusted_writer": 3, "forged_key": 1}


def test_the_init_masters_join_data_arriving_before_its_role_is_not_called_untrusted(tmp_path):
    init, reader = _ledger(tmp_path, "init"), _ledger(tmp_path, "reader")
    init.set(BUCKET, own_key(init.peer_id, MASTER_IP_KEY), "10.1.0.1")
    _sync(init, reader)  # the join data first: the reader knows no master yet
    state = _state(reader)
    state.audit()
    assert state.master_address is None and state.rejected == {}
    leader = _cluster(tmp_path, init)
    _sync(leader, reader)
    state.audit()
    assert state.master_address == "10.1.0.1" and state.rejected == {}


def test_without_auto_the_fixed_master_is_the_init_master(tmp_path):
    master, insider, reader = (_ledger(tmp_path, n) for n in ("master", "insider", "reader"))
    _state(master).announce_candidate(master.peer_id, "m", MASTER)
    _state(insider).announce_candidate(insider.peer_id, "i", "")
    # a candidate entry in the master's name, signed by the insider, does not make it a master
    insider.set(BUCKET, candidate_key("12D3KooWForged"), {"hostname": "x", "hint": MASTER})
    master.set(BUCKET, own_key(master.peer_id, TOKEN_KEY), TOKEN)
    insider.set(BUCKET, own_key(insider.peer_id, TOKEN_KEY), "K10" + "ee" * 32 + "::server:evil")
    _sync(master, insider, reader)
    assert _state(reader, auto=False).node_token == TOKEN
    assert _state(reader, auto=False).candidates() == {master.peer_id: MASTER, insider.peer_id: ""}
    assert _state(reader, auto=True).node_token is None  # with auto, only the leader names masters


def test_roles_of_earlier_versions_still_count_and_their_join_keys_do_not(tmp_path):
    leader, init, reader = (_ledger(tmp_path, n) for n in ("leader", "init", "reader"))
    _hold_lease(leader, 1)
    # what an earlier version wrote, in the open bucket named after the network
    leader.set(NET, legacy_role_key(init.peer_id, 1), {"role": CLUSTER_INIT, "epoch": 1, "leader": leader.peer_id})
    leader.set(NET, legacy_role_key("12D3KooWW", 1), {"role": WORKER, "epoch": 1, "leader": leader.peer_id})
    init.set(NET, "ip-master", "10.1.0.1")
    init.set(NET, "token-nodetoken", TOKEN)
    init.set(NET, "master-kubeconfig", "apiVersion: v1\nclusters: []\n")
    _sync(leader, init, reader)
    state = _state(reader)
    assert {peer: r.role for peer, r in state.roles().items()} == {init.peer_id: CLUSTER_INIT, "12D3KooWW": WORKER}
    assert state.init_master() == init.peer_id
    assert (state.master_address, state.node_token, state.kubeconfig) == (None, None, None)
    # no new role is planned for nodes that have one: an upgrade reassigns nothing
    assert (
        plan_roles(
            {init.peer_id: "", "12D3KooWW": ""},
            {p: r.role for p, r in state.roles().items()},
            ha=True,
            masters=3,
            minimum_nodes=1,
        )
        == {}
    )
    assert sorted(_state(init).purge_legacy()) == sorted(["ip-master", "token-nodetoken", "master-kubeconfig"])
    _sync(init, reader)
    assert all(reader.get(NET, key) is None for key in ("ip-master", "token-nodetoken", "master-kubeconfig"))
    assert _state(init).purge_legacy() == []


def test_a_role_taken_back_reads_as_none_and_a_newer_assignment_wins_again(tmp_path):
    from kairos_plugin_k3s.roles import stale_roles

    leader, reader = _ledger(tmp_path, "leader"), _ledger(tmp_path, "reader")
    _hold_lease(leader, 1)
    gone, kept = "12D3KooWGone", "12D3KooWKept"
    state = _state(leader)
    state.assign(gone, WORKER, 1, leader.peer_id)
    state.assign(kept, CLUSTER_INIT, 1, leader.peer_id)
    assigned = {peer: record.role for peer, record in state.roles().items()}
    assert stale_roles(assigned, {kept, leader.peer_id}) == [gone]
    state.unassign(gone, 1, leader.peer_id)
    _sync(leader, reader)
    assert {peer: r.role for peer, r in _state(reader).roles().items()} == {kept: CLUSTER_INIT}
    # the node that had it is a newcomer again: it gets a role, a worker one (the cluster exists)
    assert plan_roles({gone: "", kept: ""}, {kept: CLUSTER_INIT}, ha=True, masters=3, minimum_nodes=1) == {gone: MASTER_HA}
    _hold_lease(leader, 2)
    state.assign(gone, WORKER, 2, leader.peer_id)
    assert state.role_of(gone).role == WORKER


def test_with_the_clusterinit_master_taken_back_its_ha_masters_carry_the_cluster():
    # dynamic roles took the clusterinit master's role: a newcomer joins the master/ha ones
    # instead of founding a second cluster
    plan = plan_roles({"new": ""}, {"ha1": MASTER_HA, "ha2": MASTER_HA}, ha=True, masters=3, minimum_nodes=1)
    assert plan == {"new": MASTER_HA}
