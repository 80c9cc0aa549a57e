"""Roles of a k3s cluster and how the leader hands them out.

Pure functions: no ledger, no node. :mod:`.cluster_state` reads and writes what they decide.

- ``master``: a single server on its own datastore (no HA).
- ``master/clusterinit``: the server that starts embedded etcd (``--cluster-init``); one per cluster.
- ``master/ha``: a server that joins the clusterinit one.
- ``worker``: an agent.

Roles are sticky: :func:`plan_roles` only ever adds assignments for nodes that have none, so a
node that restarts, or a new leader, never changes a role that exists. The one exception is
opt-in (``p2p.dynamic_roles``): :func:`stale_roles` names the nodes whose role the leader takes
back because they are no longer members.
"""

from __future__ import annotations

from collections.abc import Mapping

MASTER = "master"
CLUSTER_INIT = "master/clusterinit"
MASTER_HA = "master/ha"
WORKER = "worker"
ROLES = (MASTER, CLUSTER_INIT, MASTER_HA, WORKER)
#: What the leader writes to take a role back (dynamic roles): the node has none from that epoch on.
UNASSIGNED = "none"

# What a node may ask for through p2p.role: "" lets the leader decide.
HINTS = ("", MASTER, WORKER)


def is_server(role: str | None) -> bool:
    """Whether the role runs ``k3s server``."""
    return role in (MASTER, CLUSTER_INIT, MASTER_HA)


def starts_cluster(role: str | None) -> bool:
    """Whether the role creates the cluster (and so publishes its token and kubeconfig)."""
    return role in (MASTER, CLUSTER_INIT)


def joins_cluster(role: str | None) -> bool:
    """Whether the role needs the server address and the node token of an existing cluster."""
    return role in (MASTER_HA, WORKER)


def plan_roles(
    candidates: Mapping[str, str],
    assigned: Mapping[str, str],
    *,
    ha: bool,
    masters: int,
    minimum_nodes: int,
) -> dict[str, str]:
    """The new assignments the leader should write.

    :param candidates: alive nodes that run the k3s plugin → their hint (``""``, ``master``,
        ``worker``), the leader itself included.
    :param assigned: every node that already has a role → that role, alive or not (a master
        that is down still counts, so a return does not make a second one).
    :param ha: one ``master/clusterinit`` then ``master/ha`` up to ``masters``; otherwise one
        ``master``.
    :param masters: masters in total with HA (Kairos's ``master_nodes`` + 1).
    :param minimum_nodes: before the first assignment ever, wait for this many candidates.
    :return: node → role for nodes that have none yet; empty when there is nothing to do.
    """
    if not assigned and len(candidates) < minimum_nodes:
        return {}
    masters_wanted = masters
    masters = sum(1 for role in assigned.values() if is_server(role))
    # A cluster exists while any server does: after dynamic roles took the clusterinit master's
    # back, the master/ha ones carry it on, and a newcomer must join them, not found another.
    has_origin = any(starts_cluster(role) or role == MASTER_HA for role in assigned.values())
    # Nodes that asked to be masters are served first; then a stable order, the same on any leader.
    waiting = sorted((p for p in candidates if p not in assigned), key=lambda p: (candidates[p] != MASTER, p))
    plan: dict[str, str] = {}
    for peer in waiting:
        hint = candidates[peer]
        if hint == WORKER:
            plan[peer] = WORKER
        elif not has_origin:
            plan[peer] = CLUSTER_INIT if ha else MASTER
            has_origin = True
            masters += 1
        elif ha and (masters < masters_wanted or hint == MASTER):
            plan[peer] = MASTER_HA
            masters += 1
        elif hint == MASTER:
            continue  # a second single master cannot join a non-HA cluster: leave it waiting
        else:
            plan[peer] = WORKER
    return plan


def stale_roles(assigned: Mapping[str, str], alive: set[str] | frozenset[str]) -> list[str]:
    """Nodes that hold a role but are not alive members: what dynamic roles take back, in order."""
    return sorted(peer for peer in assigned if peer not in alive)
