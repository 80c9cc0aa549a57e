"""The connection manager: a bounded number of long-lived connections per node.

A node that dials everyone it discovers pays for every member of the network: connections,
keepalives, gossip and DHT chatter all grow with N. Instead each node keeps between ``low`` and
``high`` admitted connections (``p2p.connections``), in the spirit of libp2p's connection manager:

- **Below ``low``** it dials more, from the peers it knows (members with advertised addresses,
  peers discovery announced): half of the picks are the peers closest to it by XOR distance of the
  SHA-256 of their ids (a stable, structured backbone: every node's closest peers overlap, so the
  overlay stays connected), half at random (short paths across it). Pinned peers (configured
  bootstrap peers) are always dialled. (Passing over peers whose ``nodes`` entry lists ``high``
  neighbours was tried and dropped: it narrows the random picks, and with a small degree the
  overlay split into parts that never met again.) Dials still in flight count as connections
  (:meth:`ConnectionManager.to_dial`): a pass each second that counted only admitted peers asked
  for the same shortfall again while slow admissions ran, and the node overshot ``high``.
- **Above ``high``** it closes connections down to the middle of ``low`` and ``high``, never those
  that are pinned, protected (a feature uses them: :meth:`ConnectionManager.protect`) or younger
  than ``grace`` seconds (a connection must have time to prove useful, and the peer that just
  dialled us must not be cut before it has found others). Half of what it keeps are again the
  XOR-closest, the other half those with the fewest connections of their own (their ``nodes``
  entries list them): what it closes goes to peers that keep ``low`` without it. Not down to ``low``: every connection closed leaves a peer one short, and at
  N = 25 a node cutting 17 connections to 8 left nine peers short at once, several below their
  own ``low``; their dials pushed others over ``high`` in turn, and the overlay rewired itself
  every ~30 s (measured: 9–19 trims per node in three idle minutes, each a rewrite of two
  ``nodes`` entries that every node receives).

The overlay must stay one piece, and a node at its degree dials nobody. Two rules keep it so:

- **A trim never closes a bridge**: a connection that is, in this node's view of the vouching
  graph (:meth:`kairos_core.membership.Membership.bridges`), the only way to some alive member,
  the peer at its other end included (a private node that reaches nobody else would redial at
  once and be trimmed again, round after round). Without it, with ``low: 2, high: 4`` and nine
  nodes that all joined through one seed, the trims left two parts that never dialled each other
  in about one run of three.
- **Repair**: two nodes may each close one of two bridges at the same moment, each counting on the
  other's. Then each part sees the other's members *lost* (alive a moment ago, reached through
  nobody now: :meth:`~kairos_core.membership.Membership.lost`), and the dial manager of a node at
  its degree dials one lost member every ``REPAIR_INTERVAL`` (jittered) until none is left. A
  crashed member is lost too and refuses the dial; it drops out of the lost set after the quorum
  horizon. The new connection is a bridge, so no trim closes it while it is the only one.

With ``N ≤ low`` every node connects to every node, as before: small networks form at once.
Membership does not need the full mesh (it is attested, see :mod:`kairos_core.membership`), nor
does the ledger (gossip floods the overlay, anti-entropy runs between neighbours).
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

DEFAULT_LOW = 8
DEFAULT_HIGH = 16
GRACE = 20.0


def xor_distance(a: str, b: str) -> int:
    """Kademlia-style distance between two peer ids (of their SHA-256, so ids spread evenly)."""
    return int.from_bytes(hashlib.sha256(a.encode()).digest(), "big") ^ int.from_bytes(hashlib.sha256(b.encode()).digest(), "big")


class Host(Protocol):
    """What the manager needs of the p2p host."""

    def admitted_peers(self) -> set[str]:
        """Peers connected and admitted now."""
        ...

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id``."""
        ...


class ConnectionManager:
    """Decides which peers to dial and which connections to close; see the module docstring.

    :param want_dial: ``want_dial(peer_id) -> bool``: ask the dialler to dial a peer now (it
        knows the addresses and the back-off; False when it will not).
    :param bridges: ``bridges(peers) -> peers``: those of the connected ``peers`` whose closing
        would cut some member off (a trim keeps them; see the module docstring).
    :param degree: ``degree(peer_id) -> int | None``: how many connections the peer's ``nodes``
        entry lists (a trim keeps those with the fewest).
    :param dialling: ``() -> peer ids`` being dialled now; they count towards ``low``.
    """

    def __init__(
        self,
        self_id: str,
        host: Host,
        want_dial: Callable[[str], bool],
        *,
        bridges: Callable[[set[str]], set[str]] = lambda peers: set(),
        degree: Callable[[str], int | None] = lambda peer: None,
        dialling: Callable[[], set[str]] = set,
        low: int = DEFAULT_LOW,
        high: int = DEFAULT_HIGH,
        grace: float = GRACE,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not 1 <= low <= high:
            raise ValueError(f"connections need 1 <= low <= high, not low={low} high={high}")
        self.self_id = self_id
        self.host = host
        self._want_dial = want_dial
        self._bridges = bridges
        self._degree = degree
        self._dialling = dialling
        self.low, self.high, self.grace = low, high, grace
        self.clock = clock
        self.rng = rng or random.Random()
        self._since: dict[str, float] = {}  # peer -> when its connection came up
        self._protected: dict[str, set[str]] = {}
        self._pinned: set[str] = set()
        self.trimmed = 0

    # --- inputs ------------------------------------------------------------------------------
    def connected(self, peer_id: str) -> None:
        """An admitted connection to ``peer_id`` is up."""
        self._since.setdefault(peer_id, self.clock())

    def disconnected(self, peer_id: str) -> None:
        """The connection to ``peer_id`` is gone."""
        self._since.pop(peer_id, None)

    def pin(self, peer_id: str) -> None:
        """Never close ``peer_id`` and always want it (a configured bootstrap peer)."""
        self._pinned.add(peer_id)

    def protect(self, peer_id: str, tag: str) -> None:
        """Keep the connection to ``peer_id`` while ``tag`` (a feature using it) holds it."""
        self._protected.setdefault(peer_id, set()).add(tag)

    def unprotect(self, peer_id: str, tag: str) -> None:
        """``tag`` no longer needs the connection to ``peer_id``."""
        tags = self._protected.get(peer_id)
        if tags is not None:
            tags.discard(tag)
            if not tags:
                del self._protected[peer_id]

    def is_protected(self, peer_id: str) -> bool:
        """Whether a pin or a tag keeps ``peer_id``'s connection."""
        return peer_id in self._pinned or peer_id in self._protected

    # --- decisions -----------------------------------------------------------------------------
    def saturated(self) -> bool:
        """At least ``low`` connections: discovery may slow down."""
        return len(self.host.admitted_peers()) >= self.low

    def short(self) -> bool:
        """Fewer than ``low`` connections, counting the dials in flight: worth another dial."""
        return len(self.host.admitted_peers() | self._dialling()) < self.low

    def to_dial(self, candidates: set[str]) -> list[str]:
        """Which of ``candidates`` (known, not connected) to dial now to get back to ``low``.

        Dials in flight count as connections: an admission takes a second on a quiet LAN and
        tens of seconds on a loaded machine, and a node that dialled ``low`` minus what it had
        on every pass until they landed overshot ``high`` by a multiple — in a simulation of 50
        nodes with dials of 2–30 s (``kairos_testing.overlaysim``), 1,500–1,700 connection
        changes until the overlay settled instead of ~310, and still trims after a 30 s settle.
        """
        connected = self.host.admitted_peers()
        dialling = self._dialling() - connected
        # Peers being dialled are asked for again, never counted again: the dialler starts an
        # attempt beside a running one only for addresses it does not try (a NATed peer's relayed
        # address, learned while the dial of its own addresses waits for its timeout, issue #15).
        again = sorted((candidates & dialling) - {self.self_id})
        pool = sorted(candidates - connected - dialling - {self.self_id})
        pinned = [peer for peer in pool if peer in self._pinned]
        missing = self.low - len(connected) - len(dialling) - len(pinned)
        rest = [peer for peer in pool if peer not in self._pinned]
        picks = again + pinned
        if missing > 0 and rest:
            closest = sorted(rest, key=lambda peer: xor_distance(self.self_id, peer))
            by_xor = closest[: (missing + 1) // 2]
            others = [peer for peer in rest if peer not in by_xor]
            picks += by_xor + self.rng.sample(others, min(len(others), missing - len(by_xor)))
        return picks

    @property
    def trim_target(self) -> int:
        """How many connections a trim leaves: the middle of ``low`` and ``high``."""
        return (self.low + self.high) // 2

    def to_trim(self) -> list[str]:
        """Connections to close now: none unless above ``high``, then down to :attr:`trim_target`."""
        connected = self.host.admitted_peers()
        if len(connected) <= self.high:
            return []
        now = self.clock()
        keep = {peer for peer in connected if self.is_protected(peer) or now - self._since.get(peer, now) < self.grace}
        keep |= self._bridges(connected - keep)
        room = self.trim_target - len(keep)
        closable = sorted(connected - keep)
        if room > 0 and closable:
            closest = sorted(closable, key=lambda peer: xor_distance(self.self_id, peer))
            by_xor = set(closest[: (room + 1) // 2])
            others = [peer for peer in closable if peer not in by_xor]
            keep |= by_xor | set(self._fewest_connections(others, room - len(by_xor)))
        return sorted(connected - keep)

    def _fewest_connections(self, peers: list[str], count: int) -> list[str]:
        """``count`` of ``peers`` to keep: those with the fewest connections of their own first
        (as their ``nodes`` entry lists them; unknown counts as few), at random among equals.

        What a trim closes then goes to peers that keep ``low`` without us and dial no one; a
        random pick left peers short, their dials pushed others over ``high``, and at N = 50 on
        one machine the overlay never stopped rewiring (a rewrite of two entries per change,
        which every node receives).
        """
        if count <= 0:
            return []
        shuffled = self.rng.sample(peers, len(peers))
        return sorted(shuffled, key=lambda peer: self._degree(peer) or 0)[:count]

    def round(self, candidates: set[str]) -> list[str]:
        """One pass: ask for the dials :meth:`to_dial` picks; return the peers to close."""
        for peer in self.to_dial(candidates):
            self._want_dial(peer)
        trim = self.to_trim()
        self.trimmed += len(trim)
        return trim
