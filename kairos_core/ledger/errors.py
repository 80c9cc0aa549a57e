"""The ledger's exceptions."""

from __future__ import annotations

from ..errors import KairosError


class LedgerError(KairosError):
    """A write the ledger refuses: a value too large or not JSON, a bad bucket or key, a key the
    writer does not own."""


class PolicyError(LedgerError):
    """A local write to a key this node does not own (see :mod:`kairos_core.ledger.policy`)."""


class DecodeError(LedgerError):
    """Bytes from a peer that are not a well-formed ledger message. The only exception the codec
    raises for bad input, whatever the input is."""


class SyncError(LedgerError):
    """The peer broke the anti-entropy protocol (bad frame, oversized, out of order)."""
