"""OTP key schedule and AEAD sealing: rotation tolerance, tampering, cross-network isolation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_core.keys import KeySchedule, otp, window
from kairos_core.seal import (
    OVERHEAD,
    AuthenticationFailed,
    FrameTooLarge,
    FrameTooShort,
    ReplayedFrame,
    SealError,
    Sealer,
    UnknownVersion,
    WindowNotAccepted,
)
from kairos_core.token import generate_token

TOKEN = generate_token(interval=360)
OTHER_TOKEN = generate_token(interval=360)
BASE = 1_790_000_000.0  # a fixed instant; windows are computed from it


def sealer(token=TOKEN, topic=None):
    return Sealer(KeySchedule(token), topic=topic)


def test_window_boundaries():
    assert window(0, 360) == 0
    assert window(359.999, 360) == 0
    assert window(360, 360) == 1
    assert window(BASE, 2**63 - 1) == 0


def test_derivations_are_distinct_and_deterministic():
    a, b = KeySchedule(TOKEN), KeySchedule(TOKEN)
    w = a.seal_window(BASE)
    assert a.seal_key(w) == b.seal_key(w)
    assert a.seal_key(w) != a.seal_key(w + 1)
    assert a.rendezvous(w) == b.rendezvous(w) and len(a.rendezvous(w)) == 32
    assert a.rendezvous(w) != a.rendezvous(w + 1)
    # one secret never yields another purpose's value
    assert a.seal_key(w).hex()[:32] != a.rendezvous(w)
    assert a.admission_key != a.seal_key(w)
    assert a.topic == b.topic and a.topic != KeySchedule(OTHER_TOKEN).topic
    assert otp("k", 1) != otp("k", 2) and len(otp("k", 1)) == 32


def test_topic_does_not_rotate():
    schedule = KeySchedule(TOKEN, clock=lambda: BASE)
    later = KeySchedule(TOKEN, clock=lambda: BASE + 10 * 360)
    assert schedule.topic == later.topic


def test_current_rendezvous_is_this_and_previous_window():
    schedule = KeySchedule(TOKEN)
    w = schedule.dht_window(BASE)
    assert schedule.current_rendezvous(BASE) == (schedule.rendezvous(w), schedule.rendezvous(w - 1))


@settings(max_examples=200, deadline=None)
@given(
    payload=st.binary(max_size=4096),
    start=st.floats(min_value=0, max_value=3600),
    offset=st.floats(min_value=-359.0, max_value=359.0),
)
def test_round_trip_across_window_boundaries_with_clock_offsets(payload, start, offset):
    sender, receiver = sealer(), sealer()
    sent_at = BASE + start
    frame = sender.seal(payload, now=sent_at)
    assert receiver.open(frame, now=sent_at + offset) == payload


@settings(max_examples=200, deadline=None)
@given(payload=st.binary(min_size=1, max_size=512), data=st.data())
def test_any_single_flipped_bit_is_rejected(payload, data):
    frame = bytearray(sealer().seal(payload, now=BASE))
    bit = data.draw(st.integers(min_value=0, max_value=len(frame) * 8 - 1))
    frame[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(SealError):
        sealer().open(bytes(frame), now=BASE)


@settings(max_examples=50, deadline=None)
@given(payload=st.binary(max_size=512))
def test_frame_of_another_token_or_topic_is_rejected(payload):
    frame = sealer(OTHER_TOKEN).seal(payload, now=BASE)
    with pytest.raises(AuthenticationFailed):
        sealer().open(frame, now=BASE)
    frame = sealer(topic="/kairos/1/elsewhere").seal(payload, now=BASE)
    with pytest.raises(AuthenticationFailed):
        sealer().open(frame, now=BASE)


def test_windows_outside_tolerance_are_refused():
    frame = sealer().seal(b"x", now=BASE)
    with pytest.raises(WindowNotAccepted):
        sealer().open(frame, now=BASE + 3 * 360)
    with pytest.raises(WindowNotAccepted):
        sealer().open(frame, now=BASE - 3 * 360)


def test_replay_size_and_version_checks():
    opener = sealer()
    frame = sealer().seal(b"hello", now=BASE)
    assert opener.open(frame, now=BASE) == b"hello"
    with pytest.raises(ReplayedFrame):
        opener.open(frame, now=BASE)
    with pytest.raises(FrameTooShort):
        opener.open(frame[: OVERHEAD - 1], now=BASE)
    with pytest.raises(UnknownVersion):
        opener.open(b"\x09" + frame[1:], now=BASE)
    small = Sealer(KeySchedule(TOKEN), max_frame_size=1024)
    with pytest.raises(FrameTooLarge):
        small.seal(b"x" * 1024, now=BASE)
    with pytest.raises(FrameTooLarge):
        small.open(b"\x01" * 2048, now=BASE)


def test_forged_frame_does_not_occupy_replay_memory():
    opener = sealer()
    good = sealer().seal(b"ok", now=BASE)
    forged = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(AuthenticationFailed):
        opener.open(forged, now=BASE)
    assert opener.open(good, now=BASE) == b"ok"  # same nonce, still accepted once authentic


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_raises_only_seal_errors(data):
    try:
        sealer().open(data, now=BASE)
    except SealError as exc:
        assert exc.reason


def test_no_window_before_zero():
    with pytest.raises(ValueError):
        otp("k", -1)
