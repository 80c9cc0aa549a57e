"""WAN discovery through the Kademlia DHT (docs/architecture.md §5).

Every node *provides* the rendezvous key of the current and the previous DHT window and looks up
the providers of both; a provider it has not reported yet is handed to ``on_found`` (which dials
and admits it). Rounds repeat on a back-off: fast at start (0.5 s, doubling up to 30 s), and fast
again whenever the window turns, because then everyone announces a new key.

Only the bootstrap peers from the config are needed — private nodes work, public IPFS is never
contacted. They are dialled (and so admitted) and put into the DHT routing table, which libp2p
does not fill by itself.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable

from .. import multiaddrs
from ..keys import KeySchedule

if TYPE_CHECKING:
    from ..p2p import P2PHost

log = logging.getLogger(__name__)

FoundCallback = Callable[[str, list[str]], "Awaitable[None] | None"]

FIRST_INTERVAL = 0.5
MAX_INTERVAL = 30.0
# Once the node has its degree (p2p.connections.low) rounds are this far apart — but a window
# boundary (the rendezvous key rotates) still runs one, and losing connections resumes fast ones.
SATURATED_INTERVAL = 300.0
SATURATION_CHECK = 2.0
# A peer seen again is re-reported after this long if we are still not connected to it.
REPORT_AGAIN_AFTER = 60.0
# A first round that takes longer than this (lookups timing out, bootstrap peers that do not
# answer) no longer keeps a node that found nobody from counting itself alone (``looked``).
LOOK_LIMIT = 10.0


class RoundPacing:
    """The back-off between rounds: ``first`` doubling to ``ceiling``, back to ``first`` on a new window."""

    def __init__(self, first: float, ceiling: float) -> None:
        self.first = first
        self.ceiling = ceiling
        self._window: int | None = None
        self._delay = first

    def next_delay(self, window: int) -> float:
        """The pause after a round run in ``window``."""
        if window != self._window:
            self._window, self._delay = window, self.first
        else:
            self._delay = min(self._delay * 2, self.ceiling)
        return self._delay


class DHTRendezvous:
    """Announce and look up this network's rendezvous keys in the DHT; report new peers."""

    def __init__(
        self,
        host: "P2PHost",
        schedule: KeySchedule,
        on_found: FoundCallback,
        bootstrap: list[str],
        *,
        first_interval: float = FIRST_INTERVAL,
        max_interval: float = MAX_INTERVAL,
        saturated: Callable[[], bool] = lambda: False,
    ) -> None:
        self.host = host
        self.schedule = schedule
        self.on_found = on_found
        self.bootstrap = list(bootstrap)
        self.first_interval = first_interval
        self.max_interval = max_interval
        self.saturated = saturated
        #: rounds run, peers reported, lookups that failed
        self.counters: dict[str, int] = {"rounds": 0, "found": 0, "errors": 0}
        self._reported: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self._started_at: float | None = None
        self._first_round_done = False

    async def start(self) -> None:
        """Start announcing and looking up in the background."""
        if self._task is None or self._task.done():
            self._started_at = time.monotonic()
            self._task = asyncio.create_task(self._run(), name="dht-rendezvous")

    def looked(self) -> bool:
        """Whether the first round has run (its lookups answered or failed), or LOOK_LIMIT passed
        since the start: what the DHT could show by now has been reported."""
        if self._started_at is None:
            return False
        return self._first_round_done or time.monotonic() - self._started_at >= LOOK_LIMIT

    async def stop(self) -> None:
        """Stop the background rounds."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        pacing = RoundPacing(self.first_interval, self.max_interval)
        while True:
            try:
                await self.run_round()
            except asyncio.CancelledError:
                raise
            except Exception:  # one bad round must not end discovery
                self.counters["errors"] += 1
                log.exception("DHT rendezvous round failed")
            self._first_round_done = True
            delay = pacing.next_delay(self.schedule.dht_window())
            saturated = self.saturated()
            if saturated:
                delay = max(delay, SATURATED_INTERVAL)
            # wake at the window boundary too: the new key wants announcing at once
            remaining = min(delay, self._seconds_to_next_window())
            while remaining > 0:
                step = min(remaining, SATURATION_CHECK)
                await asyncio.sleep(step)
                remaining -= step
                if saturated and not self.saturated():
                    pacing = RoundPacing(self.first_interval, self.max_interval)  # lost peers: look again now
                    break

    def _seconds_to_next_window(self) -> float:
        step = self.schedule.token.dht.interval
        now = self.schedule.clock()
        # a hair past the boundary, so the next round already sees the new window
        return max(0.05, step - (now % step) + 0.05)

    async def run_round(self) -> None:
        """One round: reach the bootstrap peers, announce both keys, look both up."""
        self.counters["rounds"] += 1
        await self._reach_bootstrap()
        names = self.schedule.current_rendezvous()
        for name in names:
            try:
                await self.host.provide(name)
            except Exception as exc:
                self.counters["errors"] += 1
                log.debug("providing %s failed: %r", name, exc)
        for name in names:
            try:
                providers = await self.host.find_providers(name)
            except Exception as exc:
                self.counters["errors"] += 1
                log.debug("looking up %s failed: %r", name, exc)
                continue
            for peer_id, addrs in providers:
                await self._report(peer_id, addrs)

    async def _reach_bootstrap(self) -> None:
        admitted = self.host.admitted_peers()
        for address in self.bootstrap:
            peer = multiaddrs.peer_id(address)  # None for an address that does not parse: skipped
            if peer is None or peer == self.host.peer_id:
                continue
            if peer not in admitted:
                try:
                    await self.host.connect(address)
                except Exception as exc:
                    log.debug("bootstrap peer %s unreachable: %r", address, exc)
                    continue
            self.host.add_dht_peer(peer, [address])

    async def _report(self, peer_id: str, addrs: list[str]) -> None:
        if peer_id == self.host.peer_id or not addrs:
            return
        now = time.monotonic()
        last = self._reported.get(peer_id)
        if last is not None and (peer_id in self.host.admitted_peers() or now - last < REPORT_AGAIN_AFTER):
            return
        self._reported[peer_id] = now
        self.counters["found"] += 1
        try:
            result = self.on_found(peer_id, addrs)
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("on_found for %s failed", peer_id)
