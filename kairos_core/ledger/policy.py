"""Who may write which key: per-bucket write policies.

Every write, local or remote, is checked against its bucket's policy before it can be merged. The
policy sees the incoming entry, the entry it would replace, and the current unix time.

- :class:`OpenPolicy` — anyone may write any key (user buckets).
- :class:`OwnerKeyedPolicy` — the key is the writer's peer id, or starts with ``"<peer_id>/"``
  (``nodes``, ``vpn``: each node publishes about itself only).
- :class:`FirstWriterPolicy` — a key belongs to whoever holds it; another peer may take it over
  only once the holder's value carries an ``expires`` (unix seconds) in the past, or the holder
  deleted it.
- :class:`LeasePolicy` — a lease value must name its writer (``value["peer"] == owner``); racing
  claims are settled by the ordinary merge (the greater version wins everywhere). The default
  for ``leader``.

Why ``leader`` is not first-writer: a first-writer check depends on what the node holds when a
write arrives. Two peers that claim a lapsed lease at the same moment each hold their own claim
and refuse the other's, and so do the nodes that heard them in opposite orders: the ledger splits
and never heals, because every renewal is refused on the other side too. A policy that judges an
entry on its own (like :class:`LeasePolicy`) keeps the merge a join, so claims converge and the
election makes the loser step down; not claiming a live lease is the election's rule, not the
ledger's.
"""

from __future__ import annotations

from typing import Mapping, Protocol

from .entry import Entry


class WritePolicy(Protocol):
    """Decides whether ``entry`` may replace ``current`` (None when the key is new)."""

    name: str

    def allows(self, entry: Entry, current: Entry | None, now: float) -> bool:
        """True when the write is permitted; ``now`` is unix time in seconds."""
        ...


class OpenPolicy:
    """Anyone may write any key."""

    name = "open"

    def allows(self, entry: Entry, current: Entry | None, now: float) -> bool:
        """Always true."""
        return True


class OwnerKeyedPolicy:
    """The key is the writer's own peer id, or a path under it (``"<peer_id>/..."``)."""

    name = "owner_keyed"

    def allows(self, entry: Entry, current: Entry | None, now: float) -> bool:
        """True when the key names the writer."""
        return entry.key == entry.owner or entry.key.startswith(entry.owner + "/")


class FirstWriterPolicy:
    """A key belongs to its current holder until the holder's lease expires or it is deleted."""

    name = "first_writer"

    def allows(self, entry: Entry, current: Entry | None, now: float) -> bool:
        """True for a new key, the holder's own writes, and takeovers of lapsed or deleted keys."""
        if current is None or current.owner == entry.owner or current.deleted:
            return True
        return lease_expired(current, now)


class LeasePolicy:
    """A lease names its holder: a live value must be a dict whose ``peer`` is the writer.

    No one can write a lease in another peer's name; which of several claims stands is decided by
    the merge alone (see the module docstring). Tombstones are accepted from any writer: deleting
    a lease only forces a new election.
    """

    name = "lease"

    def allows(self, entry: Entry, current: Entry | None, now: float) -> bool:
        """True for tombstones and for values whose ``peer`` is the entry's owner."""
        if entry.deleted:
            return True
        return isinstance(entry.value, dict) and entry.value.get("peer") == entry.owner


def lease_expired(entry: Entry, now: float) -> bool:
    """True when the entry's value has a numeric ``expires`` (unix seconds) not after ``now``.

    A value without ``expires`` never lapses: such a key stays with its first writer.
    """
    value = entry.value
    if not isinstance(value, dict):
        return False
    expires = value.get("expires")
    if isinstance(expires, bool) or not isinstance(expires, (int, float)):
        return False
    return expires <= now


OPEN = OpenPolicy()
OWNER_KEYED = OwnerKeyedPolicy()
FIRST_WRITER = FirstWriterPolicy()
LEASE = LeasePolicy()

DEFAULT_POLICIES: Mapping[str, WritePolicy] = {
    "nodes": OWNER_KEYED,
    "vpn": OWNER_KEYED,
    "leader": LEASE,
}


class PolicyRegistry:
    """Maps bucket names to policies; buckets not named get the default (open).

    ``namespace`` is the prefix callers put before bucket names (a ``network_id``, say
    ``"cluster-a/"``): names in the registry are given without it, so ``"cluster-a/nodes"`` is
    governed by the policy of ``"nodes"``. Buckets outside the namespace get the default.
    """

    def __init__(
        self,
        policies: Mapping[str, WritePolicy] | None = None,
        default: WritePolicy = OPEN,
        *,
        namespace: str = "",
    ) -> None:
        self._policies: dict[str, WritePolicy] = dict(DEFAULT_POLICIES if policies is None else policies)
        self.default = default
        self.namespace = namespace

    def register(self, bucket: str, policy: WritePolicy) -> None:
        """Set the policy of ``bucket`` (replacing any earlier one)."""
        self._policies[bucket] = policy

    def for_bucket(self, bucket: str) -> WritePolicy:
        """The policy that governs ``bucket``."""
        if self.namespace:
            if not bucket.startswith(self.namespace):
                return self.default
            bucket = bucket[len(self.namespace):]
        return self._policies.get(bucket, self.default)

    def allows(self, entry: Entry, current: Entry | None, now: float) -> bool:
        """Whether the policy of ``entry.bucket`` permits it to replace ``current``."""
        return self.for_bucket(entry.bucket).allows(entry, current, now)
