"""Who may write which key: per-bucket write policies.

Every write, local or remote, is checked against its bucket's policy before it can be merged. The
policy sees the incoming entry, the entry it would replace, and the current unix time.

- :class:`OpenPolicy` — anyone may write any key (user buckets).
- :class:`OwnerKeyedPolicy` — the key is the writer's peer id, or starts with ``"<peer_id>/"``
  (``nodes``: each node publishes about itself only).
- :class:`LeasePolicy` — the ``leader`` bucket: a lease key ends with ``:<writer's peer id>``
  and its value names the writer (``value["peer"] == owner``); which claim stands is the
  election's rule (see :mod:`kairos_core.election`), not the ledger's.

The core names the policies of its own buckets only (:data:`DEFAULT_POLICIES`); a plugin names
those of its buckets through the ``kairos_ledger_policies`` hook, which the node registers before
it opens the ledger (tunvpn's ``vpn`` and k3s's cluster bucket are owner-keyed that way).

Every policy judges an entry on its own, never against the entry it would replace nor the clock.
A "first writer owns the key until its lease expires" policy was tried and dropped:
two peers that claim a lapsed lease at the same moment each hold their own claim and refuse the
other's, and so do the nodes that heard them in opposite orders — the ledger splits and never
heals. Judging entries on their own keeps the merge a join, so every node converges.
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


class LeasePolicy:
    """A lease is written under, and names, its holder: nobody claims in another peer's name.

    The key must end with ``:<owner>`` (one key per epoch and claimant, so claims never overwrite
    each other) and a live value must be a dict whose ``peer`` is the owner.
    """

    name = "lease"

    def allows(self, entry: Entry, current: Entry | None, now: float) -> bool:
        """True for the owner's own lease keys holding values that name the owner."""
        if not entry.key.endswith(":" + entry.owner):
            return False
        return entry.deleted or (isinstance(entry.value, dict) and entry.value.get("peer") == entry.owner)


OPEN = OpenPolicy()
OWNER_KEYED = OwnerKeyedPolicy()
LEASE = LeasePolicy()

# The core's own buckets. Plugins' buckets are not named here (see kairos_ledger_policies).
DEFAULT_POLICIES: Mapping[str, WritePolicy] = {
    "nodes": OWNER_KEYED,
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
