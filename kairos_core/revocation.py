"""Revoking a peer: the leader's record in the ledger, and what every node does about it.

``kairos peer revoke PEER_ID`` (on the leader) writes one record to the core bucket ``revoked``::

    revoked/<peer id>:<leader's peer id> = {"peer": <peer id>, "by": <leader>, "epoch": E,
                                            "at": <unix seconds>, "reason": "…"}

The bucket's write policy (:class:`~kairos_core.ledger.policy.RevocationPolicy`) keeps the
record in its writer's name and refuses tombstones, so no token holder can write one for someone
else or undo one. Any token holder may still write a record under its *own* name; a record counts
only when its writer is the attested leader of the epoch it names (``node.lease_holder(epoch)``,
the same answer k3s fences by), so an insider's records change nothing — and only while that epoch
is the current one: a node that once led keeps its signing key, and a record it writes later in the
name of its old epoch must not count. So:

- a record counts when its epoch is the highest this node knows, or the one before it and the
  record arrived within :data:`CARRY_WINDOW` seconds of this node seeing the leadership change (a
  record still in flight then; a node that starts gets no such window);
- the leader *carries forward* every revocation in force here: it writes its own copy, under its
  current epoch (``carried_from`` names the first writer), so a node that was offline across
  leader changes, or restarts, finds a copy of the current epoch;
- a record in force stays in force on this node (only the counting of new ones is epoch-bound).

A record that counts is final on this node: the revoked peer is

- refused at admission, both ways, and its connections closed at once (the gate);
- no longer a member, a voter or a candidate (membership), so its leases lose credibility;
- refused as the owner of any ledger write from then on, whoever relays it (the policy registry).

What it cannot do: a revoked node still holds the network token, so it can still open what is
sealed with it (recorded gossip, a ledger copy) until the token is rotated; see docs/security.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .election import MAX_EPOCH  # epochs are bounded wherever they are parsed
from .errors import KairosError
from .identity import public_key_from_peer_id

log = logging.getLogger(__name__)

REVOKED_BUCKET = "revoked"
# A reason is for the operator's eyes; longer text is cut, not refused.
MAX_REASON = 200
# Seconds after this node first sees a new epoch during which a record of the epoch before it
# still counts: records in flight when the leadership changed (normally they arrive within a
# second; a record cut off by a partition longer than this is lost and must be written again).
CARRY_WINDOW = 30.0


@dataclass(frozen=True)
class Revocation:
    """One record of the ``revoked`` bucket."""

    peer: str
    by: str
    epoch: int
    at: float
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape the API and ``kairos peer revoked`` show."""
        return {"peer": self.peer, "by": self.by, "epoch": self.epoch, "at": self.at, "reason": self.reason}


def is_peer_id(text: Any) -> bool:
    """Whether ``text`` is an ed25519 peer id (the only kind a kairos node has)."""
    if not isinstance(text, str):
        return False
    try:
        public_key_from_peer_id(text)
    except ValueError:
        return False
    return True


def revocation_key(peer: str, by: str) -> str:
    """The key of ``by``'s record revoking ``peer``."""
    return f"{peer}:{by}"


def parse_revocation(key: str, value: Any, owner: str) -> Revocation | None:
    """The record under ``key`` written by ``owner``, or None when it is malformed."""
    if not isinstance(value, dict) or not key.endswith(":" + owner):
        return None
    peer = key[: -len(owner) - 1]
    epoch, at, reason = value.get("epoch"), value.get("at", 0), value.get("reason", "")
    if value.get("peer") != peer or value.get("by") != owner or not is_peer_id(peer):
        return None
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= MAX_EPOCH:
        return None
    if isinstance(at, bool) or not isinstance(at, (int, float)) or at != at:  # NaN
        at = 0
    return Revocation(peer, owner, epoch, float(at), reason[:MAX_REASON] if isinstance(reason, str) else "")


class Revocations:
    """The revocations that count on this node, kept up to date from the ledger.

    :param self_id: this node (it never refuses itself; it logs that it was revoked).
    :param ledger: the node's ledger (its ``revoked`` bucket).
    :param lease_holder: ``epoch -> peer id | None``: the attested leader of an epoch.
    :param on_revoked: called with the set of peers newly revoked (never with this node).
    :param current_epoch: ``() -> epoch | None``: the highest epoch this node knows (held or lapsed).
    :param is_leader: ``() -> bool``: whether this node leads now (it then carries records forward).
    """

    def __init__(
        self,
        self_id: str,
        ledger: Any,
        lease_holder: Callable[[int], str | None],
        on_revoked: Callable[[frozenset[str]], None],
        *,
        current_epoch: Callable[[], int | None] = lambda: None,
        is_leader: Callable[[], bool] = lambda: False,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.self_id = self_id
        self.ledger = ledger
        self.lease_holder = lease_holder
        self.on_revoked = on_revoked
        self.current_epoch = current_epoch
        self.is_leader = is_leader
        self.monotonic = monotonic
        self._epoch: int | None = None
        self._epoch_since = float("-inf")
        # record (peer, writer, epoch) -> when this node first held it: whether it arrived in time
        self._first_held: dict[tuple[str, str, int], float] = {}
        self._in_force: dict[str, Revocation] = {}  # peer -> the record that revoked it
        self._self_revoked_logged = False
        #: records of the current or the last epoch's leader that do not count (yet)
        self.not_credible = 0

    @property
    def revoked(self) -> frozenset[str]:
        """Peers revoked on this node."""
        return frozenset(self._in_force)

    def is_revoked(self, peer: str) -> bool:
        """Whether ``peer`` is revoked here."""
        return peer in self._in_force

    def records(self, writers: tuple[str, ...] | None = None) -> list[Revocation]:
        """Every well-formed record held, credible or not (only those of ``writers`` if given,
        picked by key before anything is parsed)."""
        suffixes = None if writers is None else tuple(":" + writer for writer in writers)
        found = []
        for key in list(self.ledger.items(REVOKED_BUCKET)):
            if suffixes is not None and not key.endswith(suffixes):
                continue
            entry = self.ledger.get_entry(REVOKED_BUCKET, key)
            if entry is not None and not entry.deleted:
                record = parse_revocation(entry.key, entry.value, entry.owner)
                if record is not None:
                    found.append(record)
        return found

    def _candidates(self) -> list[Revocation]:
        """The records that could count now: those written by the leader of the current epoch or
        of the one before. Any token holder may write records under its own name, by the
        thousand; this runs every second, so the others are passed over by their key alone,
        unparsed (parsing one costs ~0.1 ms)."""
        if self._epoch is None:
            return self.records()
        holders = {self.lease_holder(epoch) for epoch in (self._epoch, self._epoch - 1) if epoch >= 0}
        writers = tuple(holder for holder in holders if holder)
        return self.records(writers) if writers else []

    def in_force(self) -> list[Revocation]:
        """The records that revoked a peer here, oldest first."""
        return sorted(self._in_force.values(), key=lambda r: (r.epoch, r.at, r.peer))

    def credible(self, record: Revocation) -> bool:
        """Whether ``record``'s writer led the epoch it names, and that epoch is current (or was,
        a moment ago: see the module docstring)."""
        if self.lease_holder(record.epoch) != record.by:
            return False
        current = self._epoch
        if current is None or record.epoch >= current:
            # no epoch known yet (a node starting from disk: its own records, carried forward, are
            # of the last epoch it knew) or the record is of the newest one
            return current is None or record.epoch == current
        if record.epoch == current - 1:
            first = self._first_held.setdefault((record.peer, record.by, record.epoch), self.monotonic())
            return first - self._epoch_since <= CARRY_WINDOW
        return False

    def _follow_epoch(self) -> None:
        epoch = self.current_epoch()
        if epoch is not None and epoch != self._epoch:
            # the window is for leader changes this node saw happen; the first epoch it learns (at
            # start) gets none: what the epoch before held reaches it as the leader's carried copies
            witnessed = self._epoch is not None
            self._epoch, self._epoch_since = epoch, (self.monotonic() if witnessed else float("-inf"))
            # a record first held before this epoch began arrived in time: keep its stamp below
            # the epoch's start, drop the stamps of older epochs
            self._first_held = {key: at for key, at in self._first_held.items() if key[2] >= epoch - 1}

    def _carry_forward(self) -> None:
        """On the leader: a copy of every revocation in force, under this node's current epoch."""
        if self._epoch is None or not self.is_leader() or self.lease_holder(self._epoch) != self.self_id:
            return
        for peer, record in list(self._in_force.items()):
            if record.by == self.self_id and record.epoch == self._epoch:
                continue
            held = self.ledger.get(REVOKED_BUCKET, revocation_key(peer, self.self_id))
            if isinstance(held, dict) and held.get("epoch") == self._epoch:
                continue
            value = {
                "peer": peer,
                "by": self.self_id,
                "epoch": self._epoch,
                "at": record.at,
                "reason": record.reason,
                "carried_from": record.by,
            }
            self.ledger.set(REVOKED_BUCKET, revocation_key(peer, self.self_id), value)

    def refresh(self) -> frozenset[str]:
        """Put newly credible records in force; returns the peers that are newly revoked.

        A revocation in force stays in force (this node's view of who led an old epoch may fade
        as members leave; the revocation must not).
        """
        self._follow_epoch()
        new: dict[str, Revocation] = {}
        not_credible = 0
        for record in self._candidates():
            if record.peer in self._in_force or record.peer in new:
                continue
            if not self.credible(record):
                not_credible += 1
                continue
            if record.peer == self.self_id:
                if not self._self_revoked_logged:
                    self._self_revoked_logged = True
                    log.error("this node was revoked by the leader %s (epoch %d): the others refuse it", record.by, record.epoch)
                continue
            new[record.peer] = record
        self.not_credible = not_credible
        if not new:
            self._carry_forward()
            return frozenset()
        self._in_force.update(new)
        self._carry_forward()
        for record in new.values():
            log.warning(
                "peer %s revoked by the leader %s (epoch %d)%s",
                record.peer,
                record.by,
                record.epoch,
                f": {record.reason}" if record.reason else "",
            )
        peers = frozenset(new)
        self.on_revoked(peers)
        return peers

    def revoke(self, peer: str, *, leader: tuple[str, int] | None, reason: str = "") -> tuple[Revocation, bool]:
        """Write this node's record revoking ``peer`` (only the leader may); ``(record, written)``.

        Idempotent: a peer already revoked returns the record in force and writes nothing.
        Raises :class:`KairosError` with a message for the operator when it cannot.
        """
        if not is_peer_id(peer):
            raise KairosError(f"not a peer id: {peer[:80]!r}")
        if peer == self.self_id:
            raise KairosError("a node cannot revoke itself (hand over leadership first)")
        existing = self._in_force.get(peer)
        if existing is not None:
            return existing, False
        if leader is None:
            raise KairosError("no leader yet: only the leader may revoke a peer; try again once one is elected")
        holder, epoch = leader
        if holder != self.self_id:
            raise KairosError(f"only the leader may revoke a peer: the leader is {holder} (epoch {epoch}); run this there")
        value = {"peer": peer, "by": self.self_id, "epoch": epoch, "at": round(time.time(), 3), "reason": reason[:MAX_REASON]}
        self.ledger.set(REVOKED_BUCKET, revocation_key(peer, self.self_id), value)
        self.refresh()
        record = self._in_force.get(peer)
        if record is None:  # our own lease record lags the election's view: count ours at once
            record = parse_revocation(revocation_key(peer, self.self_id), value, self.self_id)
            self._in_force[peer] = record
            self.on_revoked(frozenset({peer}))
        return record, True
