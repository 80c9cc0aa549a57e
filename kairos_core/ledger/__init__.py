"""The shared ledger: signed entries, merge rules, policies, sqlite store, codec and sync.

The transport is not here: the node binds :func:`sync_ledgers` to a libp2p stream and publishes
:class:`DeltaBatcher` output on gossip. See DESIGN.md §6.
"""

from .batching import DeltaBatcher
from .clock import HybridLogicalClock, Version
from .codec import decode_batch, encode_batch, split_batches
from .entry import Entry, canonical_json, merge
from .errors import DecodeError, LedgerError, PolicyError, SyncError
from .framing import StreamChannel
from .ledger import Ledger, open_ledger
from .policy import (
    LEASE,
    OPEN,
    OWNER_KEYED,
    LeasePolicy,
    OpenPolicy,
    OwnerKeyedPolicy,
    PolicyRegistry,
    WritePolicy,
)
from .store import LedgerStore
from .sync import PROTOCOL_ID as SYNC_PROTOCOL_ID, SyncChannel, SyncResult, ledger_fingerprint, sync_ledgers

__all__ = [
    "DecodeError",
    "DeltaBatcher",
    "Entry",
    "HybridLogicalClock",
    "LEASE",
    "LeasePolicy",
    "Ledger",
    "LedgerError",
    "LedgerStore",
    "OPEN",
    "OWNER_KEYED",
    "OpenPolicy",
    "OwnerKeyedPolicy",
    "PolicyError",
    "PolicyRegistry",
    "SYNC_PROTOCOL_ID",
    "StreamChannel",
    "SyncChannel",
    "SyncError",
    "SyncResult",
    "Version",
    "WritePolicy",
    "canonical_json",
    "decode_batch",
    "encode_batch",
    "ledger_fingerprint",
    "merge",
    "open_ledger",
    "split_batches",
    "sync_ledgers",
]
