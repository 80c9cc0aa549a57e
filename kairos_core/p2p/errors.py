"""Errors of the libp2p adapter."""

from __future__ import annotations

from ..errors import KairosError


class P2PError(KairosError):
    """A network operation failed: dial, stream, publish, or a peer that broke the protocol."""


class AdmissionError(P2PError):
    """The peer did not prove that it holds the network token (or we could not prove it to them)."""
