"""Leader election: a lease in the ledger with a fencing epoch, sticky and quorum-guarded.

Each claimant of each epoch has its own key in the ``leader`` bucket,
``<network_id>:<epoch>:<peer_id>``, holding ``{peer, epoch, state, claimed}`` signed by that peer
(the bucket's policy refuses anything else). Keys per epoch mean that a deposed leader renewing
after a partition heals only rewrites its own, older epoch: the highest epoch wins by
construction. Keys per claimant mean that two claims of one epoch never overwrite each other: the
claim with the earliest ``claimed`` version (the hybrid-logical-clock version of its first write)
wins, everywhere, whatever order the entries arrive in.

The protocol, run in rounds of at most half a second on every node:

1. The *holder* of the highest epoch renews it every ``lease_seconds / 3`` while it sees a
   majority of the recently-alive electorate; without a majority it stops renewing and at once
   stops calling itself leader (``is_leader`` is False, ``leader`` None), and its lease lapses for
   the others. Seeing the majority again before the lapse, it renews the same epoch. The holder
   does not count a peer whose connection to it closed and that has not spoken since: a
   partner's entry naming the others does not keep it leading. A renewal is a *heartbeat*
   (:func:`encode_heartbeat`: epoch, a fresh hybrid-logical-clock version, the holder's ed25519
   signature; ~110 bytes) gossiped on a topic of its own and stored by nobody, when the node
   gives the election a ``heartbeat`` publisher; the ledger entry (``state: held``) is written
   when the claim is confirmed and when the holder resumes after stepping down, not on every
   renewal — every renewal used to be a sealed, signed ledger entry of ~450 bytes that every node
   received once per gossip mesh peer and stored. Without a publisher (tests, tools) renewals
   rewrite the ledger entry as before.
2. Everyone else watches the renewals — heartbeats of the current lease's holder and epoch with a
   version newer than the last one accepted (:meth:`Election.observe_heartbeat`), and rewrites of
   the lease entry — on its own monotonic clock (skewed wall clocks do not
   matter). The lease has lapsed when no renewal arrived for ``lease_seconds`` — or, the fast
   path after a crash, when the holder has left our membership, has been silent for a second, and
   does not answer a dial (``probe``). One flaky link to a leader that still answers never
   deposes it, so renewals can be rare (idle traffic) while fail-over stays fast.
3. On a lapse, only the deterministic candidate — the lowest SHA-256 of peer id among alive,
   eligible nodes — claims ``epoch + 1`` (``state: claim``), and only with a majority. It waits
   ``settle`` seconds for concurrent claims to arrive, and confirms (``state: held``) only if its
   claim is still the earliest of that epoch.

``on_leader_elected`` fires once per (leader, epoch), for confirmed leases only, and never for an
epoch lower than one already announced.

Whose leases count: a token holder can sign leases for any identity it makes up, so a lease counts
only when its holder is this node or a member vouched for by admission (alive now or within the
quorum horizon, see :mod:`kairos_core.membership`), and only up to the top of the *epoch chain* —
the highest epoch ``e`` such that every epoch ``1..e`` has a lease in the bucket. An epoch can
only grow one claim at a time, so nobody jumps the network to epoch 10¹² (where the fencing
tokens of every consumer would stop at their parsers' limits), and epochs stay within
:data:`MAX_EPOCH`. A new claim takes the chain's top plus one, so epochs never go backwards even
when the holders of the latest ones no longer count.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .config import CORE_DEFAULTS  # the election options' defaults, declared once in the config schema
from .identity import peer_id_from_public_key
from .ledger.policy import LeasePolicy  # noqa: F401 -- re-exported: the leader bucket's policy

if TYPE_CHECKING:
    from .events import LedgerUpdate
    from .identity import Identity
    from .membership import Membership

log = logging.getLogger(__name__)

LEADER_BUCKET = "leader"
# Epochs are keyed with 12 digits (lease_key), and consumers parse them so: nothing above counts.
MAX_EPOCH = 10**12 - 1
# Seconds a departed leader must also have been silent before the fast path takes over.
DEPARTURE_GRACE = 1.0
# Seconds a starting node waits before claiming a lease nobody holds: time for discovery and the
# first sync to show it a sitting leader.
STARTUP_GRACE = 3.0
# ... and, while it still takes in the network's ledger (``joined`` is False: a dial in flight, or
# an admitted peer it has not yet synced with), at most this many leases: a joiner whose first
# syncs queue behind a busy network's gossip must not proclaim itself leader of epoch 1 meanwhile
# (its claim would lose to the sitting leader's, but only after ``on_leader_elected`` had told its
# plugins that it leads — at N = 100 on 2 cores three joiners in four did).
JOIN_WAIT_LEASES = 4


# A heartbeat: format version, epoch, the holder's clock version (wall ms, counter), then the
# holder's raw ed25519 public key and its signature over _HEARTBEAT_DOMAIN + network id + header.
HEARTBEAT_VERSION = 1
_HEARTBEAT = struct.Struct(">BQQI")
_HEARTBEAT_DOMAIN = b"kairos/lease-heartbeat/1\0"
HEARTBEAT_SIZE = _HEARTBEAT.size + 32 + 64


@dataclass(frozen=True)
class Heartbeat:
    """A renewal of ``peer``'s lease of ``epoch``, signed by ``peer``; ``version`` orders them."""

    peer: str
    epoch: int
    version: tuple[int, int]


def _heartbeat_signed_bytes(network_id: str, header: bytes) -> bytes:
    return _HEARTBEAT_DOMAIN + network_id.encode() + b"\0" + header


def encode_heartbeat(identity: Identity, network_id: str, epoch: int, version: tuple[int, int]) -> bytes:
    """A heartbeat of ``identity``'s lease of ``epoch``, bound to ``network_id`` by its signature."""
    header = _HEARTBEAT.pack(HEARTBEAT_VERSION, epoch, version[0], version[1])
    return header + identity.public_bytes + identity.sign(_heartbeat_signed_bytes(network_id, header))


def decode_heartbeat(network_id: str, data: bytes) -> Heartbeat | None:
    """The heartbeat in ``data`` if it is well formed and its signature holds, else None.

    Pure cryptography, no state: safe to call from the p2p thread's gossip validator.
    """
    if len(data) != HEARTBEAT_SIZE:
        return None
    header, public, signature = data[: _HEARTBEAT.size], data[_HEARTBEAT.size : -64], data[-64:]
    format_version, epoch, wall_ms, counter = _HEARTBEAT.unpack(header)
    if format_version != HEARTBEAT_VERSION or not 1 <= epoch <= MAX_EPOCH:
        return None
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, _heartbeat_signed_bytes(network_id, header))
    except (ValueError, InvalidSignature):
        return None
    return Heartbeat(peer_id_from_public_key(public), epoch, (wall_ms, counter))


@dataclass(frozen=True)
class Lease:
    """One epoch's lease as read from the ledger."""

    peer: str
    epoch: int
    state: str  # "claim" | "held"
    claimed: tuple[int, int] = (0, 0)  # (wall_ms, counter) of the claim's first write

    @property
    def held(self) -> bool:
        """Confirmed by its claimant (a mere claim is not yet a leader)."""
        return self.state == "held"


def candidate_rank(peer_id: str) -> bytes:
    """Order of preference among candidates: lowest SHA-256 of the peer id first."""
    return hashlib.sha256(peer_id.encode()).digest()


def parse_lease(network_id: str, key: str, value: Any, owner: str) -> Lease | None:
    """The lease stored under ``key``, or None when the entry is not a valid lease of this network."""
    prefix = f"{network_id}:"
    if not key.startswith(prefix) or not isinstance(value, dict):
        return None
    epoch_text, _, peer = key[len(prefix) :].partition(":")
    if not (epoch_text.isdigit() and len(epoch_text) <= 12):
        return None
    epoch = int(epoch_text)
    if not 1 <= epoch <= MAX_EPOCH:
        return None
    claimed = value.get("claimed")
    if (
        peer != owner
        or value.get("peer") != owner
        or value.get("epoch") != epoch
        or value.get("state") not in ("claim", "held")
        or not (isinstance(claimed, list) and len(claimed) == 2 and all(type(c) is int for c in claimed))
    ):
        return None  # a lease is only valid under, and signed by, the peer it names
    return Lease(owner, epoch, value["state"], (claimed[0], claimed[1]))


def lease_key(network_id: str, epoch: int, peer_id: str) -> str:
    """The ledger key of one claimant's lease of one epoch (zero-padded: keys sort by epoch)."""
    return f"{network_id}:{epoch:012d}:{peer_id}"


def winner(leases: list[Lease]) -> Lease | None:
    """The lease that counts: highest epoch, and within it the earliest claim."""
    if not leases:
        return None
    top = max(lease.epoch for lease in leases)
    return min((lease for lease in leases if lease.epoch == top), key=lambda lease: (lease.claimed, lease.peer))


class Election:
    """Runs the lease protocol for one node. ``ledger`` needs ``items``, ``get``, ``get_entry``, ``set`` and ``clock``."""

    def __init__(
        self,
        peer_id: str,
        ledger: Any,
        membership: Membership,
        announce: Callable[[str, int], Awaitable[None]],
        *,
        network_id: str = "kairos",
        lease_seconds: float = CORE_DEFAULTS["election"]["lease_seconds"],
        probe: Callable[[str], Awaitable[bool]] | None = None,
        eligible: Callable[[], bool] = lambda: True,
        require_majority: bool = CORE_DEFAULTS["election"]["require_majority"],
        quorum_horizon: float = CORE_DEFAULTS["election"]["quorum_horizon"],
        heartbeat: Callable[[int], Awaitable[None]] | None = None,
        pull: Callable[[str, int], Awaitable[Heartbeat | None]] | None = None,
        joined: Callable[[], bool] = lambda: True,
        settle: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.peer_id = peer_id
        self.ledger = ledger
        self.membership = membership
        self.network_id = network_id
        self.lease_seconds = lease_seconds
        self.renew_interval = lease_seconds / 3
        # Rounds run more often than renewals, so a departed leader is noticed within a second.
        self.tick = min(self.renew_interval, 0.5)
        self.settle = min(self.renew_interval / 2, 0.5) if settle is None else settle
        self.probe = probe
        #: whether this node has taken in the ledgers of the peers it reached (see JOIN_WAIT_LEASES)
        self.joined = joined
        self.eligible = eligible
        self.require_majority = require_majority
        self.quorum_horizon = quorum_horizon
        self.monotonic = monotonic
        self.wall = wall
        self._announce = announce
        # heartbeat(epoch) publishes a signed renewal of our lease of epoch (see the module doc)
        self._heartbeat = heartbeat
        # pull(holder, epoch): ask the holder directly for a fresh heartbeat (see _still_renewed)
        self._pull = pull
        self._beating: asyncio.Task | None = None  # the heartbeat being published, if any
        self._last_beat: Heartbeat | None = None  # the newest heartbeat accepted
        #: who may send the heartbeats that count now (the holder of the current confirmed lease),
        #: as of the last round: read by the p2p thread's gossip validator, so only ever replaced
        self.heartbeat_signer: str | None = None
        self.counters: dict[str, int] = {"heartbeats_accepted": 0, "heartbeats_ignored": 0, "heartbeats_pulled": 0}
        self._started = self._last_renewal_seen = monotonic()
        # A restarted holder finds its lease in the ledger: it may renew it for one more lease.
        self._last_own_renewal = monotonic()
        self._stepping_down = False
        self._announced: tuple[str, int] | None = None
        self._counted: tuple[str, int] | None = None  # (holder, epoch) of the lease counted last round
        self._task: asyncio.Task | None = None
        self._announcements: set[asyncio.Task] = set()
        self._leases: dict[str, Lease] | None = None  # key -> valid lease, filled on first use
        self._chain: int | None = None  # top of the epoch chain; None: to be computed again
        self.changes = 0  # confirmed leaders seen since start: steady state keeps this still

    # --- views -------------------------------------------------------------------------------
    def leases(self) -> list[Lease]:
        """Every valid lease of this network, lowest epoch first."""
        if self._leases is None:
            # Read the bucket once; afterwards observe() keeps the view current, so the rounds
            # (twice a second) never re-parse a bucket that only grows.
            self._leases = {}
            for key, value in self.ledger.items(LEADER_BUCKET).items():
                entry = self.ledger.get_entry(LEADER_BUCKET, key)
                lease = parse_lease(self.network_id, key, value, entry.owner if entry else "")
                if lease:
                    self._leases[key] = lease
        return sorted(self._leases.values(), key=lambda lease: lease.epoch)

    def chain_top(self) -> int:
        """The highest epoch ``e`` with a lease for every epoch ``1..e`` (0: none)."""
        if self._chain is None:
            epochs = {lease.epoch for lease in self.leases()}
            top = 0
            while top + 1 in epochs:
                top += 1
            self._chain = top
        return self._chain

    def credible(self, lease: Lease, electorate: set[str] | None = None) -> bool:
        """Whether ``lease`` may count: ours, or a vouched-for member's, within the epoch chain.

        ``electorate``: the members recently alive, when the caller built it already (judging
        many leases, build it once: it is a pass over every member)."""
        if lease.epoch > self.chain_top():
            return False
        if lease.peer == self.peer_id:
            return True
        if electorate is None:
            electorate = self.membership.recently_alive(self.quorum_horizon)
        return lease.peer in electorate

    def current(self) -> Lease | None:
        """The winning lease of the highest epoch among those that count, confirmed or not.

        This runs on every heartbeat, round and lease update: the electorate is built once per
        call, not once per lease."""
        electorate = self.membership.recently_alive(self.quorum_horizon)
        return winner([lease for lease in self.leases() if self.credible(lease, electorate)])

    @property
    def leader(self) -> tuple[str, int] | None:
        """``(peer_id, epoch)`` of the confirmed leader this node knows, or None."""
        lease = self.current()
        if lease is None or not lease.held or self._lapsed(lease):
            return None
        if lease.peer == self.peer_id and self._stepping_down:
            return None  # we lost the majority: we stop claiming to lead at once, not at the lapse
        return lease.peer, lease.epoch

    @property
    def is_leader(self) -> bool:
        """Whether this node holds the lease now."""
        leader = self.leader
        return leader is not None and leader[0] == self.peer_id

    # --- inputs ------------------------------------------------------------------------------
    def observe(self, update: LedgerUpdate) -> None:
        """Feed every ledger update of the ``leader`` bucket here."""
        if update.bucket != LEADER_BUCKET:
            return
        lease = None if update.deleted else parse_lease(self.network_id, update.key, update.value, update.owner)
        if self._leases is not None:
            if lease is None:
                if self._leases.pop(update.key, None) is not None:
                    self._chain = None
            else:
                if update.key not in self._leases:
                    self._chain = None
                self._leases[update.key] = lease
        if lease is None:
            return
        current = self.current()
        if current is not None and lease == current:
            self._last_renewal_seen = self.monotonic()
            if lease.held:
                self._maybe_announce(lease)

    def observe_heartbeat(self, beat: Heartbeat) -> bool:
        """Feed every heartbeat received here (signature checked by :func:`decode_heartbeat`).

        It renews the lease only when it is the current confirmed lease's holder's, of that
        epoch, and newer than the last one accepted: a replayed, stale, foreign or old-epoch
        heartbeat keeps no lease alive. Returns whether it counted.
        """
        current = self.current()
        last = self._last_beat
        if (
            current is None
            or not current.held
            or beat.peer != current.peer
            or beat.epoch != current.epoch
            or beat.peer == self.peer_id
            or (last is not None and (last.peer, last.epoch) == (beat.peer, beat.epoch) and beat.version <= last.version)
        ):
            self.counters["heartbeats_ignored"] += 1
            return False
        self._last_beat = beat
        self._last_renewal_seen = self.monotonic()
        self.counters["heartbeats_accepted"] += 1
        return True

    # --- the loop ----------------------------------------------------------------------------
    def start(self) -> None:
        """Run the protocol in the background."""
        self._started = self._last_renewal_seen = self.monotonic()  # a sitting leader gets a full lease to show up
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="election")

    async def stop(self) -> None:
        """Stop; a held lease simply lapses on the other nodes."""
        for task in (self._task, self._beating):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._task = self._beating = None

    async def _run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # the election must outlive a bad ledger entry or a plugin bug
                log.exception("election step failed")
            await asyncio.sleep(self.tick)

    async def step(self) -> None:
        """One round: renew, or detect a lapse and claim."""
        current = self.current()
        self.heartbeat_signer = current.peer if current is not None and current.held else None
        counted = (current.peer, current.epoch) if current is not None else None
        if counted != self._counted:
            # observe() starts a lease's renewal clock and announces it as it arrives, but it may
            # arrive before its holder counts as a member (a joiner's first sync brings the lease
            # before the entries that vouch for the holder): both happen here then, once it
            # counts — else a joiner timed the sitting leader from its own start, and a low-ranked
            # one deposed it (epochs 2 and 3 of a 50-node formation)
            self._counted = counted
            if counted is not None:
                self._last_renewal_seen = max(self._last_renewal_seen, self.monotonic())
        if current is not None and self.leader == counted:
            self._maybe_announce(current)
        if current is not None and current.peer == self.peer_id and current.held and not self._lapsed(current):
            if not self._quorum(holding=True):
                if not self._stepping_down:
                    self._stepping_down = True
                    log.warning("lost the majority: stepping down from epoch %d", current.epoch)
            elif self._stepping_down:
                self._renew(current.epoch)  # resuming: the entry tells nodes that may have seen a lapse
            elif self.monotonic() - self._last_own_renewal >= self.renew_interval:
                self._renew(current.epoch, beat=True)
            return
        if current is not None and not self._lapsed(current) and not await self._departed(current):
            return
        if current is None:
            waited = self.monotonic() - self._started
            if waited < min(self.lease_seconds, STARTUP_GRACE):
                return  # a new node first gives discovery and sync the time to show a sitting leader
            if waited < JOIN_WAIT_LEASES * self.lease_seconds and not self.joined():
                return  # and the syncs it started, however long they take on a busy network
        # The holder of a lease that lapsed is passed over as the next candidate: it may still look
        # alive (a hung process keeps its connections; the kernel answers keepalives), and were it
        # the lowest-ranked, nobody else would ever claim.
        silent = current.peer if current is not None and current.peer != self.peer_id else None
        if not self.eligible() or not self._quorum() or self._candidate(passed_over=silent) != self.peer_id:
            return
        if silent is not None and current is not None and await self._still_renewed(current):
            return
        # the chain's top, not the current lease's: epochs must never go backwards
        epoch = max(self.chain_top(), current.epoch if current else 0) + 1
        if epoch > MAX_EPOCH:
            log.error("epoch %d would exceed %d: not claiming", epoch, MAX_EPOCH)
            return
        log.info("lease lapsed; claiming epoch %d", epoch)
        self._write(epoch, "claim")
        await asyncio.sleep(self.settle)
        best = self.current()
        if best is not None and best.epoch == epoch and best.peer == self.peer_id:
            self._renew(epoch)
        else:
            log.info("claim of epoch %d lost to %s", epoch, best.peer if best else None)

    # --- helpers -----------------------------------------------------------------------------
    def _write(self, epoch: int, state: str) -> None:
        key = lease_key(self.network_id, epoch, self.peer_id)
        previous = self.ledger.get(LEADER_BUCKET, key)
        if isinstance(previous, dict) and isinstance(previous.get("claimed"), list):
            claimed = previous["claimed"]  # renewals keep the claim's identity, across restarts too
        else:
            version = self.ledger.clock.tick()
            claimed = [version[0], version[1]]
        value = {
            "peer": self.peer_id,
            "epoch": epoch,
            "state": state,
            "claimed": claimed,
            "expires": round(self.wall() + self.lease_seconds, 3),
        }  # informative: others use their own clock
        self.ledger.set(LEADER_BUCKET, key, value)

    def _renew(self, epoch: int, beat: bool = False) -> None:
        """Renew our confirmed lease: a heartbeat when ``beat`` and we have a publisher, else the entry."""
        if beat and self._heartbeat is not None:
            if self._beating is not None and not self._beating.done():
                return  # the last one is still going out (a stuck host): no pile-up; retried next round
            self._beating = asyncio.get_running_loop().create_task(self._beat(epoch), name="lease-heartbeat")
        else:
            self._write(epoch, "held")
        self._last_own_renewal = self.monotonic()
        self._stepping_down = False

    async def _beat(self, epoch: int) -> None:
        assert self._heartbeat is not None
        try:
            await self._heartbeat(epoch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # gossip is best effort; the next renewal is a round away
            log.debug("lease heartbeat not sent: %r", exc)

    def _lapsed(self, lease: Lease) -> bool:
        if lease.peer == self.peer_id:
            # our own lease stands only while we renew it; others time it out the same way
            return self.monotonic() - self._last_own_renewal >= self.lease_seconds
        return self.monotonic() - self._last_renewal_seen >= self.lease_seconds

    async def _departed(self, lease: Lease) -> bool:
        """The fast path: the holder left our membership and does not answer a dial.

        Waiting a whole lease after a kill would be slow; trusting membership alone would let one
        flaky link depose a healthy leader. A leader that left, stayed silent for a grace second,
        and cannot be dialled is gone.
        """
        if lease.peer == self.peer_id or self.membership.is_alive(lease.peer):
            return False
        if self.monotonic() - self._last_renewal_seen < DEPARTURE_GRACE:
            return False
        if self.probe is not None:
            try:
                if await self.probe(lease.peer):
                    return False
            except Exception:
                pass  # an unreachable leader is what we are checking for
        return True

    async def _still_renewed(self, lease: Lease) -> bool:
        """Before the candidate claims over a lease that lapsed for it while its holder still
        looks alive: whether the holder, asked directly, answers with a fresh heartbeat.

        Heartbeats are gossip; on a loaded network one node's copies can all be late or lost for
        a whole lease while every other node gets them, and that node, if it is the candidate,
        deposed a leader that renewed all along (twice in one 100-node formation). The answer is
        signed by the holder and newer than any heartbeat accepted before, so no replay and no
        third party keeps a lease alive; a hung holder, one that lost its majority (it answers
        nothing then) and one cut off from us do not answer, and the claim goes on.
        """
        if self._pull is None or lease.peer == self.peer_id or not self.membership.is_alive(lease.peer):
            return False  # (a holder that left was asked by the fast path's probe already)
        try:
            beat = await self._pull(lease.peer, lease.epoch)
        except asyncio.CancelledError:
            raise
        except Exception:
            beat = None
        if beat is None or not self.observe_heartbeat(beat):
            return False
        self.counters["heartbeats_pulled"] += 1
        log.info("lease of epoch %d lapsed here only: its holder answered with a fresh heartbeat", lease.epoch)
        return True

    def _candidate(self, passed_over: str | None = None) -> str | None:
        alive = [peer for peer, info in self.membership.alive().items() if info.get("eligible", True) and peer != passed_over]
        if self.eligible():
            alive.append(self.peer_id)
        return min(alive, key=candidate_rank) if alive else None

    def _quorum(self, holding: bool = False) -> bool:
        """Whether we see a majority of the recently-alive electorate.

        The holder of the lease counts more strictly (``holding``): not a peer whose connection to
        us closed within a lease and that has not spoken (its own entry changing) since
        (:meth:`~kairos_core.membership.Membership.alive_unless_lost`). Cut off with a partner,
        it would otherwise go on leading until the partner noticed the whole cut too and its
        rewritten entry arrived — seconds that add to the keepalive time before it steps down.
        """
        if not self.require_majority:
            return True
        electorate = len(self.membership.recently_alive(self.quorum_horizon)) + 1
        if holding:
            present = len(self.membership.alive_unless_lost(self.lease_seconds)) + 1
        else:
            present = len(self.membership.alive()) + 1
        return present > electorate // 2

    def _maybe_announce(self, lease: Lease) -> None:
        key = (lease.peer, lease.epoch)
        if self._announced is not None and (key == self._announced or lease.epoch < self._announced[1]):
            return
        self._announced = key
        self.changes += 1
        task = asyncio.get_running_loop().create_task(self._announce(lease.peer, lease.epoch))
        self._announcements.add(task)
        task.add_done_callback(self._announcements.discard)
