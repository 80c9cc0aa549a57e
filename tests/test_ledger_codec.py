"""Gossip batches: round trip, byte budget, and robustness to any garbage."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kairos_core.identity import Identity
from kairos_core.ledger import DecodeError, DeltaBatcher, Entry, Version, decode_batch, encode_batch, split_batches

PEERS = [Identity.from_seed(bytes([n]) * 32) for n in range(1, 4)]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63)
    | st.text(max_size=10)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10,
)


@st.composite
def entries(draw) -> Entry:
    identity = draw(st.sampled_from(PEERS))
    deleted = draw(st.booleans())
    version = Version(draw(st.integers(0, 2**53 - 1)), draw(st.integers(0, 2**32 - 1)), identity.peer_id)
    bucket = draw(st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s))
    key = draw(st.text(min_size=1, max_size=40).filter(lambda s: "\x00" not in s))
    value = None if deleted else json.loads(json.dumps(draw(json_values)))
    return Entry.signed(identity, bucket, key, value, version, deleted)


@settings(max_examples=150, deadline=None)
@given(st.lists(entries(), max_size=8))
def test_round_trip_keeps_every_field_and_signature(batch: list[Entry]) -> None:
    decoded = decode_batch(encode_batch(batch))
    assert decoded == batch
    assert all(e.verify() for e in decoded)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    try:
        decode_batch(data)
    except DecodeError:
        pass


def json_garbage():
    return st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=9)
            | st.dictionaries(st.sampled_from(["v", "p", "e", "x"]) | st.text(max_size=3), inner, max_size=4)
        ),
        max_leaves=25,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_garbage())
def test_structured_garbage_raises_only_decode_error(doc) -> None:
    try:
        data = json.dumps(doc).encode()
    except (ValueError, RecursionError):
        return
    try:
        decode_batch(data)
    except DecodeError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(entries(), min_size=1, max_size=3), st.data())
def test_mutated_batches_raise_decode_error_or_decode_to_checkable_entries(batch, data) -> None:
    raw = bytearray(encode_batch(batch))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    try:
        decoded = decode_batch(bytes(raw))
    except DecodeError:
        return
    for entry in decoded:  # whatever survives decoding must still be safe to verify
        assert isinstance(entry.verify(), bool)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"[]",
        b"{}",
        b'{"v":1,"p":[],"e":{}}',
        b'{"v":2,"p":[],"e":[]}',
        b'{"v":true,"p":[],"e":[]}',
        b'{"v":1,"p":["x"],"e":[["b","k",1,1,0,0,0,"AA=="]]}',
        b'{"v":1,"p":["x"],"e":[["b","k",NaN,0,0,0,0,"AA=="]]}',
        b'{"v":1,"p":["x"],"e":[["b","k",1e999,0,0,0,0,"AA=="]]}',
        b"[" * 100000,
        b'{"v":1,"p":[],"e":[]}' + b" " * 10,
        b'{"v":1,"p":["x"],"e":[["b","k",' + b"9" * 5000 + b',0,0,0,0,"AA=="]]}',
        b"\xff\xfe",
    ],
)
def test_known_nasty_inputs(data: bytes) -> None:
    if data == b'{"v":1,"p":[],"e":[]}' + b" " * 10:
        assert decode_batch(data) == []
        return
    with pytest.raises(DecodeError):
        decode_batch(data)


def test_size_limit_is_checked_before_parsing() -> None:
    batch = encode_batch([Entry.signed(PEERS[0], "b", "k", "x" * 500, Version(1, 0, PEERS[0].peer_id))])
    assert len(decode_batch(batch, max_size=len(batch))) == 1
    with pytest.raises(DecodeError, match="exceeds"):
        decode_batch(batch, max_size=len(batch) - 1)


def test_decoding_enforces_the_value_cap() -> None:
    batch = encode_batch([Entry.signed(PEERS[0], "b", "k", "x" * 500, Version(1, 0, PEERS[0].peer_id))])
    with pytest.raises(DecodeError):
        decode_batch(batch, max_value_size=100)


def test_peer_table_keeps_batches_compact() -> None:
    peer = PEERS[0]
    many = [Entry.signed(peer, "nodes", f"k{i}", i, Version(10**12, i, peer.peer_id)) for i in range(100)]
    assert encode_batch(many).count(peer.peer_id.encode()) == 1


@settings(max_examples=40, deadline=None)
@given(st.lists(entries(), max_size=30), st.integers(300, 3000))
def test_split_batches_respect_the_budget_and_keep_order(batch: list[Entry], budget: int) -> None:
    parts = split_batches(batch, budget)
    decoded = [e for part in parts for e in decode_batch(part)]
    assert decoded == batch
    for part in parts:
        assert len(part) <= budget or len(decode_batch(part)) == 1


async def test_delta_batcher_coalesces_a_burst_into_few_batches() -> None:
    sent: list[bytes] = []

    async def publish(data: bytes) -> None:
        sent.append(data)

    batcher = DeltaBatcher(publish, delay=0.01, max_bytes=4096)
    peer = PEERS[0]
    for i in range(60):
        batcher.add(Entry.signed(peer, "user", f"k{i % 50}", "v" * 40, Version(10**12, i, peer.peer_id)))
    assert sent == []  # nothing leaves before the window closes
    await asyncio.sleep(0.05)
    await batcher.aclose()
    got = [e for data in sent for e in decode_batch(data)]
    assert 1 < len(sent) < 10 and all(len(d) <= 4096 for d in sent)
    # Keys written twice go out once, at their latest version.
    assert len(got) == 50
    assert {e.key: e.version.counter for e in got}["k3"] == 53


async def test_delta_batcher_survives_a_failing_publisher() -> None:
    calls = []

    def publish(data: bytes) -> None:
        calls.append(data)
        raise ConnectionError("no peers")

    batcher = DeltaBatcher(publish, delay=0.001)
    batcher.add(Entry.signed(PEERS[0], "u", "k", 1, Version(1, 0, PEERS[0].peer_id)))
    await batcher.aclose()
    assert len(calls) == 1 and batcher.batches_sent == 0


def test_a_value_nested_past_the_bound_is_a_decode_error() -> None:
    from kairos_core.ledger.entry import MAX_VALUE_DEPTH

    peer = PEERS[0]
    good = encode_batch([Entry.signed(peer, "b", "k", "PLACEHOLDER", Version(1, 0, peer.peer_id))])
    for depth, ok in ((MAX_VALUE_DEPTH, True), (MAX_VALUE_DEPTH + 1, False), (600, False)):
        data = good.replace(b'"PLACEHOLDER"', b"[" * depth + b"]" * depth)
        if ok:
            assert len(decode_batch(data)) == 1
        else:
            with pytest.raises(DecodeError, match="nested"):
                decode_batch(data)
