"""Session keys, the replay window and key epochs."""

from __future__ import annotations

import threading

import pytest
from cryptography.exceptions import InvalidTag
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_plugin_tunvpn.crypto import (
    ReceiveState,
    ReplayWindow,
    SendState,
    SessionKeys,
    derive,
    next_epoch_key,
    nonce_for,
)

SECRET = b"s" * 32


def test_session_keys_are_mirrored_and_directional():
    a = SessionKeys.derive(SECRET, "peer-a", "peer-b")
    b = SessionKeys.derive(SECRET, "peer-b", "peer-a")
    assert a.send_key == b.receive_key and a.receive_key == b.send_key
    assert a.send_key_id == b.receive_key_id and a.receive_key_id == b.send_key_id
    assert a.send_key != a.receive_key and a.send_key_id != a.receive_key_id
    assert a.mirror() == b
    assert SessionKeys.derive(b"t" * 32, "peer-a", "peer-b").send_key != a.send_key


def test_the_key_derivation_is_pinned():
    # The derived keys are the wire format: a change here is a protocol break between versions.
    # RFC 5869, test case 3 (SHA-256, no salt, no info): the helper is plain HKDF-SHA256.
    assert derive(b"\x0b" * 22, b"", 42).hex() == (
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"
    )
    assert derive(b"kairos-ikm", b"kairos/v1/tunvpn/test").hex() == (
        "5446f5e1a9a9351e6f134e2b220c30d391da03d31eca23bdb69d1cf2f829c362"
    )
    assert derive(b"kairos-ikm", b"kairos/v1/tunvpn/test", 4).hex() == "5446f5e1"
    secret = bytes(range(32))
    keys = SessionKeys.derive(secret, "12D3KooWA", "12D3KooWB")
    assert keys.send_key.hex() == "d93b0756b5373e0b9a7ba19a611aee34a3777088afa9285617eab5ea96a2292a"
    assert keys.receive_key.hex() == "0aff321f315304813f3473686f2829ca1c92ce7b18e78c040a6d9a680d1a7ec8"
    assert (keys.send_key_id, keys.receive_key_id) == (1791664736, 699718852)
    assert next_epoch_key(secret).hex() == "a5af428c8d3c5a4338ecda807dee711252f20f53e914acbdbb08a934a0f1816d"


def test_session_keys_refuse_weak_inputs():
    with pytest.raises(ValueError):
        SessionKeys.derive(b"short", "a", "b")
    with pytest.raises(ValueError):
        SessionKeys.derive(SECRET, "a", "a")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=6000), max_size=300), st.sampled_from([1, 64, 2048]))
def test_replay_window_matches_a_model(counters, size):
    window = ReplayWindow(size)
    seen: set[int] = set()
    highest = -1
    for counter in counters:
        expected = counter not in seen and counter > highest - size
        assert window.accept(counter) == expected
        if expected:
            seen.add(counter)
            highest = max(highest, counter)


def test_replay_window_check_does_not_record():
    window = ReplayWindow()
    assert window.check(5) and window.check(5)
    window.update(5)
    assert not window.check(5)
    assert window.check(4) and not window.check(5 - 2048)


def seal(send: SendState, plaintext: bytes) -> tuple[int, int, bytes]:
    epoch, aead, counter, _, _ = send.reserve(1)
    return epoch & 0xFF, counter, aead.encrypt(nonce_for(send.key_id, counter), plaintext, b"")


def test_reserve_hands_out_each_nonce_once_across_threads():
    """Several TUN queues seal for one peer at once: no (epoch, counter) may be handed out twice."""
    send = SendState(SessionKeys.derive(SECRET, "a", "b"), rekey_after_packets=1000)
    taken: list[tuple[int, int]] = []
    lock = threading.Lock()

    def reserve_many() -> None:
        mine = []
        for _ in range(500):
            epoch, _aead, first, _, _ = send.reserve(7)
            mine.extend((epoch, first + i) for i in range(7))
        with lock:
            taken.extend(mine)

    threads = [threading.Thread(target=reserve_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(taken) == 4 * 500 * 7
    assert len(set(taken)) == len(taken)
    assert max(counter for _, counter in taken) < 1000  # a batch never runs past the rekey limit
    assert send.epoch >= 13  # 14,000 packets at ≤ 1,000 per epoch


def test_reserve_rekeys_before_a_batch_would_pass_the_limit():
    send = SendState(SessionKeys.derive(SECRET, "a", "b"), rekey_after_packets=10)
    assert send.reserve(8)[2:4] == (0, False)
    epoch, _, first, rekeyed, fast = send.reserve(3)
    assert (epoch, first, rekeyed) == (1, 0, True) and fast is send.fast
    assert send.reserve(7)[1:4] == (send.aead, 3, False)


def open_(receive: ReceiveState, epoch_byte: int, counter: int, ciphertext: bytes) -> bytes | None:
    epoch = receive.epoch_for(epoch_byte)
    if epoch is None or not epoch.window.check(counter):
        return None
    try:
        plaintext = epoch.aead.decrypt(nonce_for(receive.key_id, counter), ciphertext, b"")
    except InvalidTag:
        return None
    epoch.window.update(counter)
    receive.confirm(epoch)
    return plaintext


def test_rekeying_by_packets_keeps_traffic_flowing_and_old_epochs_die():
    keys = SessionKeys.derive(SECRET, "a", "b")
    send = SendState(keys, rekey_after_packets=3)
    receive = ReceiveState(keys.mirror())
    sealed = [seal(send, bytes([i])) for i in range(10)]
    assert send.epoch == 3  # 10 packets, 3 per epoch
    # delivered out of order across the epoch switch: the previous epoch is still accepted
    order = [0, 1, 3, 2, 4, 6, 5, 7, 8, 9]
    assert [open_(receive, *sealed[i]) for i in order] == [bytes([i]) for i in order]
    assert receive.current.number == 3
    assert open_(receive, *sealed[0]) is None  # epoch 0 is gone, and its packet was a replay anyway
    assert open_(receive, *sealed[9]) is None  # replay within the current epoch


def test_rekeying_by_time():
    now = [0.0]
    keys = SessionKeys.derive(SECRET, "a", "b")
    send = SendState(keys, rekey_after_seconds=10, clock=lambda: now[0])
    receive = ReceiveState(keys.mirror())
    first = seal(send, b"one")
    now[0] = 11.0
    second = seal(send, b"two")
    assert (first[0], second[0]) == (0, 1)
    assert second[1] == 0  # the counter restarts with the new key
    assert open_(receive, *second) == b"two" and open_(receive, *first) == b"one"


def test_a_forged_packet_does_not_move_the_window_or_the_epoch():
    keys = SessionKeys.derive(SECRET, "a", "b")
    receive = ReceiveState(keys.mirror())
    forged = SendState(SessionKeys.derive(b"x" * 32, "a", "b"))
    forged.advance()
    epoch_byte, counter, ciphertext = seal(forged, b"evil")
    assert open_(receive, epoch_byte, counter, ciphertext) is None
    assert receive.current.number == 0 and receive.current.window.highest == -1
