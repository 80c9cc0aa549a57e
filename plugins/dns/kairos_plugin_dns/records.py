"""The names the DNS server answers itself: members' VIPs and the records of the ``dns`` bucket.

**The ``dns`` bucket.** Key ``<name>/<TYPE>`` (``web.kairos./A``, ``*.apps.kairos./A``) →
``{"values": [...], "ttl": seconds}``. Names are absolute, lower case, with the trailing dot; a
name may start with one ``*.`` label (a wildcard). Any member may write any record (users run
``kairos dns add`` on whichever node they are on); the bucket's policy only refuses entries that
are not records, judged on the entry alone so every node accepts the same ones.

**Members.** ``<hostname>.<domain>`` of every alive member (and this node) whose VIP claim in the
tunvpn plugin's ``vpn`` bucket is alive. The bucket is read as data (the keys without a ``/`` are
peer ids, the values ``{"vip", "claimed", "static", "expires", …}``), never by importing tunvpn.

**Precedence** (deterministic, whatever order entries arrived in): a member's name, then a record
of the exact name in the bucket, then the longest matching wildcard (``*.a.b.`` beats ``*.b.``).
Members come first because any member may write records: a record must not take over the name
of another member, whose VIP claim only that member can write.
A name that matches but holds no record of the asked type answers NODATA (no fall-through to a
shorter wildcard or to the forwarder), as an authoritative server would.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kairos_core.plugin import Entry, KairosError, OpenPolicy

BUCKET = "dns"
#: the tunvpn plugin's bucket of VIP claims (read as data)
VPN_BUCKET = "vpn"
TYPES = ("A", "AAAA", "TXT")
MAX_VALUES = 16
MAX_TXT = 255
MAX_TTL = 86400
LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


class UsageError(KairosError):
    """A record or option the user gave that cannot work (exit code 2)."""

    exit_code = 2


def name_problem(name: Any) -> str | None:
    """Why ``name`` is not an absolute record name (``a.b.``, ``*.b.``), or None."""
    if not isinstance(name, str) or not name.endswith(".") or len(name) > 254 or name == ".":
        return "expected an absolute name such as web.kairos. (at most 253 characters)"
    labels = name[:-1].split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if not labels:
            return "a wildcard needs a suffix (*.apps.kairos.)"
    if not all(LABEL.fullmatch(label) for label in labels):
        return "labels are 1-63 of a-z 0-9 - _ (a leading *. for a wildcard)"
    return None


def qualify(name: str, domain: str) -> str:
    """The absolute lower-case name of what a user typed: a single label gets the node's domain
    (``web`` → ``web.kairos.``, ``*.apps`` → ``*.apps.kairos.``), anything with a dot is taken as absolute (``a.example.com``)."""
    name = name.strip().lower()
    if not name.endswith("."):
        single = "." not in name.removeprefix("*.")
        name = f"{name}.{domain}" if single else name + "."
    problem = name_problem(name)
    if problem:
        raise UsageError(f"name {name!r}: {problem}")
    return name


def value_problem(rtype: str, value: Any) -> str | None:
    """Why ``value`` is not one value of a ``rtype`` record, or None."""
    if not isinstance(value, str):
        return "expected a string"
    if rtype in ("A", "AAAA"):
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            return f"{value!r} is not an IP address"
        if (rtype == "A") != (address.version == 4) or str(address) != value:
            return f"{value!r} is not an {'IPv4' if rtype == 'A' else 'IPv6'} address in canonical form"
        return None
    if len(value.encode()) > MAX_TXT or not value.isprintable():
        return f"TXT values are printable text of at most {MAX_TXT} bytes"
    return None


def record_problem(value: Any) -> str | None:
    """Why ``value`` is not a record value ``{"type", "values", "ttl"}`` (type checked by the key), or None."""
    if not isinstance(value, dict) or set(value) != {"values", "ttl"}:
        return "expected {values, ttl}"
    ttl = value["ttl"]
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 0 <= ttl <= MAX_TTL:
        return f"ttl must be an integer from 0 to {MAX_TTL}"
    values = value["values"]
    if not isinstance(values, list) or not 1 <= len(values) <= MAX_VALUES or len(set(map(str, values))) != len(values):
        return f"values must be 1 to {MAX_VALUES} distinct values"
    return None


def split_key(key: str) -> tuple[str, str] | None:
    """``(name, type)`` of a bucket key, or None when it is not one."""
    name, slash, rtype = key.rpartition("/")
    if not slash or rtype not in TYPES or name_problem(name) is not None:
        return None
    return name, rtype


def entry_problem(key: str, value: Any) -> str | None:
    """Why ``key → value`` is not a record of the bucket, or None."""
    parts = split_key(key)
    if parts is None:
        return f"key {key!r}: expected <absolute name>/<{'|'.join(TYPES)}>"
    problem = record_problem(value)
    if problem is None:
        problem = next((p for v in value["values"] if (p := value_problem(parts[1], v))), None)
    return problem


class RecordsPolicy(OpenPolicy):
    """Only records (or tombstones of record keys): decided from the entry alone. An open policy,
    so what one member writes here counts against its quota in the open buckets."""

    name = "dns_records"

    def allows(self, entry: Entry, current: Entry | None, now: float) -> bool:
        if entry.deleted:
            return split_key(entry.key) is not None
        return entry_problem(entry.key, entry.value) is None


@dataclass(frozen=True)
class Answer:
    """What the zone holds for a name: ``records`` by type (empty for that type: NODATA)."""

    name: str
    source: str  # "record", "member" or "wildcard *.suffix."
    records: Mapping[str, tuple[tuple[str, ...], int]]


@dataclass
class Zone:
    """Everything answered locally, built from the ledger at one moment (see :func:`build_zone`)."""

    domain: str
    exact: dict[str, dict[str, tuple[tuple[str, ...], int]]] = field(default_factory=dict)
    members: dict[str, dict[str, tuple[tuple[str, ...], int]]] = field(default_factory=dict)
    #: suffix (``apps.kairos.``) of ``*.apps.kairos.`` → records by type
    wildcards: dict[str, dict[str, tuple[tuple[str, ...], int]]] = field(default_factory=dict)

    def lookup(self, qname: str) -> Answer | None:
        """The records for ``qname`` (absolute, any case) by the precedence above, or None when
        nothing here matches it."""
        name = qname.lower()
        if name in self.members:
            return Answer(name, "member", self.members[name])
        if name in self.exact:
            return Answer(name, "record", self.exact[name])
        labels = name[:-1].split(".")
        # longest suffix first: the most specific wildcard wins
        for start in range(1, len(labels)):
            suffix = ".".join(labels[start:]) + "."
            if suffix in self.wildcards:
                return Answer(name, f"wildcard *.{suffix}", self.wildcards[suffix])
        return None

    def in_domain(self, qname: str) -> bool:
        """Whether ``qname`` is inside the network's domain (never forwarded)."""
        name = qname.lower()
        return name == self.domain or name.endswith("." + self.domain)


def read_records(items: Mapping[str, Any]) -> list[tuple[str, str, tuple[str, ...], int]]:
    """Every well-formed record ``(name, type, values, ttl)`` of the bucket, sorted (others are
    skipped: the policy keeps them out, but a reader checks what it reads)."""
    found = []
    for key, value in items.items():
        parts = split_key(key)
        if parts is None or entry_problem(key, value) is not None:
            continue
        found.append((parts[0], parts[1], tuple(value["values"]), int(value["ttl"])))
    return sorted(found)


def _vip_rank(value: Mapping[str, Any], peer_id: str) -> tuple[int, int, int, str]:
    claimed = value.get("claimed")
    first, second = (
        claimed
        if isinstance(claimed, list)
        and len(claimed) == 2
        and all(isinstance(c, int) and not isinstance(c, bool) for c in claimed)
        else (2**63, 2**63)
    )
    return (0 if value.get("static") is True else 1, first, second, peer_id)


def member_vips(vpn_items: Mapping[str, Any], alive: Iterable[str], now_ms: int | None = None) -> dict[str, str]:
    """peer id → VIP of every alive peer whose claim in the ``vpn`` bucket is alive. Two claims of
    one address: the one the VPN lets hold it (static first, then the earlier claim, then the
    lower peer id), so a loser of a conflict is not given the winner's address."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    alive = set(alive)
    holders: dict[str, tuple[tuple[int, int, int, str], str]] = {}
    for peer_id, value in vpn_items.items():
        if "/" in peer_id or peer_id not in alive or not isinstance(value, dict):
            continue
        expires = value.get("expires")
        if isinstance(expires, int) and not isinstance(expires, bool) and expires <= now:
            continue
        try:
            vip = str(ipaddress.ip_address(str(value.get("vip"))))
        except ValueError:
            continue
        rank = _vip_rank(value, peer_id)
        if vip not in holders or rank < holders[vip][0]:
            holders[vip] = (rank, peer_id)
    return {peer_id: vip for vip, (_rank, peer_id) in holders.items()}


def host_label(hostname: Any) -> str | None:
    """The DNS label of a member's hostname (its first label, lower case), or None when it is not one."""
    if not isinstance(hostname, str):
        return None
    label = hostname.split(".")[0].lower()
    return label if LABEL.fullmatch(label) else None


def build_zone(
    domain: str,
    ttl: int,
    records: Mapping[str, Any],
    vpn_items: Mapping[str, Any],
    hostnames: Mapping[str, Any],
    now_ms: int | None = None,
) -> Zone:
    """The zone from the ``dns`` bucket's items, the ``vpn`` bucket's items and ``hostnames``
    (peer id → hostname of every alive member, this node included); members' answers have ``ttl``."""
    zone = Zone(domain)
    for name, rtype, values, record_ttl in read_records(records):
        if name.startswith("*."):
            zone.wildcards.setdefault(name[2:], {})[rtype] = (values, record_ttl)
        else:
            zone.exact.setdefault(name, {})[rtype] = (values, record_ttl)
    by_name: dict[str, dict[str, list[str]]] = {}
    for peer_id, vip in sorted(member_vips(vpn_items, hostnames, now_ms).items()):
        label = host_label(hostnames.get(peer_id))
        if label is None:
            continue
        rtype = "AAAA" if ":" in vip else "A"
        by_name.setdefault(f"{label}.{domain}", {}).setdefault(rtype, []).append(vip)
    for name, types in by_name.items():
        # two members with one hostname: both addresses, in a fixed order
        zone.members[name] = {rtype: (tuple(sorted(vips)), ttl) for rtype, vips in types.items()}
    return zone
