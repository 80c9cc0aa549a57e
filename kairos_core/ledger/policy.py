"""Who may write which key: per-bucket write policies.

Every write, local or remote, is checked against its bucket's policy before it can be merged. The
policy sees the incoming entry, the entry it would replace, and the current unix time.

- :class:`OpenPolicy` — anyone may write any key (user buckets).
- :class:`OwnerKeyedPolicy` — the key is the writer's peer id, or starts with ``"<peer_id>/"``
  (``nodes``: each node publishes about itself only).
- :class:`LeasePolicy` — the ``leader`` bucket: a lease key ends with ``:<writer's peer id>``
  and its value names the writer (``value["peer"] == owner``); which claim stands is the
  election's rule (see :mod:`kairos_core.election`), not the ledger's.
- :class:`RevocationPolicy` — the ``revoked`` bucket: ``<revoked peer id>:<writer's peer id>``,
  never deleted, so nobody writes a revocation in another's name and nobody (its writer
  included) undoes one; whether a record counts (its writer led the epoch it names) is
  :mod:`kairos_core.revocation`'s rule. The ``rotation`` bucket (new tokens sealed per member,
  :mod:`kairos_core.rotation`) has the same shape (:class:`RecordPolicy`).

A registry also refuses every write of an owner it was told is revoked
(:meth:`PolicyRegistry.refuse_owners`): from then on nothing of that peer is merged, whatever
bucket, whoever relays it.

The core names the policies of its own buckets only (:data:`DEFAULT_POLICIES`); a plugin names
those of its buckets through the ``kairos_ledger_policies`` hook, which the node registers before
it opens the ledger (tunvpn's ``vpn`` and k3s's cluster bucket are owner-keyed that way).

Every policy judges an entry on its own, never against the entry it would replace nor the clock.
A "first writer owns the key until its lease expires" policy was tried and dropped:
two peers that claim a lapsed lease at the same moment each hold their own claim and refuse the
other's, and so do the nodes that heard them in opposite orders — the ledger splits and never
heals. Judging entries on their own keeps the merge a join, so every node converges.

Quotas (:class:`OwnerQuota`, :class:`QuotaAccount`) are the one judgement made against what is
already held: in the open buckets, where anyone may write any key, one owner (peer id) may hold
at most so many live keys, bytes of values and tombstones. Policies cannot bound that: each entry
is harmless on its own, and one insider writing 100 values of 1 MiB filled every node's memory and
disk. How the ledger applies them, and why nodes still agree, is told in
:mod:`kairos_core.ledger.ledger`.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Protocol

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


class RecordPolicy:
    """A record about a peer, written under and naming its writer, never deleted.

    The key is ``<peer id>:<owner>`` and the value a dict whose ``subject`` field is that peer and
    ``by`` the owner (revocations: ``peer``; token rotations: ``member``). Tombstones are refused,
    so once a record is held it stays held: a later write of the same key can only come from its
    own writer and still names the same peer.
    """

    def __init__(self, name: str, subject: str) -> None:
        self.name = name
        self.subject = subject

    def allows(self, entry: Entry, current: Entry | None, now: float) -> bool:
        """True for a live record, under the owner's own key, that names the key's peer."""
        if entry.deleted or not entry.key.endswith(":" + entry.owner):
            return False
        peer = entry.key[: -len(entry.owner) - 1]
        value = entry.value
        return bool(peer) and isinstance(value, dict) and value.get(self.subject) == peer and value.get("by") == entry.owner


class RevocationPolicy(RecordPolicy):
    """The ``revoked`` bucket (:mod:`kairos_core.revocation`): ``<revoked peer>:<owner>``."""

    def __init__(self) -> None:
        super().__init__("revocation", "peer")


OPEN = OpenPolicy()
OWNER_KEYED = OwnerKeyedPolicy()
LEASE = LeasePolicy()
REVOCATION = RevocationPolicy()
# The ``rotation`` bucket (kairos_core.rotation): a new token sealed to ``<member>``, by ``<owner>``.
ROTATION = RecordPolicy("rotation", "member")

# The core's own buckets. Plugins' buckets are not named here (see kairos_ledger_policies).
DEFAULT_POLICIES: Mapping[str, WritePolicy] = {
    "nodes": OWNER_KEYED,
    "leader": LEASE,
    "revoked": REVOCATION,
    "rotation": ROTATION,
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
        #: owners whose writes are refused in every bucket (revoked peers), and how many were
        self.refused_owners: frozenset[str] = frozenset()
        self.refused_revoked = 0

    def refuse_owners(self, owners: frozenset[str] | set[str]) -> None:
        """Refuse, from now on, every write whose owner is in ``owners`` (replaces the set)."""
        self.refused_owners = frozenset(owners)

    def register(self, bucket: str, policy: WritePolicy) -> None:
        """Set the policy of ``bucket`` (replacing any earlier one)."""
        self._policies[bucket] = policy

    def for_bucket(self, bucket: str) -> WritePolicy:
        """The policy that governs ``bucket``."""
        if self.namespace:
            if not bucket.startswith(self.namespace):
                return self.default
            bucket = bucket[len(self.namespace) :]
        return self._policies.get(bucket, self.default)

    def allows(self, entry: Entry, current: Entry | None, now: float) -> bool:
        """Whether the policy of ``entry.bucket`` permits it to replace ``current`` (never for a
        refused owner)."""
        if entry.owner in self.refused_owners:
            self.refused_revoked += 1
            return False
        return self.for_bucket(entry.bucket).allows(entry, current, now)


# -- quotas ----------------------------------------------------------------------------------


class OwnerQuota(NamedTuple):
    """The most one owner may hold across the open buckets (those whose policy is :class:`OpenPolicy`)."""

    keys: int  # live keys
    bytes: int  # bytes of the values' canonical JSON
    tombstones: int  # deleted keys, kept for ledger.tombstone_grace


class Usage(NamedTuple):
    """What one owner holds across the open buckets, in the units of :class:`OwnerQuota`."""

    keys: int = 0
    bytes: int = 0
    tombstones: int = 0

    def __add__(self, other: "Usage") -> "Usage":  # type: ignore[override]
        return Usage(self.keys + other.keys, self.bytes + other.bytes, self.tombstones + other.tombstones)

    def __sub__(self, other: "Usage") -> "Usage":
        return Usage(self.keys - other.keys, self.bytes - other.bytes, self.tombstones - other.tombstones)


NOTHING = Usage()

# What every node allows any owner to hold, judging remote entries. The same on every node and not
# configurable, like MAX_REMOTE_VALUE_SIZE: nodes with different limits would refuse different
# entries of the same owner and never agree. Sized so that one insider's share of every node stays
# modest: the issue measured ~5.3 bytes of RSS per byte of JSON, so 16 MiB is ~85 MB of memory at
# worst, 20,000 keys or tombstones (a key is at most 512 characters) a few tens of MB more.
NETWORK_QUOTA = OwnerQuota(keys=20_000, bytes=16 * 1024 * 1024, tombstones=20_000)
# What a node allows its own writes (ledger.max_keys_per_owner, max_bytes_per_owner,
# max_tombstones_per_owner; at most these). Half the network's: a peer that has not yet heard of
# this node's latest writes may still hold an older state of its keys (a live key it has since
# deleted, a larger value it has since shrunk), so its count of what this node holds can exceed
# this node's own; live keys + tombstones here never exceed the network's limit on either. A node
# used as intended (cluster state, small config values) holds a few dozen keys and kilobytes.
DEFAULT_QUOTA = OwnerQuota(keys=10_000, bytes=8 * 1024 * 1024, tombstones=10_000)

#: Words for each limit of :class:`OwnerQuota`, in messages.
QUOTA_UNITS: Mapping[str, str] = {"keys": "live keys", "bytes": "bytes of values", "tombstones": "tombstones"}


class QuotaAccount:
    """What each owner holds in the buckets quotas govern, kept up to date entry by entry.

    ``governed(bucket)`` says whether quotas apply to a bucket (its policy is open). The answer is
    remembered while the bucket holds entries, so what was added is later removed in the same
    terms even if a policy is registered meanwhile. Only owners that hold something are tracked,
    and only buckets that hold entries remembered: entries from made-up owners that are refused
    leave nothing behind here.
    """

    def __init__(self, governed: Callable[[str], bool]) -> None:
        self._governed = governed
        self._buckets: dict[str, list] = {}  # bucket -> [governed, entries held]
        self._usage: dict[str, Usage] = {}  # owner -> what it holds (never all zeros)

    def governs(self, bucket: str) -> bool:
        """Whether quotas apply to ``bucket``."""
        held = self._buckets.get(bucket)
        return bool(held[0]) if held is not None else bool(self._governed(bucket))

    def share(self, entry: Entry) -> Usage:
        """What ``entry`` counts against its owner's quota once held (nothing outside governed buckets)."""
        if not self.governs(entry.bucket):
            return NOTHING
        if entry.deleted:
            return Usage(tombstones=1)
        return Usage(keys=1, bytes=len(entry.value_json.encode()))

    def usage(self, owner: str) -> Usage:
        """What ``owner`` holds now."""
        return self._usage.get(owner, NOTHING)

    def owners(self) -> int:
        """How many owners hold something in governed buckets."""
        return len(self._usage)

    def add(self, entry: Entry) -> None:
        """Count an entry the ledger now holds."""
        held = self._buckets.get(entry.bucket)
        if held is None:
            held = self._buckets[entry.bucket] = [self._governed(entry.bucket), 0]
        held[1] += 1
        self._change(entry.owner, self.share(entry))

    def remove(self, entry: Entry) -> None:
        """Uncount an entry the ledger no longer holds (replaced or dropped)."""
        self._change(entry.owner, NOTHING - self.share(entry))
        held = self._buckets.get(entry.bucket)
        if held is not None:
            held[1] -= 1
            if held[1] <= 0:
                del self._buckets[entry.bucket]

    def over(self, owner: str, growth: Usage, quota: OwnerQuota, pending: Usage = NOTHING) -> tuple[str, int, int] | None:
        """The first limit of ``quota`` that ``owner`` would pass by growing ``growth`` beyond what
        it holds plus ``pending`` (what a batch being merged already adds), as ``(field, would hold,
        limit)``; None when it fits. Only a quantity that grows can be refused: an owner past a limit
        (a lowered config, a store from before quotas) may still delete, shrink and update in place.
        """
        total = self.usage(owner) + pending + growth
        for name, grows, would_hold, limit in zip(OwnerQuota._fields, growth, total, quota):
            if grows > 0 and would_hold > limit:
                return name, would_hold, limit
        return None

    def _change(self, owner: str, delta: Usage) -> None:
        if delta == NOTHING:
            return
        usage = self._usage.get(owner, NOTHING) + delta
        if usage == NOTHING:
            self._usage.pop(owner, None)
        else:
            self._usage[owner] = usage
