"""The persistent node identity: created once, 0600, refused when unsafe or corrupt."""

from __future__ import annotations

import os
import stat

import pytest

from kairos_core.errors import IdentityError
from kairos_core.identity import (
    IDENTITY_FILE,
    Identity,
    load_or_create_identity,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify_signature,
)


def test_created_once_with_mode_0600_and_reloaded(tmp_path):
    state = tmp_path / "state"
    first = load_or_create_identity(state)
    path = state / IDENTITY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert first.peer_id.startswith("12D3KooW")
    again = load_or_create_identity(state)
    assert again.peer_id == first.peer_id
    assert again.seed == first.seed


def test_peer_id_matches_libp2p():
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    identity = Identity.generate()
    pair = create_new_key_pair(identity.seed)
    assert ID.from_pubkey(pair.public_key).to_base58() == identity.peer_id


def test_signature_checks_from_peer_id_alone():
    identity = Identity.generate()
    signature = identity.sign(b"data")
    assert verify_signature(identity.peer_id, signature, b"data")
    assert not verify_signature(identity.peer_id, signature, b"other")
    assert not verify_signature(Identity.generate().peer_id, signature, b"data")
    assert not verify_signature("not-a-peer-id", signature, b"data")
    assert not verify_signature("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", signature, b"data")
    assert public_key_from_peer_id(identity.peer_id).public_bytes_raw() == identity.public_bytes
    with pytest.raises(ValueError):
        peer_id_from_public_key(b"short")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_group_or_world_readable_identity_is_refused(tmp_path, mode):
    load_or_create_identity(tmp_path)
    os.chmod(tmp_path / IDENTITY_FILE, mode)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(tmp_path)


@pytest.mark.parametrize("content", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"])
def test_corrupt_identity_is_a_clear_error(tmp_path, content):
    path = tmp_path / IDENTITY_FILE
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="corrupt"):
        load_or_create_identity(tmp_path)


def test_non_ed25519_key_is_refused(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path = tmp_path / IDENTITY_FILE
    path.write_bytes(pem)
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="not an ed25519"):
        load_or_create_identity(tmp_path)


def test_unwritable_state_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(IdentityError, match="cannot create state dir"):
        load_or_create_identity(blocker / "state")
