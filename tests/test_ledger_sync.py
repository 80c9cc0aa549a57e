"""Anti-entropy over real TCP on loopback: divergent ledgers converge, late joiners catch up,
and a peer that breaks the protocol is refused."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_core.identity import Identity
from kairos_core.ledger import (
    Entry,
    Ledger,
    LedgerStore,
    StreamChannel,
    SyncError,
    Version,
    ledger_fingerprint,
    open_ledger,
    sync_ledgers,
)
from kairos_core.ledger.sync import DEFAULT_MAX_FRAME, RANGES

ALICE, BOB, CAROL = (Identity.from_seed(bytes([n]) * 32) for n in (1, 2, 3))


async def connect_pair() -> tuple[StreamChannel, StreamChannel, asyncio.AbstractServer]:
    accepted: asyncio.Future[StreamChannel] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(StreamChannel(reader, writer, DEFAULT_MAX_FRAME))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return StreamChannel(reader, writer, DEFAULT_MAX_FRAME), await accepted, server


@pytest.fixture
async def channels() -> AsyncIterator[tuple[StreamChannel, StreamChannel]]:
    left, right, server = await connect_pair()
    try:
        yield left, right
    finally:
        await left.aclose()
        await right.aclose()
        server.close()
        await server.wait_closed()


async def run_sync(a: Ledger, b: Ledger, channels: tuple[StreamChannel, StreamChannel]):
    return await asyncio.gather(sync_ledgers(a, channels[0]), sync_ledgers(b, channels[1]))


def state(ledger: Ledger) -> dict:
    return {(e.bucket, e.key): (e.version, e.deleted, e.value_json) for e in ledger.entries()}


async def test_divergent_ledgers_converge_without_losing_a_write(tmp_path: Path, channels) -> None:
    rnd = random.Random(7)
    a = open_ledger(ALICE, tmp_path / "a")
    b = open_ledger(BOB, tmp_path / "b")
    written: dict[tuple[str, str], list[Entry]] = {}

    def record(entry: Entry) -> None:
        written.setdefault((entry.bucket, entry.key), []).append(entry)

    # A common past both sides hold, from a third peer.
    now = a.clock.now_ms()
    common = [Entry.signed(CAROL, "user", f"shared{i}", i, Version(now - 10_000, i, CAROL.peer_id)) for i in range(1500)]
    a.apply_remote(common)
    b.apply_remote(common)
    for e in common:
        record(e)
    # Divergent edits: both sides overwrite and delete some shared keys, and add their own.
    for i in range(1500):
        roll = rnd.random()
        if roll < 0.2:
            record(a.set("user", f"shared{i}", {"by": "a", "i": i}))
        elif roll < 0.3:
            record(a.delete("user", f"shared{i}"))
        roll = rnd.random()
        if roll < 0.2:
            record(b.set("user", f"shared{i}", {"by": "b", "i": i}))
        elif roll < 0.3:
            record(b.delete("user", f"shared{i}"))
    for i in range(1200):
        record(a.set("user", f"a-only{i}", i))
        record(b.set("user", f"b-only{i}", i))
    record(a.set("nodes", ALICE.peer_id, {"host": "a"}))
    record(b.set("nodes", BOB.peer_id, {"host": "b"}))

    ra, rb = await run_sync(a, b, channels)

    assert state(a) == state(b)
    # No write lost that a later write did not supersede: the survivor of each key is its latest.
    for ident, history in written.items():
        winner = max(history, key=lambda e: e.version)
        held = a.get_entry(*ident)
        assert held is not None and held.version == winner.version and held.value == winner.value
    assert len(a) == len(written)
    assert ra.entries_sent == rb.entries_applied and rb.entries_sent == ra.entries_applied
    assert a.counters["rejected_signature"] == b.counters["rejected_signature"] == 0
    # The converged state is on disk, too.
    a.close()
    again = open_ledger(ALICE, tmp_path / "a")
    assert state(again) == state(b)
    again.close()
    b.close()


async def test_a_second_session_finds_nothing_to_do_and_exchanges_only_the_roots(channels) -> None:
    a = Ledger(ALICE, LedgerStore(":memory:"))
    b = Ledger(BOB, LedgerStore(":memory:"))
    for i in range(300):
        a.set("user", f"k{i}", i)
    first, _ = await run_sync(a, b, channels)
    assert first.entries_sent == 300 and first.versions_sent == 0  # b was empty: no version lists
    second, third = await run_sync(a, b, channels)
    assert second.differing_ranges == third.differing_ranges == 0
    assert second.entries_sent == third.entries_sent == 0
    # one 17-byte frame each way, where the digest of 300 entries' ranges is ~3.5 KB
    assert second.bytes_sent == second.bytes_received == third.bytes_sent == 17
    assert first.bytes_sent > 3000
    a.set("user", "k1", "changed")
    fourth, _ = await run_sync(a, b, channels)
    assert fourth.differing_ranges == 1 and fourth.entries_sent == 1 and b.get("user", "k1") == "changed"


async def test_the_legacy_protocol_starts_at_the_digest_and_converges(channels) -> None:
    a = Ledger(ALICE, LedgerStore(":memory:"))
    b = Ledger(BOB, LedgerStore(":memory:"))
    for i in range(40):
        a.set("user", f"a{i}", i)
        b.set("user", f"b{i}", i)
    ra, rb = await asyncio.gather(
        sync_ledgers(a, channels[0], compare_roots=False), sync_ledgers(b, channels[1], compare_roots=False)
    )
    assert ra.entries_received == rb.entries_received == 40
    assert state(a) == state(b)
    again, _ = await asyncio.gather(
        sync_ledgers(a, channels[0], compare_roots=False), sync_ledgers(b, channels[1], compare_roots=False)
    )
    assert again.differing_ranges == 0 and again.bytes_sent > 17  # the whole digest, as 0.1.0 sends it


async def test_fingerprints_agree_exactly_when_a_sync_has_nothing_to_do(channels) -> None:
    a = Ledger(ALICE, LedgerStore(":memory:"))
    b = Ledger(BOB, LedgerStore(":memory:"))
    assert ledger_fingerprint(a) == ledger_fingerprint(b)  # both empty
    for i in range(50):
        a.set("user", f"k{i}", i)
    before = ledger_fingerprint(a)
    assert before != ledger_fingerprint(b)
    await run_sync(a, b, channels)
    assert ledger_fingerprint(a) == ledger_fingerprint(b) == before
    # a rewrite with the same value is a new version: the fingerprint moves (the cache too)
    a.set("user", "k1", 1)
    assert ledger_fingerprint(a) != ledger_fingerprint(b)
    b.delete("user", "k2")
    second, _ = await run_sync(a, b, channels)
    assert second.differing_ranges > 0
    assert ledger_fingerprint(a) == ledger_fingerprint(b) != before


async def test_only_newer_entries_cross_in_shared_ranges(channels) -> None:
    a = Ledger(ALICE, LedgerStore(":memory:"))
    b = Ledger(BOB, LedgerStore(":memory:"))
    for i in range(1000):
        a.set("user", f"k{i}", i)
    await run_sync(a, b, channels)
    a.set("user", "k5", "new")
    b.set("user", "k7", "newer on b")
    ra, rb = await run_sync(a, b, channels)
    assert (ra.entries_sent, rb.entries_sent) == (1, 1)
    assert b.get("user", "k5") == "new" and a.get("user", "k7") == "newer on b"


@pytest.mark.slow
async def test_a_late_joiner_catches_up_on_10000_entries(channels) -> None:
    veteran = Ledger(ALICE, LedgerStore(":memory:"))
    now = veteran.clock.now_ms()
    writers = [ALICE, BOB, CAROL]
    veteran.apply_remote(
        Entry.signed(w, "user", f"key-{n}-{i}", {"i": i, "w": n}, Version(now - 1000, i, w.peer_id))
        for n, w in enumerate(writers)
        for i in range(3334)
    )
    assert len(veteran) == 10002
    joiner = Ledger(BOB, LedgerStore(":memory:"))
    _, got = await run_sync(veteran, joiner, channels)
    assert got.entries_applied == 10002
    assert state(joiner) == state(veteran)


async def test_forged_entries_in_a_session_are_rejected_but_the_rest_lands(channels) -> None:
    a = Ledger(ALICE, LedgerStore(":memory:"))
    b = Ledger(BOB, LedgerStore(":memory:"))
    good = a.set("user", "good", 1)
    # Smuggle a forged entry into a's memory (as a corrupted peer would hold it).
    forged = Entry("user", "evil", 2, CAROL.peer_id, Version(good.version.wall_ms, 0, CAROL.peer_id), False, good.sig)
    a._buckets["user"]["evil"] = forged
    await run_sync(a, b, channels)
    assert b.get("user", "good") == 1 and b.get("user", "evil") is None
    assert b.counters["rejected_signature"] == 1


_OTHER_ROOT = b"R" + bytes(16)  # no ledger's root: the session goes on to the digest
# A compact digest (version 2) with every range present and differing from any real ledger's.
_EVERY_RANGE = b"D\x02" + b"\xff" * 32 + b"\x01" * (RANGES * 16)


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        ([b"garbage"], "expected a root frame"),
        ([b"R" + bytes(15)], "expected a root frame"),
        ([_OTHER_ROOT, b"garbage"], "expected a digest frame"),
        ([_OTHER_ROOT, b"D\x02" + b"\x00" * 10], "digest frame too short"),
        ([_OTHER_ROOT, b"D\x09" + b"\x00" * (RANGES * 16)], "unsupported sync version 9"),
        ([_OTHER_ROOT, b"D\x02" + b"\xff" * 32 + b"\x01" * 16], "does not match its bitmap"),
        ([_OTHER_ROOT, _EVERY_RANGE, b"V{not json"], "not JSON"),
        ([_OTHER_ROOT, _EVERY_RANGE, b'V{"p":[],"r":[["b","k",-1,0,0]]}'], "malformed version row"),
        ([_OTHER_ROOT, _EVERY_RANGE, b"v", b"E{not a batch"], "bad entries frame"),
        ([_OTHER_ROOT, _EVERY_RANGE, b"v", b"X"], "expected an entries frame"),
    ],
)
async def test_protocol_violations_raise_sync_error_and_are_counted(channels, frames, error) -> None:
    ledger = Ledger(ALICE, LedgerStore(":memory:"))
    for i in range(50):
        ledger.set("user", f"k{i}", i)
    left, right = channels

    async def misbehave() -> None:
        for frame in frames:
            await right.send(frame)
        await asyncio.sleep(5)  # and then go quiet, holding the stream open

    peer = asyncio.create_task(misbehave())
    try:
        with pytest.raises(SyncError, match=error):
            await sync_ledgers(ledger, left, timeout=5)
    finally:
        peer.cancel()
    assert ledger.counters["sync_errors"] == 1


async def test_an_oversized_frame_is_refused_before_it_is_read(channels) -> None:
    left, right = channels
    right.writer.write((DEFAULT_MAX_FRAME + 1).to_bytes(4, "big"))
    await right.writer.drain()
    with pytest.raises(SyncError, match="exceeds"):
        await left.recv()


async def test_a_silent_peer_times_out(channels) -> None:
    ledger = Ledger(ALICE, LedgerStore(":memory:"))
    with pytest.raises(TimeoutError):
        await sync_ledgers(ledger, channels[0], timeout=0.2)


async def test_frames_follow_the_channel_limit_and_oversized_entries_do_not_break_sessions() -> None:
    left, right, server = await connect_pair()
    left.max_frame = right.max_frame = 8192
    try:
        a = Ledger(ALICE, LedgerStore(":memory:"))
        b = Ledger(BOB, LedgerStore(":memory:"))
        for i in range(200):
            a.set("user", f"k{i}", "v" * 100)
        a.set("user", "fits", "x" * 6000)
        a.set("user", "too-big", "x" * 9000)
        ra, _ = await asyncio.gather(sync_ledgers(a, left), sync_ledgers(b, right))
        assert ra.entries_skipped == 1 and ra.entries_sent == 201
        assert len(b) == 201 and b.get("user", "too-big") is None
        assert b.get("user", "fits") == "x" * 6000
        assert ra.bytes_sent > 8192 * 3  # several frames, each within the limit
    finally:
        await left.aclose()
        await right.aclose()
        server.close()
        await server.wait_closed()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.just(bytes(16)), st.binary(min_size=16, max_size=16)), min_size=256, max_size=256))
def test_compact_digest_round_trips(ranges):
    from kairos_core.ledger.sync import pack_digest, unpack_digest

    digest = b"".join(ranges)
    packed = pack_digest(digest)
    assert unpack_digest(packed) == digest
    assert len(packed) == 32 + 16 * sum(r != bytes(16) for r in ranges)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_compact_digest_garbage_is_a_sync_error(data):
    from kairos_core.ledger.sync import unpack_digest

    try:
        assert len(unpack_digest(data)) == 256 * 16
    except SyncError:
        pass


def _versions_frame(peers: list, rows: list) -> bytes:
    import json

    # json.dumps writes a lone surrogate as the escape "\ud800", which json.loads turns back
    # into one: exactly what a hostile peer sends.
    return b"V" + json.dumps({"p": peers, "r": rows}).encode()


@pytest.mark.parametrize(
    "peers, row",
    [
        (["p"], ["\ud800", "k", 1, 0, 0]),  # a lone surrogate: UnicodeEncodeError in range_of
        (["p"], ["b", "k\udfff", 1, 0, 0]),
        (["p"], ["b\x00", "k", 1, 0, 0]),  # NUL, empty and over-long names are not keys either
        (["p"], ["", "k", 1, 0, 0]),
        (["p"], ["b", "k" * 513, 1, 0, 0]),
        (["p\ud800"], ["b", "k", 1, 0, 0]),  # nor are peer ids that are not text, or too long
        (["p" * 129], ["b", "k", 1, 0, 0]),
        ([""], ["b", "k", 1, 0, 0]),
    ],
)
def test_invalid_names_in_a_versions_frame_are_a_sync_error(peers, row) -> None:
    from kairos_core.ledger.sync import _decode_versions

    with pytest.raises(SyncError, match="malformed"):
        _decode_versions(_versions_frame(peers, [row])[1:])


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters(codec=None)),
        lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.sampled_from(["p", "r", "x"]), inner, max_size=3),
        max_leaves=20,
    )
)
def test_any_versions_payload_decodes_or_raises_sync_error(doc) -> None:
    import json

    from kairos_core.ledger.sync import _decode_versions, range_of

    for payload in (json.dumps(doc).encode(), json.dumps({"p": ["p"], "r": [doc]}).encode()):
        try:
            rows = _decode_versions(payload)
        except SyncError:
            continue
        for bucket, key, _version in rows:
            range_of(bucket, key)  # what the session does next with each row


async def test_a_lone_surrogate_in_a_versions_frame_ends_the_session_as_a_counted_sync_error(channels) -> None:
    from kairos_core.ledger.sync import _ROOT, _WIRE_VERSION

    ledger = Ledger(ALICE, LedgerStore(":memory:"))
    for i in range(50):
        ledger.set("user", f"k{i}", i)
    left, right = channels
    every_range = b"\xff" * 32 + b"\x01" * (RANGES * 16)  # bitmap: all present, all differing

    async def misbehave() -> None:
        await right.send(_ROOT + bytes(16))  # not the ledger's root: the session goes on to the digest
        await right.send(b"D" + bytes([_WIRE_VERSION]) + every_range)
        await right.send(_versions_frame(["p"], [["\ud800", "k", 1, 0, 0]]))
        await asyncio.sleep(5)

    peer = asyncio.create_task(misbehave())
    try:
        with pytest.raises(SyncError, match="malformed version row"):
            await sync_ledgers(ledger, left, timeout=5)
    finally:
        peer.cancel()
    assert ledger.counters["sync_errors"] == 1
