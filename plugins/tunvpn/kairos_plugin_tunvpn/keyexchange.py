"""Per-pair session keys agreed over an admitted libp2p stream (``/kairos/vpn/keys/1.0.0``).

The stream is already authenticated (noise, peer ids) and admitted (token holders only), so
the exchange only has to give each session fresh keys with forward secrecy: both ends send an
ephemeral X25519 public key and a random nonce; the secret is
``HKDF(X25519 shared, salt = nonce_i + nonce_r, info = label + initiator id + responder id)``
and :meth:`SessionKeys.derive` binds both peer ids again into each direction's key.

To keep both ends on the same keys, only the node with the *lower* peer id initiates (and runs
one exchange at a time per peer). The other node, when it lacks a session (say it restarted),
sends a ``request`` on the same protocol and the lower node starts an exchange.

Messages are single frames of JSON: ``{"op": "hello", "eph": hex, "nonce": hex}``, the reply
``{"op": "reply", "eph": hex, "nonce": hex}``, or ``{"op": "request"}``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .crypto import SessionKeys

if TYPE_CHECKING:
    from kairos_core.plugin import NodeView

KEYS_PROTOCOL = "/kairos/vpn/keys/1.0.0"
MAX_MESSAGE = 1024
NONCE_BYTES = 16
_LABEL = b"kairos/v1/tunvpn/session/"


class ExchangeError(Exception):
    """The peer sent something that is not a valid step of the exchange."""


@dataclass(frozen=True)
class Hello:
    """One side's contribution: an ephemeral public key and a nonce."""

    public: bytes
    nonce: bytes


def initiates(local_id: str, remote_id: str) -> bool:
    """True if ``local_id`` is the side that starts exchanges with ``remote_id``."""
    return local_id < remote_id


def new_ephemeral() -> tuple[X25519PrivateKey, Hello]:
    """A fresh ephemeral key pair and nonce (never reused: forward secrecy)."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return private, Hello(public, os.urandom(NONCE_BYTES))


def encode(op: str, hello: Hello | None = None) -> bytes:
    """One message of the protocol."""
    message: dict[str, Any] = {"op": op}
    if hello is not None:
        message["eph"] = hello.public.hex()
        message["nonce"] = hello.nonce.hex()
    return json.dumps(message).encode()


def decode(data: bytes) -> tuple[str, Hello | None]:
    """``(op, hello)`` of a message; :class:`ExchangeError` for anything malformed, and no other
    exception whatever ``data`` holds (a peer controls it)."""
    try:
        message = json.loads(data)
    except (ValueError, TypeError, RecursionError):  # RecursionError: "[[[[…", a level per byte
        raise ExchangeError("not a key-exchange message") from None
    if not isinstance(message, dict) or "op" not in message:
        raise ExchangeError("not a key-exchange message")
    op = message["op"]
    if op == "request":
        return op, None
    if op not in ("hello", "reply"):
        raise ExchangeError(f"unknown operation {op!r}")
    try:
        public, nonce = bytes.fromhex(message["eph"]), bytes.fromhex(message["nonce"])
    except (KeyError, TypeError, ValueError):
        raise ExchangeError("malformed key or nonce") from None
    if len(public) != 32 or len(nonce) != NONCE_BYTES:
        raise ExchangeError("key or nonce of the wrong size")
    return op, Hello(public, nonce)


def session_keys(
    private: X25519PrivateKey, remote: Hello, local: Hello, local_id: str, remote_id: str, initiator: bool
) -> SessionKeys:
    """The session keys of ``local_id`` towards ``remote_id`` after an exchange."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(remote.public))
    except ValueError:  # an all-zero result: a low-order point sent on purpose
        raise ExchangeError("degenerate public key") from None
    first, second = (local, remote) if initiator else (remote, local)
    ids = (local_id, remote_id) if initiator else (remote_id, local_id)
    info = _LABEL + b"".join(len(i).to_bytes(2, "big") + i.encode() for i in ids)
    secret = HKDF(algorithm=hashes.SHA256(), length=32, salt=first.nonce + second.nonce, info=info).derive(shared)
    return SessionKeys.derive(secret, local_id, remote_id)


async def initiate(node: NodeView, local_id: str, remote_id: str, timeout: float = 10.0) -> SessionKeys:
    """Run an exchange as initiator over a new stream from ``node`` to ``remote_id``; returns our keys.

    :raises ExchangeError: on a bad reply; ``KairosError`` (no stream) or ``TimeoutError`` if the
        stream fails.
    """
    import asyncio

    stream = await node.open_stream(remote_id, KEYS_PROTOCOL)
    try:
        private, hello = new_ephemeral()
        await stream.write_frame(encode("hello", hello))
        data = await asyncio.wait_for(stream.read_frame(MAX_MESSAGE), timeout)
        op, reply = decode(data)
        if op != "reply" or reply is None:
            raise ExchangeError(f"expected a reply, got {op!r}")
        return session_keys(private, reply, hello, local_id, remote_id, initiator=True)
    finally:
        await stream.close()


async def request(node: NodeView, remote_id: str) -> None:
    """Ask ``remote_id`` (the initiating side of the pair) to start an exchange."""
    stream = await node.open_stream(remote_id, KEYS_PROTOCOL)
    try:
        await stream.write_frame(encode("request"))
    finally:
        await stream.close()


async def respond(stream: Any, local_id: str, hello: Hello) -> SessionKeys:
    """Answer a received ``hello`` on ``stream``; returns our keys."""
    private, mine = new_ephemeral()
    keys = session_keys(private, hello, mine, local_id, stream.peer_id, initiator=False)
    await stream.write_frame(encode("reply", mine))
    return keys
