"""Strict checks for every value that reaches a k3s file, environment or command line.

Values come from the ledger (written by other nodes), from k3s's own files and from other plugins'
hooks. Each is checked against the narrowest form it may take, and a value that fails is dropped,
never repaired: a repaired token or address is one nobody published.

- A k3s token (``K10<sha256 hex>::server:<secret>``, or a bare secret) is made of
  ``[A-Za-z0-9._:-]`` only, at most :data:`MAX_TOKEN_LENGTH` characters: nothing a shell, a YAML
  file or a URL could read as syntax.
- An address is an IP address (parsed by :mod:`ipaddress`, without an IPv6 zone) or a DNS host
  name of letters, digits, hyphens and dots (RFC 1123).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

MAX_TOKEN_LENGTH = 256
_TOKEN = re.compile(r"[A-Za-z0-9._:-]+")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
MAX_HOSTNAME_LENGTH = 253


def clean_token(value: Any) -> str | None:
    """``value`` when it is a well-formed k3s token, else None."""
    if isinstance(value, str) and len(value) <= MAX_TOKEN_LENGTH and _TOKEN.fullmatch(value):
        return value
    return None


def clean_ip(value: Any) -> str | None:
    """``value`` as a canonical IP address (``10.1.0.1``, ``fd00::1``), else None."""
    if not isinstance(value, str):
        return None
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        return None  # "fe80::1%eth0": the zone would have to be escaped in a URL
    return str(ip)


def clean_host(value: Any) -> str | None:
    """An IP address (canonical) or a DNS host name, else None."""
    ip = clean_ip(value)
    if ip is not None:
        return ip
    if isinstance(value, str) and len(value) <= MAX_HOSTNAME_LENGTH and _HOSTNAME.fullmatch(value):
        return value
    return None


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_name_ok(name: Any) -> bool:
    """Whether ``name`` is a portable environment variable name (what a shell can assign)."""
    return isinstance(name, str) and bool(_ENV_NAME.fullmatch(name))
