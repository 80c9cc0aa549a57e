"""The wire form of ledger entries: gossip deltas and sync payloads.

A batch is one JSON object, ``{"v": 1, "p": [peer ids], "e": [rows]}``, each row
``[bucket, key, value, peer_index, wall_ms, counter, deleted, sig_base64]``. JSON rather than
msgpack because values are JSON already (each is embedded verbatim in its canonical form, no
re-encoding), the stdlib parser is C-accelerated while the only msgpack at hand is pure Python,
and a frame stays readable in a packet dump. The per-batch peer table keeps the one long field
(the 52-character peer id, which is both the owner and the version's tie-breaker) from repeating
in every row; base64 costs 24 bytes per signature, which the table more than pays back.

Decoding trusts nothing: any malformed input raises :class:`DecodeError` and nothing else.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Iterable, Iterator

from .clock import Version
from .entry import DEFAULT_MAX_VALUE_SIZE, MAX_PEER_ID_LENGTH, Entry
from .errors import DecodeError, LedgerError

FORMAT_VERSION = 1
DEFAULT_MAX_BATCH_SIZE = 1 << 20
DEFAULT_BATCH_BUDGET = 256 * 1024
_ROW_FIELDS = 8


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON data")


def _loads(text: bytes | str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def _row_text(entry: Entry, peer_index: int) -> str:
    return '[{},{},{},{},{},{},{},"{}"]'.format(
        json.dumps(entry.bucket, ensure_ascii=False),
        json.dumps(entry.key, ensure_ascii=False),
        "null" if entry.deleted else entry.value_json,
        peer_index,
        entry.version.wall_ms,
        entry.version.counter,
        1 if entry.deleted else 0,
        base64.b64encode(entry.sig).decode(),
    )


def _assemble(peers: list[str], rows: list[str]) -> bytes:
    head = '{"v":%d,"p":%s,"e":[' % (FORMAT_VERSION, json.dumps(peers))
    return (head + ",".join(rows) + "]}").encode()


def encode_batch(entries: Iterable[Entry]) -> bytes:
    """One batch holding ``entries`` (no size limit; see :func:`split_batches`)."""
    peers: dict[str, int] = {}
    rows = [_row_text(e, peers.setdefault(e.owner, len(peers))) for e in entries]
    return _assemble(list(peers), rows)


def split_batches(entries: Iterable[Entry], max_bytes: int = DEFAULT_BATCH_BUDGET) -> list[bytes]:
    """Encode ``entries`` as consecutive batches of at most ``max_bytes`` each.

    An entry too big for the budget on its own travels alone, in a batch over the budget: the
    value cap, not the batch budget, bounds entry sizes.
    """
    return list(iter_batches(entries, max_bytes))


def iter_batches(entries: Iterable[Entry], max_bytes: int = DEFAULT_BATCH_BUDGET) -> Iterator[bytes]:
    """:func:`split_batches`, one batch at a time: a sender that streams them holds one encoded
    batch, not the encoding of everything it sends (a whole-ledger sync response)."""
    peers: dict[str, int] = {}
    rows: list[str] = []
    size = len(_assemble([], []))
    for entry in entries:
        new_peer = entry.owner not in peers
        row = _row_text(entry, peers.get(entry.owner, len(peers)))
        grow = len(row.encode()) + 1 + (len(json.dumps(entry.owner)) + 1 if new_peer else 0)
        if rows and size + grow > max_bytes:
            yield _assemble(list(peers), rows)
            peers, rows, size = {}, [], len(_assemble([], []))
            new_peer = True
            row = _row_text(entry, 0)
            grow = len(row.encode()) + 1 + len(json.dumps(entry.owner)) + 1
        if new_peer:
            peers[entry.owner] = len(peers)
        rows.append(row)
        size += grow
    if rows:
        yield _assemble(list(peers), rows)


def decode_batch(
    data: bytes, max_size: int = DEFAULT_MAX_BATCH_SIZE, *, max_value_size: int = DEFAULT_MAX_VALUE_SIZE
) -> list[Entry]:
    """The entries of a batch; :class:`DecodeError` for anything malformed or over ``max_size``.

    Signatures are not checked here (the ledger does that against each bucket's policy); every
    field is checked for type and bound.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DecodeError("a batch is bytes")
    if len(data) > max_size:
        raise DecodeError(f"batch of {len(data)} bytes exceeds {max_size}")
    try:
        return _decode(bytes(data), max_value_size)
    except DecodeError:
        raise
    except LedgerError as exc:
        raise DecodeError(f"bad entry: {exc}") from None
    except Exception as exc:  # whatever junk provokes in the parser (ValueError, RecursionError…)
        raise DecodeError(f"malformed batch: {type(exc).__name__}") from None


def _decode(data: bytes, max_value_size: int) -> list[Entry]:
    doc = _loads(data)
    if not isinstance(doc, dict) or set(doc) != {"v", "p", "e"}:
        raise DecodeError("not a ledger batch")
    if doc["v"] != FORMAT_VERSION or type(doc["v"]) is not int:
        raise DecodeError(f"unsupported batch version {doc['v']!r}")
    peers, rows = doc["p"], doc["e"]
    if not isinstance(peers, list) or not all(isinstance(p, str) and 0 < len(p) <= MAX_PEER_ID_LENGTH for p in peers):
        raise DecodeError(f"peer table must be a list of peer ids (at most {MAX_PEER_ID_LENGTH} characters)")
    if not isinstance(rows, list):
        raise DecodeError("entries must be a list")
    entries = []
    for row in rows:
        if not isinstance(row, list) or len(row) != _ROW_FIELDS:
            raise DecodeError("entry row must have 8 fields")
        bucket, key, value, peer_index, wall_ms, counter, deleted, sig = row
        if type(peer_index) is not int or not 0 <= peer_index < len(peers):
            raise DecodeError("peer index out of range")
        if deleted not in (0, 1) or type(deleted) is not int:
            raise DecodeError("deleted must be 0 or 1")
        if not isinstance(sig, str):
            raise DecodeError("sig must be base64 text")
        try:
            raw_sig = base64.b64decode(sig, validate=True)
        except (binascii.Error, ValueError):
            raise DecodeError("sig is not base64") from None
        owner = peers[peer_index]
        entry = Entry(bucket, key, value, owner, Version(wall_ms, counter, owner), bool(deleted), raw_sig)
        entry.validate(max_value_size)
        entries.append(entry)
    return entries
