"""What the event hooks carry: small immutable records, the same in process and in tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

PeerEventKind = Literal["joined", "left", "updated"]


@dataclass(frozen=True)
class PeerEvent:
    """A change in membership, as seen by this node.

    ``info`` is the peer's advertised entry in the ``nodes`` bucket (addresses, hostname, version,
    plus what plugins add); it may be empty for a peer that is connected but not yet advertised.
    """

    kind: PeerEventKind
    peer_id: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LedgerUpdate:
    """One key changed in the ledger, by a local write or by merging a remote one.

    ``value`` is None when the key was deleted (``deleted`` is then True). ``version`` is the
    entry's hybrid logical clock, ``(wall_ms, counter, peer_id)``; ``local`` says whether this node
    wrote it.
    """

    bucket: str
    key: str
    value: Any
    owner: str
    version: tuple[int, int, str]
    deleted: bool
    local: bool
