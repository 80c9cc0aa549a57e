"""The node's persistent ed25519 identity and its libp2p peer id.

The key is created on first run in the state dir and never leaves it. The peer id is the one
libp2p derives from the same key (``12D3KooW…``), so the id that signs ledger entries is the id
other nodes see on the wire. Because an ed25519 peer id embeds the public key, anyone can check a
signature from the peer id alone: no key directory is needed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import IdentityError

IDENTITY_FILE = "identity.key"

# libp2p's PublicKey protobuf for ed25519: field 1 (KeyType) = 1, field 2 (Data) = 32 bytes.
_ED25519_PROTO_PREFIX = b"\x08\x01\x12\x20"
# A key this short is embedded as an "identity" multihash: code 0x00, then its length.
_IDENTITY_MULTIHASH_PREFIX = b"\x00" + bytes([len(_ED25519_PROTO_PREFIX) + 32])


def default_state_dir() -> Path:
    """Where a node keeps its identity, ledger and socket when the config does not say."""
    if os.geteuid() == 0:
        return Path("/var/lib/kairos")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "kairos"


def peer_id_from_public_key(public_bytes: bytes) -> str:
    """The libp2p text peer id (base58btc identity multihash) of a raw ed25519 public key."""
    if len(public_bytes) != 32:
        raise ValueError("an ed25519 public key is 32 bytes")
    return base58.b58encode(_IDENTITY_MULTIHASH_PREFIX + _ED25519_PROTO_PREFIX + public_bytes).decode()


def public_key_from_peer_id(peer_id: str) -> Ed25519PublicKey:
    """Recover the ed25519 public key embedded in a peer id; ``ValueError`` if it holds none."""
    try:
        raw = base58.b58decode(peer_id)
    except Exception as exc:  # base58 raises ValueError or TypeError on junk
        raise ValueError(f"not a base58 peer id: {peer_id[:60]!r}") from exc
    prefix = _IDENTITY_MULTIHASH_PREFIX + _ED25519_PROTO_PREFIX
    if len(raw) != len(prefix) + 32 or not raw.startswith(prefix):
        raise ValueError(f"not an ed25519 peer id: {peer_id[:60]!r}")
    return Ed25519PublicKey.from_public_bytes(raw[len(prefix) :])


def verify_signature(peer_id: str, signature: bytes, data: bytes) -> bool:
    """True when ``signature`` over ``data`` was made by the key behind ``peer_id``."""
    try:
        public_key_from_peer_id(peer_id).verify(signature, data)
    except (ValueError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True)
class Identity:
    """An ed25519 key pair and the peer id it stands for."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> "Identity":
        """A fresh identity, not persisted (tests, throwaway nodes)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> "Identity":
        """The identity of a 32-byte ed25519 seed."""
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @property
    def seed(self) -> bytes:
        """The 32-byte private seed (for the libp2p adapter, which builds its own key object)."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def public_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return self.private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def peer_id(self) -> str:
        """The libp2p peer id, ``12D3KooW…``."""
        return peer_id_from_public_key(self.public_bytes)

    def sign(self, data: bytes) -> bytes:
        """An ed25519 signature over ``data``."""
        return self.private_key.sign(data)


def load_or_create_identity(state_dir: Path | str) -> Identity:
    """Load the identity from ``state_dir``, creating it (mode 0600) on first run.

    Raises :class:`IdentityError` when the file is unreadable, corrupt, or readable by group or
    others: a leaked node key lets anyone impersonate the node, so we refuse rather than warn.
    """
    state_dir = Path(state_dir)
    path = state_dir / IDENTITY_FILE
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise IdentityError(f"cannot create state dir {state_dir}: {exc.strerror}") from None
    if not path.exists():
        return _create(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read identity {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(
            f"identity {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise IdentityError(f"identity {path} is corrupt (not a PEM private key); move it away to create a new one") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"identity {path} is not an ed25519 key")
    return Identity(key)


def _create(path: Path) -> Identity:
    identity = Identity.generate()
    pem = identity.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_suffix(".tmp")
    try:
        # O_EXCL and mode 0600 from the start: the key is never visible with looser rights.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written identity
    except FileExistsError:
        raise IdentityError(f"{tmp} exists: another kairos may be creating this identity; if not, remove it") from None
    except OSError as exc:
        raise IdentityError(f"cannot write identity {path}: {exc.strerror}") from None
    return identity
