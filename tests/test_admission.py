"""Admission: the MAC (pure) and the handshake over an in-memory channel (no libp2p)."""

from __future__ import annotations

import asyncio

import pytest

from kairos_core.identity import Identity
from kairos_core.p2p.admission import (
    NONCE_SIZE,
    ROLE_DIALLER,
    ROLE_LISTENER,
    admission_proof,
    admit_as_dialler,
    admit_as_listener,
    fresh_nonce,
    proof_message,
    verify_admission_proof,
)
from kairos_core.p2p.errors import AdmissionError

KEY = b"k" * 32
OTHER_KEY = b"x" * 32
DIALLER = Identity.generate().peer_id
LISTENER = Identity.generate().peer_id
THIRD = Identity.generate().peer_id


def test_right_proof_verifies() -> None:
    nonce = fresh_nonce()
    proof = admission_proof(KEY, ROLE_DIALLER, nonce, DIALLER, LISTENER)
    assert verify_admission_proof(KEY, ROLE_DIALLER, nonce, DIALLER, LISTENER, proof)


def test_wrong_key_fails() -> None:
    nonce = fresh_nonce()
    proof = admission_proof(OTHER_KEY, ROLE_DIALLER, nonce, DIALLER, LISTENER)
    assert not verify_admission_proof(KEY, ROLE_DIALLER, nonce, DIALLER, LISTENER, proof)


def test_swapped_ids_fail() -> None:
    nonce = fresh_nonce()
    proof = admission_proof(KEY, ROLE_DIALLER, nonce, DIALLER, LISTENER)
    assert not verify_admission_proof(KEY, ROLE_DIALLER, nonce, LISTENER, DIALLER, proof)


def test_relayed_to_third_peer_fails() -> None:
    nonce = fresh_nonce()
    proof = admission_proof(KEY, ROLE_DIALLER, nonce, DIALLER, LISTENER)
    assert not verify_admission_proof(KEY, ROLE_DIALLER, nonce, DIALLER, THIRD, proof)


def test_replayed_nonce_fails() -> None:
    old_nonce, new_nonce = fresh_nonce(), fresh_nonce()
    recorded = admission_proof(KEY, ROLE_DIALLER, old_nonce, DIALLER, LISTENER)
    assert not verify_admission_proof(KEY, ROLE_DIALLER, new_nonce, DIALLER, LISTENER, recorded)


def test_reflected_role_fails() -> None:
    nonce = fresh_nonce()
    listener_proof = admission_proof(KEY, ROLE_LISTENER, nonce, DIALLER, LISTENER)
    assert not verify_admission_proof(KEY, ROLE_DIALLER, nonce, DIALLER, LISTENER, listener_proof)


@pytest.mark.parametrize("proof", [b"", b"\x00" * 31, b"\x00" * 33, b"\xff" * 32])
def test_garbage_proof_fails_without_raising(proof: bytes) -> None:
    assert not verify_admission_proof(KEY, ROLE_DIALLER, fresh_nonce(), DIALLER, LISTENER, proof)


def test_junk_peer_id_fails_without_raising() -> None:
    assert not verify_admission_proof(KEY, ROLE_DIALLER, fresh_nonce(), "0OIl not base58", LISTENER, b"\x00" * 32)


def test_encoding_is_unambiguous() -> None:
    nonce = b"\x01" * NONCE_SIZE
    message = proof_message(ROLE_DIALLER, nonce, DIALLER, LISTENER)
    assert message.startswith(b"kairos/admit/v1D" + nonce)
    assert proof_message(ROLE_DIALLER, nonce, LISTENER, DIALLER) != message
    with pytest.raises(ValueError):
        proof_message(ROLE_DIALLER, b"short", DIALLER, LISTENER)


class _Pipe:
    """One end of an in-memory duplex byte channel."""

    def __init__(self, inbox: asyncio.Queue, outbox: asyncio.Queue) -> None:
        self._inbox, self._outbox, self._pending = inbox, outbox, b""

    async def read(self, n: int) -> bytes:
        if not self._pending:
            self._pending = await self._inbox.get()
        data, self._pending = self._pending[:n], self._pending[n:]
        return data

    async def write(self, data: bytes) -> None:
        await self._outbox.put(data)


def _pipe_pair() -> tuple[_Pipe, _Pipe]:
    a_to_b: asyncio.Queue = asyncio.Queue()
    b_to_a: asyncio.Queue = asyncio.Queue()
    return _Pipe(b_to_a, a_to_b), _Pipe(a_to_b, b_to_a)


async def test_handshake_succeeds_with_the_same_key() -> None:
    dialler_end, listener_end = _pipe_pair()
    await asyncio.wait_for(
        asyncio.gather(
            admit_as_dialler(dialler_end, KEY, DIALLER, LISTENER),
            admit_as_listener(listener_end, KEY, DIALLER, LISTENER),
        ),
        5,
    )


async def test_handshake_fails_on_both_sides_with_another_key() -> None:
    dialler_end, listener_end = _pipe_pair()
    listener = asyncio.create_task(admit_as_listener(listener_end, KEY, DIALLER, LISTENER))
    with pytest.raises(AdmissionError):
        await asyncio.wait_for(admit_as_dialler(dialler_end, OTHER_KEY, DIALLER, LISTENER), 5)
    # the dialler gave up after the bad listener proof: the listener gets no proof and hangs up
    await dialler_end.write(b"")
    with pytest.raises(AdmissionError):
        await asyncio.wait_for(listener, 5)


async def test_listener_refuses_a_dialler_that_replays_an_old_proof() -> None:
    dialler_end, listener_end = _pipe_pair()
    listener = asyncio.create_task(admit_as_listener(listener_end, KEY, DIALLER, LISTENER))
    await dialler_end.write(bytes([1]) + fresh_nonce())
    await dialler_end.read(64)  # the listener's fresh nonce and proof
    stale = admission_proof(KEY, ROLE_DIALLER, fresh_nonce(), DIALLER, LISTENER)
    await dialler_end.write(stale)
    with pytest.raises(AdmissionError, match="does not hold"):
        await asyncio.wait_for(listener, 5)


async def test_listener_refuses_garbage_and_unknown_version() -> None:
    dialler_end, listener_end = _pipe_pair()
    listener = asyncio.create_task(admit_as_listener(listener_end, KEY, DIALLER, LISTENER))
    await dialler_end.write(b"\x07" + b"\x00" * NONCE_SIZE)
    with pytest.raises(AdmissionError, match="version"):
        await asyncio.wait_for(listener, 5)


async def test_listener_refuses_a_truncated_hello() -> None:
    dialler_end, listener_end = _pipe_pair()
    listener = asyncio.create_task(admit_as_listener(listener_end, KEY, DIALLER, LISTENER))
    await dialler_end.write(b"\x01abc")
    await dialler_end.write(b"")  # end of stream
    with pytest.raises(AdmissionError, match="early"):
        await asyncio.wait_for(listener, 5)
