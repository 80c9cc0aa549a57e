"""Role planning (pure) and the epoch fencing of role entries in real ledgers."""

from __future__ import annotations

import pytest

from kairos_core.election import lease_key
from kairos_core.identity import Identity
from kairos_core.ledger.ledger import open_ledger
from kairos_plugin_k3s.cluster_state import ClusterState, role_key
from kairos_plugin_k3s.roles import CLUSTER_INIT, MASTER, MASTER_HA, WORKER, plan_roles

NET = "kairos"


def test_ha_plan_has_one_clusterinit_then_ha_masters_then_workers():
    nodes = {p: "" for p in "abcdef"}
    plan = plan_roles(nodes, {}, ha=True, master_nodes=3, minimum_nodes=4)
    assert sorted(plan.values()) == sorted([CLUSTER_INIT, MASTER_HA, MASTER_HA, WORKER, WORKER, WORKER])


def test_plan_waits_for_minimum_nodes_only_before_the_first_assignment():
    assert plan_roles({"a": "", "b": ""}, {}, ha=False, master_nodes=1, minimum_nodes=3) == {}
    assert plan_roles({"c": ""}, {"a": MASTER, "b": WORKER}, ha=False, master_nodes=1, minimum_nodes=3) == {"c": WORKER}


def test_plan_is_sticky_and_counts_masters_that_are_down():
    # "a" (clusterinit) and "b" (ha) are not alive: they still count, no second clusterinit.
    assigned = {"a": CLUSTER_INIT, "b": MASTER_HA}
    plan = plan_roles({"c": "", "d": "", "e": ""}, assigned, ha=True, master_nodes=3, minimum_nodes=1)
    assert sorted(plan.values()) == [MASTER_HA, WORKER, WORKER]
    assert "a" not in plan and "b" not in plan
    # everything assigned: nothing to write
    assert plan_roles({"a": "", "b": ""}, assigned, ha=True, master_nodes=3, minimum_nodes=1) == {}


def test_plan_respects_hints():
    plan = plan_roles({"a": "worker", "b": "", "z": "master"}, {}, ha=False, master_nodes=1, minimum_nodes=3)
    assert plan == {"z": MASTER, "a": WORKER, "b": WORKER}
    # a worker hint never becomes a master even when masters are missing
    plan = plan_roles({"a": "worker", "b": "worker"}, {}, ha=True, master_nodes=3, minimum_nodes=2)
    assert set(plan.values()) == {WORKER}


def _ledger(tmp_path, name):
    return open_ledger(Identity.generate(), tmp_path / name)


def _hold_lease(ledger, epoch):
    ledger.set("leader", lease_key(NET, epoch, ledger.peer_id),
               {"peer": ledger.peer_id, "epoch": epoch, "state": "held", "claimed": [1000 + epoch, 0]})


def _sync(*ledgers):
    entries = [e for ledger in ledgers for e in ledger.entries()]
    for ledger in ledgers:
        ledger.apply_remote(entries)


def test_a_role_written_by_a_lower_epoch_loses(tmp_path):
    old, new, reader = (_ledger(tmp_path, n) for n in ("old", "new", "reader"))
    _hold_lease(old, 1)
    _hold_lease(new, 2)
    target = "12D3KooWTarget"
    ClusterState(new, NET).assign(target, MASTER_HA, 2, new.peer_id)
    _sync(old, new)
    # the deposed leader writes later (a newer version) but in its old epoch
    ClusterState(old, NET).assign(target, WORKER, 1, old.peer_id)
    _sync(old, new, reader)
    for ledger in (old, new, reader):
        record = ClusterState(ledger, NET).role_of(target)
        assert (record.role, record.epoch, record.leader) == (MASTER_HA, 2, new.peer_id)


def test_role_entries_without_a_lease_or_with_garbage_are_ignored(tmp_path):
    leader, intruder, reader = (_ledger(tmp_path, n) for n in ("leader", "intruder", "reader"))
    _hold_lease(leader, 1)
    ClusterState(leader, NET).assign("12D3KooWA", WORKER, 1, leader.peer_id)
    # a node that never held epoch 9 writes a "higher" role: not fenced in, so ignored
    ClusterState(intruder, NET).assign("12D3KooWA", CLUSTER_INIT, 9, intruder.peer_id)
    intruder.set(NET, role_key("12D3KooWB", 1), "garbage")
    intruder.set(NET, role_key("12D3KooWC", 1), {"role": "emperor", "epoch": 1, "leader": intruder.peer_id})
    _sync(leader, intruder, reader)
    state = ClusterState(reader, NET)
    roles = state.roles()
    assert {peer: r.role for peer, r in roles.items()} == {"12D3KooWA": WORKER}
    assert state.ignored == 3


@pytest.mark.parametrize("key", ["ip-master", "token-nodetoken", "master-kubeconfig"])
def test_garbage_cluster_facts_read_as_absent(tmp_path, key):
    ledger = _ledger(tmp_path, "l")
    ledger.set(NET, key, {"not": "a string"})
    state = ClusterState(ledger, NET)
    assert state.text(key) is None
