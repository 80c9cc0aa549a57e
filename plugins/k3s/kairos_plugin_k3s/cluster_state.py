"""The cluster's shared state in the ledger: bucket ``<network_id>/k3s``, each key under its writer.

The bucket is owner-keyed (the plugin registers that policy through ``kairos_ledger_policies``):
a node writes keys ``<its peer id>/...`` only, so nobody can overwrite, or write in the name of,
another node. Whose entries *count* is the readers' decision, made here:

- ``<peer>/k3s`` — ``{"hostname", "hint"}``: the node runs the plugin and may get a role.
- ``<leader>/role/<peer>/<epoch>`` — ``{"role", "epoch", "leader"}``, written by the leader of
  ``epoch``. One key per epoch, so a deposed leader's late write never overwrites the current
  leader's: readers take, per node, the valid entry of the highest epoch (role ``none``: the
  leader took the role back, ``p2p.dynamic_roles``; the node has none). An entry counts only
  when its writer is the leader of that epoch (:meth:`NodeView.lease_holder`): one writer per
  epoch, even where two nodes claimed it at once and each briefly believed it led.
- ``<peer>/ip`` — the node's k3s address.
- ``<peer>/ip-master`` — the address joining nodes dial (EIP, or the init master's VPN address).
- ``<peer>/token-nodetoken`` — k3s's node token.
- ``<peer>/master-kubeconfig`` — the admin kubeconfig, only with ``k3s.share_kubeconfig: true``
  (otherwise ``kairos get-kubeconfig`` fetches it from a master over a stream).

**Join data** (the last three) counts only when its writer is the *init master* — the node a valid
assignment names ``master/clusterinit`` or ``master`` — or, when the init master has none, a node a
valid assignment names ``master/ha``. With ``auto.enable: false`` nobody assigns roles: the node
that announces the fixed hint ``master`` (the lowest peer id of those) is the init master. Entries
of anyone else are ignored and counted in :attr:`ClusterState.rejected`, and every value is checked
(:mod:`.validate`) before it is used. So a token holder that is not a master cannot point joiners at
its own server, or hand them a token, however it writes.

**Upgrade** from versions that kept everything in the open bucket ``<network_id>``: role entries
there (``<peer>-role-<epoch>``) are still read, fenced the same way (their signer must have led
the epoch), so an upgrade never reassigns a role. Nothing else there is read; a master deletes the old
join keys ``ip-master``, ``token-nodetoken`` and ``master-kubeconfig`` (:meth:`purge_legacy`).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from kairos_core.plugin import LedgerError

from .roles import HINTS, MASTER, MASTER_HA, ROLES, UNASSIGNED, starts_cluster
from .validate import clean_host, clean_token

log = logging.getLogger(__name__)

CANDIDATE = "k3s"
ADDRESS = "ip"
MASTER_IP_KEY = "ip-master"
TOKEN_KEY = "token-nodetoken"
KUBECONFIG_KEY = "master-kubeconfig"
JOIN_KEYS = (MASTER_IP_KEY, TOKEN_KEY, KUBECONFIG_KEY)
# A k3s admin kubeconfig is a few KiB; anything near this is not one.
MAX_KUBECONFIG_BYTES = 256 * 1024
# Rejected entries are logged and counted once each; forget them past this many (a flood of forged
# entries must not grow memory without bound — at worst one is reported again).
_REPORTED_LIMIT = 4096

_ROLE_KEY = re.compile(r"(?P<leader>[^/\s]+)/role/(?P<peer>[^/\s]+)/(?P<epoch>\d{1,12})")
_LEGACY_ROLE_KEY = re.compile(r"(?P<peer>[^-\s]+)-role-(?P<epoch>\d{1,12})")


def cluster_bucket(network_id: str) -> str:
    """The bucket of one network's k3s cluster (owner-keyed)."""
    return f"{network_id}/k3s"


def own_key(peer_id: str, name: str) -> str:
    """The key ``name`` of ``peer_id``: only ``peer_id`` may write it."""
    return f"{peer_id}/{name}"


def role_key(leader: str, peer_id: str, epoch: int) -> str:
    """The key of ``peer_id``'s role as ``leader`` assigned it in ``epoch``."""
    return f"{leader}/role/{peer_id}/{epoch:012d}"


def legacy_role_key(peer_id: str, epoch: int) -> str:
    """Where earlier versions wrote a role, in the open bucket ``<network_id>``."""
    return f"{peer_id}-role-{epoch:012d}"


def candidate_key(peer_id: str) -> str:
    """The key a node writes to say it runs k3s."""
    return own_key(peer_id, CANDIDATE)


def address_key(peer_id: str) -> str:
    """The key of a node's k3s address."""
    return own_key(peer_id, ADDRESS)


def clean_kubeconfig(value: Any) -> str | None:
    """``value`` when it may be a kubeconfig (text of bounded size), else None; YAML is checked on use."""
    if isinstance(value, str) and value.strip() and len(value.encode(errors="replace")) <= MAX_KUBECONFIG_BYTES:
        return value
    return None


@dataclass(frozen=True)
class RoleRecord:
    """A role as the leader of ``epoch`` assigned it."""

    peer: str
    role: str
    epoch: int
    leader: str


class ClusterState:
    """Reads and writes the cluster's keys in one node's ledger.

    :param ledger: the node's ledger (``get``, ``set``, ``delete``, ``items``, ``get_entry``).
    :param network_id: names the bucket (and the open bucket of earlier versions).
    :param lease_holder: ``lease_holder(epoch)``, the leader of ``epoch`` or None: the node's
        :meth:`~kairos_core.plugin.NodeView.lease_holder`. A role entry counts only when its
        writer is the holder of its epoch.
    :param auto: whether the leader assigns roles (``auto.enable``); without it, a node announcing
        the fixed hint ``master`` is the init master.
    """

    def __init__(self, ledger: Any, network_id: str, *, lease_holder: Callable[[int], str | None], auto: bool = True) -> None:
        self.ledger = ledger
        self.network_id = network_id
        self.lease_holder = lease_holder
        self.bucket = cluster_bucket(network_id)
        self.legacy_bucket = network_id
        self.auto = auto
        self.ignored = 0  # role entries dropped as invalid or unfenced, in the last read
        #: entries ignored, once each, by reason: ``untrusted_writer`` (join data from a node that is
        #: not a master), ``invalid_value`` (a master's value of the wrong form), ``forged_key`` (a
        #: key naming another node than its signer: only where the bucket's policy is missing)
        self.rejected: Counter[str] = Counter()
        self._reported: set[tuple[str, str, tuple[int, ...]]] = set()

    # --- roles ---------------------------------------------------------------------------
    def roles(self) -> dict[str, RoleRecord]:
        """Every node's role: per node, the valid entry of the highest epoch."""
        best: dict[str, RoleRecord] = {}
        ignored = 0
        holders: dict[int, str | None] = {}  # one look-up per epoch and read, not one per entry
        for bucket, pattern in ((self.bucket, _ROLE_KEY), (self.legacy_bucket, _LEGACY_ROLE_KEY)):
            for key, value in self.ledger.items(bucket).items():
                match = pattern.fullmatch(key)
                if not match:
                    continue
                entry = self.ledger.get_entry(bucket, key)
                writer = entry.owner if entry is not None else ""
                if pattern is _ROLE_KEY and match["leader"] != writer:
                    ignored += 1
                    continue
                record = self._valid_record(match["peer"], int(match["epoch"]), value, writer, holders)
                if record is None:
                    ignored += 1
                    continue
                current = best.get(record.peer)
                # Highest epoch wins; within one epoch the lowest leader id, so that every node
                # picks the same record whatever order the entries arrived in.
                if (
                    current is None
                    or record.epoch > current.epoch
                    or (record.epoch == current.epoch and record.leader < current.leader)
                ):
                    best[record.peer] = record
        self.ignored = ignored
        return {peer: record for peer, record in best.items() if record.role != UNASSIGNED}

    def role_of(self, peer_id: str) -> RoleRecord | None:
        """``peer_id``'s role, or None before the leader assigned one."""
        return self.roles().get(peer_id)

    def assign(self, peer_id: str, role: str, epoch: int, leader: str) -> None:
        """Write an assignment stamped with the writer's epoch (the leader calls this)."""
        self.ledger.set(self.bucket, role_key(leader, peer_id, epoch), {"role": role, "epoch": epoch, "leader": leader})

    def unassign(self, peer_id: str, epoch: int, leader: str) -> None:
        """Take ``peer_id``'s role back from ``epoch`` on (dynamic roles; the leader calls this)."""
        self.assign(peer_id, UNASSIGNED, epoch, leader)

    def _valid_record(self, peer: str, epoch: int, value: Any, writer: str, holders: dict[int, str | None]) -> RoleRecord | None:
        if not isinstance(value, dict) or value.get("role") not in (*ROLES, UNASSIGNED) or value.get("epoch") != epoch:
            return None
        if not writer or value.get("leader") != writer:
            return None
        # Fencing: only the leader of this epoch may assign in its name. A mere valid lease of the
        # epoch is not enough: of two nodes that claimed it at once, the loser may have assigned
        # roles before it heard of the winner, and the epoch would have two leaders.
        if epoch not in holders:
            holders[epoch] = self.lease_holder(epoch)
        if holders[epoch] != writer:
            return None
        return RoleRecord(peer, value["role"], epoch, writer)

    # --- who may publish join data -------------------------------------------------------
    def init_master(self, roles: dict[str, RoleRecord] | None = None) -> str | None:
        """The node that created the cluster: the earliest valid ``master/clusterinit`` (or ``master``)
        assignment; without ``auto``, the node announcing the fixed hint ``master``."""
        roles = self.roles() if roles is None else roles
        origins = sorted((r for r in roles.values() if starts_cluster(r.role)), key=lambda r: (r.epoch, r.peer))
        if origins:
            return origins[0].peer
        if not self.auto:
            fixed = sorted(peer for peer, hint in self.candidates().items() if hint == MASTER)
            return fixed[0] if fixed else None
        return None

    def masters(self) -> list[str]:
        """The nodes whose join data counts, preferred first: the init master, then ``master/ha`` nodes."""
        roles = self.roles()
        init = self.init_master(roles)
        ha = sorted(peer for peer, record in roles.items() if record.role == MASTER_HA and peer != init)
        return ([init] if init else []) + ha

    # --- candidates ----------------------------------------------------------------------
    def announce_candidate(self, peer_id: str, hostname: str, hint: str) -> None:
        """Say that this node runs k3s (rewritten only when it changes)."""
        self.put(candidate_key(peer_id), {"hostname": hostname, "hint": hint})

    def candidates(self) -> dict[str, str]:
        """Nodes that announced themselves → their role hint."""
        found = {}
        for peer, value in self._owned(CANDIDATE).items():
            if isinstance(value, dict):
                hint = value.get("hint", "")
                found[peer] = hint if hint in HINTS else ""
        return found

    # --- join data -----------------------------------------------------------------------
    @property
    def master_address(self) -> str | None:
        """The address joiners dial (``ip-master``), as a trusted master published it."""
        return self._join_value(MASTER_IP_KEY, clean_host, "an IP address or host name")

    @property
    def node_token(self) -> str | None:
        """The node token (``token-nodetoken``), as a trusted master published it."""
        return self._join_value(TOKEN_KEY, clean_token, "a k3s token")

    @property
    def kubeconfig(self) -> str | None:
        """The admin kubeconfig a master shared (``k3s.share_kubeconfig``), or None."""
        return self._join_value(KUBECONFIG_KEY, clean_kubeconfig, "a kubeconfig")

    def audit(self) -> None:
        """Count (and log, once each) the join data of every node that is not a master, read or not."""
        masters = self.masters()
        for name in JOIN_KEYS:
            self._judge_writers(name, self._owned(name), masters)

    def _join_value(self, name: str, clean: Callable[[Any], str | None], form: str) -> str | None:
        masters = self.masters()
        published = self._owned(name)
        chosen = None
        for peer in masters:
            if chosen is None and peer in published:
                chosen = clean(published[peer])
                if chosen is None:
                    self._reject("invalid_value", own_key(peer, name), f"not {form}")
        self._judge_writers(name, published, masters)
        return chosen

    def _judge_writers(self, name: str, published: dict[str, Any], masters: list[str]) -> None:
        """Count (and log, once each) the nodes that published ``name`` and are not masters."""
        if not masters:
            # No master known yet: the init master's own join data often arrives ahead of its
            # role, and judging it now would log the real master as an untrusted writer.
            return
        for peer in published:
            if peer not in masters:
                self._reject("untrusted_writer", own_key(peer, name), f"{peer} is not a master of this cluster")

    # --- this node's own keys ------------------------------------------------------------
    def own(self, peer_id: str, name: str) -> Any:
        """The value of ``peer_id``'s key ``name`` (None when absent)."""
        return self.ledger.get(self.bucket, own_key(peer_id, name))

    def put(self, key: str, value: Any) -> bool:
        """Write ``value`` unless the ledger already holds it; True when written."""
        if self.ledger.get(self.bucket, key) == value:
            return False
        self.ledger.set(self.bucket, key, value)
        return True

    def remove(self, key: str) -> bool:
        """Delete ``key`` if it holds a value; True when deleted."""
        if self.ledger.get(self.bucket, key) is None:
            return False
        self.ledger.delete(self.bucket, key)
        return True

    def purge_legacy(self) -> list[str]:
        """Delete the join keys earlier versions kept in the open bucket; returns those deleted.

        They are never read any more, but every node kept a copy — of the node token and the
        admin kubeconfig among them — until deleted.
        """
        gone = []
        for key in JOIN_KEYS:
            if self.ledger.get(self.legacy_bucket, key) is None:
                continue
            try:
                self.ledger.delete(self.legacy_bucket, key)
            except LedgerError as exc:  # a network_id naming a core bucket: nothing of ours there
                log.debug("cannot delete legacy %s/%s: %s", self.legacy_bucket, key, exc)
                continue
            gone.append(key)
        return gone

    # --- helpers -------------------------------------------------------------------------
    def _owned(self, name: str) -> dict[str, Any]:
        """Peer → value of every live ``<peer>/<name>`` entry that ``peer`` itself signed."""
        found: dict[str, Any] = {}
        suffix = "/" + name
        for key, value in self.ledger.items(self.bucket).items():
            peer = key[: -len(suffix)] if key.endswith(suffix) else ""
            if not peer or "/" in peer:
                continue
            entry = self.ledger.get_entry(self.bucket, key)
            if entry is None or entry.owner != peer:
                # Only where the bucket's policy is missing (a plugin that failed to load, say):
                # the key alone never vouches for its writer.
                self._reject("forged_key", key, f"signed by {entry.owner if entry else '?'}, not by the node it names")
                continue
            found[peer] = value
        return found

    def _reject(self, reason: str, key: str, detail: str) -> None:
        entry = self.ledger.get_entry(self.bucket, key)
        mark = (reason, key, tuple(entry.version) if entry is not None else ())
        if mark in self._reported:
            return
        if len(self._reported) >= _REPORTED_LIMIT:
            self._reported.clear()
        self._reported.add(mark)
        self.rejected[reason] += 1
        log.warning("k3s: ignoring %s/%s: %s", self.bucket, key, detail)
