"""The ``services`` ledger bucket: who exposes which service, and the names and addresses users give.

Key ``<owner peer id>/<service name>`` → ``{"protocol": "tcp"|"udp", "description": …}``. The
target address (HOST:PORT) is never written: it is the exposing node's own business, and other
nodes only need to know whom to ask. The bucket's policy lets a node write only keys under its
own peer id, and only entries of that shape, judged on the entry alone.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from kairos_core.plugin import Entry, KairosError

BUCKET = "services"
PROTOCOLS = ("tcp", "udp")
MAX_DESCRIPTION = 200
NAME_PATTERN = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,62})")


class UsageError(KairosError):
    """A name, address or option the user gave that cannot work (exit code 2)."""

    exit_code = 2


def check_name(name: Any) -> str:
    """``name`` when it is a service name (lower-case letters, digits, ``.``, ``_``, ``-``; at most
    63 characters, starting with a letter or digit); :class:`UsageError` otherwise."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"service name {name!r}: use 1-63 of a-z 0-9 . _ - (starting with a letter or digit)")
    return name


def parse_hostport(text: Any, what: str) -> tuple[str, int]:
    """``("host", port)`` from ``HOST:PORT`` or ``[V6]:PORT``; :class:`UsageError` otherwise."""
    if not isinstance(text, str) or ":" not in text:
        raise UsageError(f"{what} {text!r}: expected HOST:PORT")
    host, _, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"{what} {text!r}: expected HOST:PORT with a port from 0 to 65535")
    return host, int(port_text)


def is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def advert(protocol: str, description: str) -> dict[str, str]:
    """The value of an exposing node's entry."""
    return {"protocol": protocol, "description": description}


def advert_problem(value: Any) -> str | None:
    """Why ``value`` is not an advertisement, or None."""
    if not isinstance(value, dict) or set(value) != {"protocol", "description"}:
        return "expected {protocol, description}"
    if value["protocol"] not in PROTOCOLS:
        return "protocol must be tcp or udp"
    description = value["description"]
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION or not description.isprintable():
        return f"description must be printable text of at most {MAX_DESCRIPTION} characters"
    return None


class ServicesPolicy:
    """Only ``<owner>/<valid name>`` keys, each holding an advertisement (or a tombstone).

    Decided from the entry alone (never the entry it replaces, the clock or other entries), so
    every node accepts the same entries whatever order they arrive in.
    """

    name = "services"

    def allows(self, entry: Entry, current: Entry | None, now: float) -> bool:
        owner, slash, service = entry.key.partition("/")
        if owner != entry.owner or not slash or not NAME_PATTERN.fullmatch(service):
            return False
        return entry.deleted or advert_problem(entry.value) is None


@dataclass(frozen=True)
class Exposure:
    """One node's advertisement of one service, as read from the bucket."""

    owner: str
    name: str
    protocol: str
    description: str


def read_catalog(items: dict[str, Any]) -> list[Exposure]:
    """Every well-formed advertisement of the bucket's items (others are skipped: the policy
    keeps them out, but a reader checks what it reads), sorted by name then owner."""
    found = []
    for key, value in items.items():
        owner, slash, service = key.partition("/")
        if not slash or not NAME_PATTERN.fullmatch(service) or advert_problem(value) is not None:
            continue
        found.append(Exposure(owner, service, value["protocol"], value["description"]))
    return sorted(found, key=lambda e: (e.name, e.owner))
