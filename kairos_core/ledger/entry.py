"""Ledger entries: the signed record of one key's value, and its canonical encoding.

An entry is signed by its owner over a canonical byte string of (bucket, key, value, version,
deleted). The encoding is JSON with sorted keys, no insignificant whitespace, UTF-8, and no NaN or
infinity, prefixed by a domain label so an entry signature can never be mistaken for any other
signature the node makes. Values are normalised through that same JSON at write time, so the
value a node keeps is exactly the value every other node decodes and verifies. A value nests at
most ``MAX_VALUE_DEPTH`` levels of lists and objects, so no reader of it (watch streams,
``dataclasses.asdict``, plugins) can run out of stack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..identity import Identity, public_key_from_peer_id
from ..untrusted import nesting_exceeds
from .clock import MAX_COUNTER, MAX_WALL_MS, Version
from .errors import LedgerError

SIGNATURE_DOMAIN = b"kairos/ledger-entry/1\n"
DEFAULT_MAX_VALUE_SIZE = 65536
# What any node accepts from a peer, whatever its own ledger.max_value_size: the limit on remote
# entries must be the same everywhere, or nodes with different configs would disagree on the same
# entry forever. ledger.max_value_size (at most this) only bounds this node's own writes.
MAX_REMOTE_VALUE_SIZE = 1024 * 1024
# Levels of lists and objects a value may nest, local or remote, and like the remote size limit
# the same on every node. Python's JSON and copying recurse once or twice per level and give up
# near 1000 frames, less the caller's own; real data nests a dozen.
MAX_VALUE_DEPTH = 64
MAX_BUCKET_LENGTH = 128
MAX_KEY_LENGTH = 512
MAX_PEER_ID_LENGTH = 128
SIGNATURE_LENGTH = 64


def canonical_json(value: Any) -> str:
    """The canonical JSON text of ``value``; ``LedgerError`` if it is not plain JSON data."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        text.encode()  # a lone surrogate ("\ud800") is a str but not text: it cannot be signed or sent
    except (TypeError, ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise LedgerError(f"value is not JSON data: {exc}") from None
    return text


def normalize_value(value: Any, max_value_size: int = DEFAULT_MAX_VALUE_SIZE) -> Any:
    """``value`` as every peer will see it after a JSON round trip (tuples become lists, dict keys
    strings), checked against the size cap and the depth bound."""
    _check_depth(value)  # first: it is iterative, canonical_json is not
    text = canonical_json(value)
    size = len(text.encode())
    if size > max_value_size:
        raise LedgerError(f"value is {size} bytes of JSON, more than ledger.max_value_size={max_value_size}")
    return json.loads(text)


def _check_depth(value: Any) -> None:
    if nesting_exceeds(value, MAX_VALUE_DEPTH):
        raise LedgerError(f"value is nested more than {MAX_VALUE_DEPTH} levels deep")


@lru_cache(maxsize=4096)
def _public_key(peer_id: str) -> Ed25519PublicKey | None:
    # A ledger sees few distinct owners and many entries each: decode each peer id once.
    try:
        return public_key_from_peer_id(peer_id)
    except (ValueError, TypeError):
        return None


def check_name(kind: str, name: object, max_length: int) -> str:
    """A bucket or key: a non-empty string of bounded length without NUL, encodable as UTF-8."""
    if not isinstance(name, str) or not name or len(name) > max_length or "\x00" in name:
        raise LedgerError(f"{kind} must be a non-empty string of at most {max_length} characters without NUL")
    try:
        name.encode()
    except UnicodeEncodeError:
        raise LedgerError(f"{kind} is not valid text (it holds a lone surrogate)") from None
    return name


@dataclass(frozen=True)
class Entry:
    """The winning state of one key: value, owner, version, tombstone flag and owner's signature.

    ``owner`` is the peer id that wrote this version, so ``version.peer_id == owner``.
    """

    bucket: str
    key: str
    value: Any
    owner: str
    version: Version
    deleted: bool
    sig: bytes = field(repr=False)

    @classmethod
    def signed(cls, identity: Identity, bucket: str, key: str, value: Any, version: Version, deleted: bool = False) -> "Entry":
        """A new entry written and signed by ``identity`` (value must already be normalised)."""
        owner = identity.peer_id
        unsigned = cls(bucket, key, None if deleted else value, owner, version, deleted, b"")
        return cls(unsigned.bucket, unsigned.key, unsigned.value, owner, version, deleted, identity.sign(unsigned.signing_bytes))

    @cached_property
    def value_json(self) -> str:
        """The canonical JSON text of the value."""
        return canonical_json(self.value)

    @cached_property
    def signing_bytes(self) -> bytes:
        """What the owner signs: the domain label, then canonical JSON of the signed fields."""
        body = [self.bucket, self.key, self.value, list(self.version), self.deleted]
        return SIGNATURE_DOMAIN + canonical_json(body).encode()

    def verify(self) -> bool:
        """True when ``sig`` is the owner's signature over this entry."""
        key = _public_key(self.owner)
        if key is None:
            return False
        try:
            key.verify(self.sig, self.signing_bytes)
        except InvalidSignature:
            return False
        return True

    def validate(self, max_value_size: int = DEFAULT_MAX_VALUE_SIZE) -> None:
        """Check every field's type and bound (not the signature); ``LedgerError`` otherwise."""
        check_name("bucket", self.bucket, MAX_BUCKET_LENGTH)
        check_name("key", self.key, MAX_KEY_LENGTH)
        if not isinstance(self.owner, str) or not 0 < len(self.owner) <= MAX_PEER_ID_LENGTH:
            raise LedgerError("owner must be a peer id")
        v = self.version
        if not (
            isinstance(v, tuple)
            and len(v) == 3
            and type(v[0]) is int
            and 0 <= v[0] <= MAX_WALL_MS
            and type(v[1]) is int
            and 0 <= v[1] <= MAX_COUNTER
        ):
            raise LedgerError("version must be (wall_ms, counter, peer_id) within bounds")
        if v[2] != self.owner:
            raise LedgerError("version peer id must be the owner")
        if type(self.deleted) is not bool:
            raise LedgerError("deleted must be a bool")
        if self.deleted and self.value is not None:
            raise LedgerError("a tombstone has no value")
        if not isinstance(self.sig, bytes) or len(self.sig) != SIGNATURE_LENGTH:
            raise LedgerError("sig must be 64 bytes")
        _check_depth(self.value)
        size = len(self.value_json.encode())
        if size > max_value_size:
            raise LedgerError(f"value is {size} bytes of JSON, more than {max_value_size}")

    def newer_than(self, other: "Entry | None") -> bool:
        """True when this entry wins the merge against ``other`` (None: nothing to beat).

        The greater version wins. Two different entries with one version can only come from an
        owner that signed twice with the same clock reading; comparing the signed bytes, then the
        signatures, still picks the same one on every node, which keeps the merge commutative.
        """
        if other is None or self.version != other.version:
            return other is None or self.version > other.version
        return (self.signing_bytes, self.sig) > (other.signing_bytes, other.sig)


def merge(a: Entry | None, b: Entry | None) -> Entry | None:
    """The entry that wins between ``a`` and ``b`` for the same key: the join of the merge."""
    if a is None:
        return b
    return b if b is not None and b.newer_than(a) else a
