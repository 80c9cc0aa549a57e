"""The dial manager: the node's periodic pass over the peers worth a connection.

It joins three parts that each decide one thing:

- :class:`~kairos_core.connections.ConnectionManager` — *whom* to dial (below
  ``p2p.connections.low``: XOR-closest and random candidates, pinned peers always) and whom to
  close (above ``.high``);
- :class:`~kairos_core.dialer.Dialer` — *when* (per-peer back-off, the stranger token bucket,
  dials in parallel);
- membership and the ledger — *who* is worth it: peers seen within the quorum horizon (or known
  from disk), at the addresses their ``nodes`` entry advertises. Discovery reports a peer once;
  after a partition or a restart the connection must come back without it.

A node at its degree still dials, now and then, one member that was alive a moment ago and is
reached through nobody now (``lost``): that is how an overlay that split into parts finds itself
again (see :mod:`kairos_core.connections`); a trim never closes a bridge (``bridges``).

A trim tells the peer first (``/kairos/trim/1.0.0``: one frame each way, bounded by
``TRIM_NOTICE_TIMEOUT``), and the peer holds off dialling us for ``TRIM_HOLD`` seconds — as a
gossipsub PRUNE carries a back-off. Without it nothing kept the peer, one short, from dialling us
again — we can be among the XOR-closest peers it lacks — and we trimmed it again after the grace
period; at N = 50 the network closed five connections a second at idle, all of them trims, each a
rewrite of two ``nodes`` entries that every node receives. A
peer that ignores the notice is trimmed again, as before; a notice only ever holds off its sender.

A pass runs every ``interval`` (1 s). Its cost does not grow with the network once the node has
its degree: the list of members worth a dial (O(N) to build) is only built while the node has
fewer than ``low`` connections or a pinned peer is missing; otherwise a pass looks at the pinned
peers and the connections it holds. The interfaces are scanned for address changes every
``address_scan_interval`` (5 s), not every pass: on a machine with many interfaces (a k3s node
has one veth per pod) each scan is an ioctl per interface.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from contextlib import suppress
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .connections import DEFAULT_HIGH, DEFAULT_LOW, GRACE, ConnectionManager
from .dialer import Dialer

log = logging.getLogger(__name__)

ROUND_INTERVAL = 1.0
ADDRESS_SCAN_INTERVAL = 5.0
# The protection tag of connections that carry relay reservations (kairos_core.p2p.relay).
RELAY_TAG = "relay-reservation"
# Seconds between repair dials of a node at its degree (each wait drawn from 1x..2x of it). A split
# overlay heals within about this; a crashed member costs each node a refused dial this often
# until it leaves the quorum horizon.
REPAIR_INTERVAL = 10.0
# The trim notice: its protocol, how long a trimmed peer leaves us alone (several grace periods:
# long enough for it to settle elsewhere), and how long the trim waits for the notice's answer
# before it closes anyway (the answer says the notice arrived: closing at once could lose it).
# Not 2 s: at N = 50 on 2 cores opening the stream alone took longer, and every notice failed.
TRIM_PROTOCOL = "/kairos/trim/1.0.0"
TRIM_HOLD = 120.0
TRIM_NOTICE_TIMEOUT = 10.0
TRIM_NOTICE = b"\x01"
# A connection closed by a trim (ours, or the peer's notice) within this long is answered as
# "trimmed" once by :meth:`DialManager.trimmed`: the notice, then the close, take up to a timeout each.
TRIM_RECENT = 2 * TRIM_NOTICE_TIMEOUT + 5.0
# ... and at most this many trims are remembered (a peer's notices must not grow this process).
TRIMS_REMEMBERED = 256


class Host(Protocol):
    """What the dial manager needs of the p2p host."""

    def addresses(self) -> list[str]:
        """Our concrete listen addresses now."""
        ...

    def admitted_peers(self) -> set[str]:
        """Peers connected and admitted now."""
        ...

    def is_admitted(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is connected and admitted now."""
        ...

    async def connect(self, addrs: list[str]) -> str:
        """Dial and admit; the peer id."""
        ...

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id``."""
        ...


class DialManager:
    """Keeps the node's connections between ``low`` and ``high``; see the module docstring.

    :param worth_dialling: ``() -> peer ids`` members worth a connection (alive within the quorum
        horizon, or known from disk).
    :param advertised: ``peer_id -> multiaddrs`` its ``nodes`` entry advertises (may be empty).
    :param addresses_changed: called when our own addresses changed (the node re-announces).
    :param lost: ``() -> peer ids`` members alive a moment ago and reached through nobody now.
    :param bridges: ``bridges(peers) -> peers``: those connected ``peers`` no trim may close.
    :param degree: ``degree(peer) -> int | None``: how many connections ``peer``'s entry lists (a
        trim closes the best-connected first).
    :param counters: where to count ``connections_trimmed``, ``trims_spared_bridges`` (passes
        that kept a connection because it was a bridge), ``repair_dials``, ``member_scans``
        (passes that listed the members worth a dial), ``address_changes``, ``dial_pass_errors``.
    """

    def __init__(
        self,
        self_id: str,
        host: Host,
        worth_dialling: Callable[[], Iterable[str]],
        advertised: Callable[[str], list[str]],
        *,
        addresses_changed: Callable[[], None] = lambda: None,
        lost: Callable[[], Iterable[str]] = lambda: (),
        bridges: Callable[[set[str]], set[str]] = lambda peers: set(),
        degree: Callable[[str], int | None] = lambda peer: None,
        repair_interval: float = REPAIR_INTERVAL,
        low: int = DEFAULT_LOW,
        high: int = DEFAULT_HIGH,
        grace: float = GRACE,
        interval: float = ROUND_INTERVAL,
        address_scan_interval: float = ADDRESS_SCAN_INTERVAL,
        counters: Counter[str] | None = None,
    ) -> None:
        self.self_id = self_id
        self.host = host
        self._worth_dialling = worth_dialling
        self._advertised = advertised
        self._addresses_changed = addresses_changed
        self.interval = interval
        self.scan_every = max(1, round(address_scan_interval / interval))
        self.counters: Counter[str] = Counter() if counters is None else counters
        self._lost = lost
        self.random = random.Random()
        self._bridges = bridges
        self.repair_every = max(1, round(repair_interval / interval))
        self._next_repair = self._repair_wait()
        self.dialer = Dialer(self_id, host.connect, host.is_admitted, should_dial=lambda peer_id: self.connections.short())
        self.connections = ConnectionManager(
            self_id,
            host,
            self._dial_candidate,
            bridges=self._spare_bridges,
            degree=degree,
            dialling=self.dialer.dialling,
            low=low,
            high=high,
            grace=grace,
        )
        self._candidates: dict[str, list[str]] = {}
        self._relay_links: set[str] = set()  # protected under RELAY_TAG
        self._addresses: list[str] = host.addresses()
        self._passes = 0
        self._task: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()
        self._trimming: set[str] = set()  # peers whose trim (notice, then close) runs now
        self._trimmed_at: dict[str, float] = {}  # peer -> when a trim of its connection began

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Run a pass every ``interval`` seconds, and hear the trim notices of peers."""
        set_stream_handler = getattr(self.host, "set_stream_handler", None)
        if set_stream_handler is not None:
            set_stream_handler(TRIM_PROTOCOL, self._on_trim_notice)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="dial-manager")

    async def stop(self) -> None:
        """Stop the passes and every dial in flight."""
        task, self._task = self._task, None
        tasks = [t for t in (task, *self._closing) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.dialer.aclose()

    # --- inputs --------------------------------------------------------------------------------
    def discovered(self, peer_id: str, addrs: list[str]) -> None:
        """Discovery announced ``peer_id``: a candidate (dialled now while below ``low``)."""
        self.dialer.discovered(peer_id, addrs)

    def pin(self, peer_id: str, addrs: list[str]) -> None:
        """A configured bootstrap peer: always dialled, never trimmed."""
        self.dialer.pin(peer_id, addrs)
        self.connections.pin(peer_id)

    def admitted(self, peer_id: str) -> None:
        """An admitted connection to ``peer_id`` is up."""
        self.dialer.admitted(peer_id)
        self.connections.connected(peer_id)

    def disconnected(self, peer_id: str) -> None:
        """The connection to ``peer_id`` is gone."""
        self.connections.disconnected(peer_id)

    # --- the pass ------------------------------------------------------------------------------
    def round(self) -> None:
        """One pass: notice address changes, dial what the degree lacks, trim what exceeds it."""
        self._passes += 1
        if self._passes % self.scan_every == 0:
            self._scan_addresses()
        known: dict[str, list[str]] = {}
        if self._needs_members():
            self.counters["member_scans"] += 1
            for peer_id in self._worth_dialling():
                addrs = self._addresses_of(peer_id)
                if addrs:
                    known[peer_id] = addrs
        self._candidates = self.dialer.candidates(known)
        if self._passes >= self._next_repair:
            self._next_repair = self._passes + self._repair_wait()
            if self.connections.saturated():  # (below low, the lost are among the candidates anyway)
                self._repair()
        self._protect_relay_links()
        for peer_id in self.connections.round(set(self._candidates)):
            if peer_id in self._trimming:
                continue  # its trim runs (the notice waits for an answer): counted once
            self.counters["connections_trimmed"] += 1
            self._close(peer_id)

    def _repair_wait(self) -> int:
        return self.repair_every + self.random.randrange(self.repair_every + 1)

    def _repair(self) -> None:
        """Dial one lost member (see the module docstring), at random: the parts of a split
        overlay each try a different peer of the other, and one dial that gets through is enough."""
        lost = sorted(self._lost())  # (sorted: a seeded self.random picks the same)
        self.random.shuffle(lost)
        for peer_id in lost:
            addrs = self._addresses_of(peer_id)
            if addrs and self.dialer.want(peer_id, addrs):  # (want: not if connected or backing off)
                self.counters["repair_dials"] += 1
                log.debug("repair: dialling %s, alive a moment ago and reached through nobody now", peer_id)
                return

    def _addresses_of(self, peer_id: str) -> list[str]:
        """The multiaddrs ``peer_id``'s entry advertises (an entry is peer-written: strings only)."""
        return [a for a in self._advertised(peer_id) if isinstance(a, str)]

    def _spare_bridges(self, peers: set[str]) -> set[str]:
        bridges = self._bridges(peers)
        if bridges:
            self.counters["trims_spared_bridges"] += 1
        return bridges

    def _protect_relay_links(self) -> None:
        """Never trim a connection a relay reservation lives on: ours to our relays (what makes a
        private node reachable at all) and, on a relay, those of the peers reserving on it."""
        reachability = getattr(self.host, "reachability", None)
        if reachability is None:
            return
        state = reachability()
        wanted = set(state.get("relays", ())) | set(state.get("reserving_peers", ()))
        for peer_id in wanted - self._relay_links:
            self.connections.protect(peer_id, RELAY_TAG)
        for peer_id in self._relay_links - wanted:
            self.connections.unprotect(peer_id, RELAY_TAG)
        self._relay_links = wanted

    def _needs_members(self) -> bool:
        # Members are only needed as candidates while the degree is short; pinned peers and the
        # strangers discovery announced are candidates of the dialler's own.
        return not self.connections.saturated()

    def _scan_addresses(self) -> None:
        addresses = self.host.addresses()
        if addresses != self._addresses:  # an interface came or went: paths that failed may work
            self._addresses = addresses
            self.counters["address_changes"] += 1
            self.dialer.network_changed()
            self._addresses_changed()  # and others should learn the new addresses now

    def _dial_candidate(self, peer_id: str) -> bool:
        addrs = self._candidates.get(peer_id)
        return bool(addrs) and self.dialer.want(peer_id, addrs)

    def trimmed(self, peer_id: str) -> bool:
        """Whether the connection to ``peer_id`` that just went was closed by a trim (ours, or the
        peer's, which sent its notice): a choice of degree, not a sign of failure. Answers once."""
        began = self._trimmed_at.pop(peer_id, None)
        return began is not None and time.monotonic() - began < TRIM_RECENT

    def _remember_trim(self, peer_id: str) -> None:
        if len(self._trimmed_at) >= TRIMS_REMEMBERED:
            now = time.monotonic()
            for peer, began in list(self._trimmed_at.items()):
                if now - began >= TRIM_RECENT:
                    del self._trimmed_at[peer]
            while len(self._trimmed_at) >= TRIMS_REMEMBERED:
                del self._trimmed_at[next(iter(self._trimmed_at))]
        self._trimmed_at[peer_id] = time.monotonic()

    def _close(self, peer_id: str) -> None:
        self._trimming.add(peer_id)
        self._remember_trim(peer_id)
        task = asyncio.get_running_loop().create_task(self._disconnect(peer_id), name="trim")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _disconnect(self, peer_id: str) -> None:
        try:
            await self._send_trim_notice(peer_id)
            await self.host.disconnect(peer_id)
        except Exception as exc:
            log.debug("closing the connection to %s failed: %s", peer_id, exc)
        finally:
            self._trimming.discard(peer_id)

    async def _send_trim_notice(self, peer_id: str) -> None:
        """Tell ``peer_id`` we are trimming it (it holds off redialling us); best effort, bounded."""
        open_stream = getattr(self.host, "open_stream", None)
        if open_stream is None:
            return
        stream = None
        try:
            # a connection about to be closed: cancelling its stream negotiation costs nothing
            async with asyncio.timeout(TRIM_NOTICE_TIMEOUT):
                stream = await open_stream(peer_id, TRIM_PROTOCOL)
                await stream.write_frame(TRIM_NOTICE)
                if await stream.read_frame(len(TRIM_NOTICE)) == TRIM_NOTICE:
                    self.counters["trim_notices_sent"] += 1
        except Exception as exc:  # an old peer without the protocol, or one too busy: trim anyway
            self.counters["trim_notices_failed"] += 1
            log.debug("trim notice to %s not answered: %r", peer_id, exc)
        finally:
            if stream is not None:
                with suppress(Exception):
                    await stream.close()

    async def _on_trim_notice(self, stream: Any) -> None:
        """A peer trims its connection to us: hold off dialling it (see the module docstring)."""
        try:
            async with asyncio.timeout(TRIM_NOTICE_TIMEOUT):
                if await stream.read_frame(len(TRIM_NOTICE)) != TRIM_NOTICE:
                    self.counters["trim_notices_malformed"] += 1
                    return
                self.dialer.hold_off(stream.peer_id, TRIM_HOLD)
                self._remember_trim(stream.peer_id)
                self.counters["trim_notices_received"] += 1
                await stream.write_frame(TRIM_NOTICE)
        except Exception as exc:  # oversized, silent or gone: nothing held, nothing else to do
            self.counters["trim_notices_unreadable"] += 1
            log.debug("trim notice from %s unreadable: %r", getattr(stream, "peer_id", "?"), exc)
        finally:
            with suppress(Exception):
                await stream.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.round()
            except Exception:  # one failing pass must not end the dialling
                self.counters["dial_pass_errors"] += 1
                log.exception("dial pass failed")

    def has_candidates(self) -> bool:
        """Whether the last pass found a peer worth a dial (discovered, a member, or pinned)."""
        return bool(self._candidates)

    def describe(self) -> dict[str, Any]:
        """Diagnostics: candidates of the last pass, peers backing off."""
        return {"candidates": sorted(self._candidates), "waiting": self.dialer.waiting()}
