"""The cluster's shared state in the ledger, in the bucket named after ``p2p.network_id``.

Keys (Kairos's names where Kairos has them):

- ``<peer>-k3s`` — written by each node running the plugin: ``{"hostname", "hint"}``; who may get a role.
- ``<peer>-role-<epoch>`` — written by the leader of ``epoch``: ``{"role", "epoch", "leader"}``.
  One key per epoch, so a deposed leader's late write never overwrites the current leader's:
  readers take, per node, the valid entry of the highest epoch. An entry counts only when its
  writer holds a lease of that epoch in the ``leader`` bucket.
- ``<peer>-ip`` — the node's k3s address.
- ``ip-master`` — the address joining nodes dial (EIP, or the init master's VPN address).
- ``token-nodetoken`` — k3s's node token, from the init master.
- ``master-kubeconfig`` — the admin kubeconfig (YAML text), from the init master.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from kairos_core.election import LEADER_BUCKET, lease_key, parse_lease

from .roles import ROLES

log = logging.getLogger(__name__)

MASTER_IP_KEY = "ip-master"
TOKEN_KEY = "token-nodetoken"
KUBECONFIG_KEY = "master-kubeconfig"

_ROLE_KEY = re.compile(r"^(?P<peer>[^-\s]+)-role-(?P<epoch>\d{1,12})$")


def role_key(peer_id: str, epoch: int) -> str:
    """The key of ``peer_id``'s role as assigned in ``epoch``."""
    return f"{peer_id}-role-{epoch:012d}"


def candidate_key(peer_id: str) -> str:
    """The key a node writes to say it runs k3s."""
    return f"{peer_id}-k3s"


def address_key(peer_id: str) -> str:
    """The key of a node's k3s address."""
    return f"{peer_id}-ip"


@dataclass(frozen=True)
class RoleRecord:
    """A role as the leader of ``epoch`` assigned it."""

    peer: str
    role: str
    epoch: int
    leader: str


class ClusterState:
    """Reads and writes the cluster's keys in one node's ledger.

    :param ledger: the node's ledger (``get``, ``set``, ``items``, ``get_entry``).
    :param network_id: the bucket, and the namespace of leases in ``leader``.
    """

    def __init__(self, ledger: Any, network_id: str) -> None:
        self.ledger = ledger
        self.network_id = network_id
        self.bucket = network_id
        self.ignored = 0  # role entries dropped as invalid or unfenced

    # --- roles ---------------------------------------------------------------------------
    def roles(self) -> dict[str, RoleRecord]:
        """Every node's role: per node, the valid entry of the highest epoch."""
        best: dict[str, RoleRecord] = {}
        ignored = 0
        for key, value in self.ledger.items(self.bucket).items():
            match = _ROLE_KEY.match(key)
            if not match:
                continue
            record = self._valid_record(key, match["peer"], int(match["epoch"]), value)
            if record is None:
                ignored += 1
                continue
            current = best.get(record.peer)
            if current is None or record.epoch > current.epoch:
                best[record.peer] = record
        self.ignored = ignored
        return best

    def role_of(self, peer_id: str) -> RoleRecord | None:
        """``peer_id``'s role, or None before the leader assigned one."""
        return self.roles().get(peer_id)

    def assign(self, peer_id: str, role: str, epoch: int, leader: str) -> None:
        """Write an assignment stamped with the writer's epoch (the leader calls this)."""
        self.ledger.set(self.bucket, role_key(peer_id, epoch), {"role": role, "epoch": epoch, "leader": leader})

    def _valid_record(self, key: str, peer: str, epoch: int, value: Any) -> RoleRecord | None:
        if not isinstance(value, dict) or value.get("role") not in ROLES or value.get("epoch") != epoch:
            return None
        entry = self.ledger.get_entry(self.bucket, key)
        writer = entry.owner if entry is not None else ""
        if value.get("leader") != writer:
            return None
        # Fencing: only a node that claimed the lease of this epoch may assign in its name.
        lease_name = lease_key(self.network_id, epoch, writer)
        lease_entry = self.ledger.get_entry(LEADER_BUCKET, lease_name)
        if lease_entry is None or parse_lease(self.network_id, lease_name, self.ledger.get(LEADER_BUCKET, lease_name), lease_entry.owner) is None:
            return None
        return RoleRecord(peer, value["role"], epoch, writer)

    # --- candidates ----------------------------------------------------------------------
    def announce_candidate(self, peer_id: str, hostname: str, hint: str) -> None:
        """Say that this node runs k3s (rewritten only when it changes)."""
        self.put(candidate_key(peer_id), {"hostname": hostname, "hint": hint})

    def candidates(self) -> dict[str, str]:
        """Nodes that announced themselves → their role hint."""
        found = {}
        for key, value in self.ledger.items(self.bucket).items():
            if key.endswith("-k3s") and isinstance(value, dict):
                hint = value.get("hint", "")
                found[key[: -len("-k3s")]] = hint if hint in ("", "master", "worker") else ""
        return found

    # --- shared cluster facts ------------------------------------------------------------
    def text(self, key: str) -> str | None:
        """A string value, or None when absent or not a string (garbage is ignored)."""
        value = self.ledger.get(self.bucket, key)
        return value if isinstance(value, str) and value else None

    def put(self, key: str, value: Any) -> bool:
        """Write ``value`` unless the ledger already holds it; True when written."""
        if self.ledger.get(self.bucket, key) == value:
            return False
        self.ledger.set(self.bucket, key, value)
        return True

    @property
    def master_address(self) -> str | None:
        """``ip-master``."""
        return self.text(MASTER_IP_KEY)

    @property
    def node_token(self) -> str | None:
        """``token-nodetoken``."""
        return self.text(TOKEN_KEY)

    @property
    def kubeconfig(self) -> str | None:
        """``master-kubeconfig``."""
        return self.text(KUBECONFIG_KEY)
