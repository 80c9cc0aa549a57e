"""The dialler: which peers a node dials, when, and how often it tries again.

Discovery (mDNS, the DHT) reports a peer once; membership knows peers seen recently; configured
bootstrap peers must always be tried. The dialler turns all of them into dials with a bounded
back-off per peer, so that a connection lost to a partition, a restart or a flaky link comes back
without anyone announcing the peer again, and a flood of made-up announcements cannot make the
node dial without end.

- Each peer has its own back-off: ``base`` seconds after a failure, doubling up to a cap, with
  ±25 % jitter so both sides of a healed partition do not dial in lock-step. Peers the node has
  been connected to (``known``) are capped at ``known_cap`` (a few seconds: reconnecting after
  a heal is what matters); peers only announced by discovery at ``stranger_cap``.
- A change of the network resets every back-off: any peer admitted (dialled by us or dialling
  in) means paths that failed a moment ago may work now, so every waiting peer is tried again
  within a fraction of a second instead of at the end of its back-off. Resets happen at most
  once per ``reset_interval``, so churn cannot turn them into a dial storm.
- At most ``max_parallel`` dials run at once; the strangers remembered for retries are bounded.
- A peer that closed our connection to keep its own degree (a trim, announced by a notice:
  :mod:`.dial_manager`) is *held off*: not dialled and not a candidate for ``hold`` seconds,
  whatever resets the back-offs, unless it is pinned. Without that nothing kept the trimmed node, one
  short, from dialling the peer that had just trimmed it (it can be among the XOR-closest it
  lacks), which trimmed it again once the grace period was over.
- Addresses a peer gains while a dial of it runs get an attempt of their own at once, beside it
  (one per peer at a time): a private peer's relayed address, learned a few seconds after it,
  must not wait for the dial of its unreachable own addresses to time out (issue #15).
- Dials of peers never admitted — announced by discovery, or vouched for by members, or only
  remembered from disk — share one token bucket: ``stranger_rate`` a second, bursts of
  ``stranger_burst``. Anyone can announce made-up peers at somebody else's address (50 of them made
  a node dial one address 600 times in 30 s, issue #12, Medium 9c); however many there are, the
  node dials a few a second. Peers once admitted and pinned peers never wait for it.

The dialler only decides; the host dials (one bounded attempt, see :mod:`.p2p.traps`) and admits.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from .ratelimit import TokenBucket

log = logging.getLogger(__name__)

Dial = Callable[[list[str]], Awaitable[str]]

BASE_BACKOFF = 0.5
KNOWN_CAP = 3.0
STRANGER_CAP = 30.0
RESET_INTERVAL = 2.0
MAX_PARALLEL = 16
MAX_STRANGERS = 256
STRANGER_DIAL_RATE = 2.0  # dials a second of peers never admitted, all of them together
STRANGER_DIAL_BURST = 8  # a node joining a network dials this many at once (its degree's worth)


@dataclass
class _Backoff:
    retry_at: float = 0.0
    delay: float = 0.0
    failures: int = 0


def with_peer_suffix(addrs: Iterable[str], peer_id: str) -> list[str]:
    """Multiaddrs that end ``/p2p/<peer_id>``, as the host's ``connect`` wants them."""
    suffix = f"/p2p/{peer_id}"
    return [a if a.endswith(suffix) else a + suffix for a in addrs if isinstance(a, str)]


class Dialer:
    """Dials peers with per-peer back-off; see the module docstring.

    :param dial: ``dial(multiaddrs) -> peer_id``: the host's connect (dial and admission).
    :param is_connected: whether a peer is admitted and connected now.
    :param should_dial: whether a peer discovery just announced is worth a dial now (the
        connection manager says no once the node has its degree; the peer stays a candidate).
    """

    def __init__(
        self,
        self_id: str,
        dial: Dial,
        is_connected: Callable[[str], bool],
        *,
        should_dial: Callable[[str], bool] = lambda peer_id: True,
        base: float = BASE_BACKOFF,
        known_cap: float = KNOWN_CAP,
        stranger_cap: float = STRANGER_CAP,
        reset_interval: float = RESET_INTERVAL,
        max_parallel: int = MAX_PARALLEL,
        max_strangers: int = MAX_STRANGERS,
        stranger_rate: float = STRANGER_DIAL_RATE,
        stranger_burst: int = STRANGER_DIAL_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.self_id = self_id
        self._dial = dial
        self._is_connected = is_connected
        self.should_dial = should_dial
        self.base, self.known_cap, self.stranger_cap = base, known_cap, stranger_cap
        self.reset_interval = reset_interval
        self.max_strangers = max_strangers
        self.clock = clock
        self.counters: Counter[str] = Counter()
        self._slots = asyncio.Semaphore(max_parallel)
        self._backoff: dict[str, _Backoff] = {}
        # per peer being dialled: the addresses each of its attempts tries (at most two)
        self._in_flight: dict[str, list[frozenset[str]]] = {}
        self._strangers: dict[str, list[str]] = {}  # announced by discovery, never admitted yet
        self._known: set[str] = set()  # admitted at some time: reconnecting to them is urgent
        self._pinned: dict[str, list[str]] = {}  # configured bootstrap peers: always worth a dial
        self._held: dict[str, float] = {}  # peer -> until when it asked not to be dialled (a trim)
        self._last_reset = -reset_interval
        self._tasks: set[asyncio.Task] = set()
        self._stranger_dials = TokenBucket(stranger_rate, stranger_burst, clock())

    # --- inputs ------------------------------------------------------------------------------
    def discovered(self, peer_id: str, addrs: list[str]) -> None:
        """Discovery announced ``peer_id`` at ``addrs``: dial it unless connected or backing off."""
        if peer_id == self.self_id or not addrs:
            return
        if peer_id not in self._known:
            if peer_id not in self._strangers and len(self._strangers) >= self.max_strangers:
                self.counters["dial_candidates_dropped"] += 1
                return  # a LAN full of made-up announcements must not grow this without end
            self._strangers[peer_id] = list(addrs)
        if self.should_dial(peer_id):
            self.want(peer_id, addrs)

    def pin(self, peer_id: str, addrs: list[str]) -> None:
        """Keep dialling ``peer_id`` whenever it is not connected (a configured bootstrap peer)."""
        if peer_id != self.self_id:
            self._pinned[peer_id] = list(addrs)
            self._known.add(peer_id)

    def admitted(self, peer_id: str) -> None:
        """``peer_id`` is admitted (whoever dialled): it is known, and the network just changed."""
        self._known.add(peer_id)
        self._strangers.pop(peer_id, None)
        self._backoff.pop(peer_id, None)
        self.network_changed()

    def network_changed(self) -> None:
        """Something changed that may make failed paths work: retry every waiting peer soon."""
        now = self.clock()
        if now - self._last_reset < self.reset_interval:
            return
        self._last_reset = now
        for state in self._backoff.values():
            # spread the retries over half a second: a reset must not be a burst of SYNs
            state.retry_at = min(state.retry_at, now + random.uniform(0.0, 0.5))
            state.delay = 0.0
        self.counters["dial_backoff_resets"] += 1

    def hold_off(self, peer_id: str, seconds: float) -> None:
        """``peer_id`` trimmed our connection: no dial of it for ``seconds`` (pinned peers excepted).

        Only an admitted peer can ask, and only for itself; the table is bounded by the peers
        held at once (expired holds are dropped when it grows)."""
        if peer_id == self.self_id or peer_id in self._pinned:
            return
        now = self.clock()
        if len(self._held) >= 4 * self.max_strangers:
            self._held = {peer: until for peer, until in self._held.items() if until > now}
        if len(self._held) < 4 * self.max_strangers:
            self._held[peer_id] = now + seconds
            self.counters["dials_held_off"] += 1

    def held(self, peer_id: str) -> bool:
        """Whether ``peer_id`` asked not to be dialled, and still may (see :meth:`hold_off`)."""
        until = self._held.get(peer_id)
        if until is None:
            return False
        if self.clock() < until and peer_id not in self._pinned:
            return True
        del self._held[peer_id]
        return False

    def forget(self, peer_id: str) -> None:
        """Stop trying ``peer_id`` (it left for good, or was revoked)."""
        self._pinned.pop(peer_id, None)
        self._known.discard(peer_id)
        self._strangers.pop(peer_id, None)
        self._backoff.pop(peer_id, None)

    # --- the rounds --------------------------------------------------------------------------
    def want(self, peer_id: str, addrs: list[str]) -> bool:
        """Dial ``peer_id`` now if it is not connected and not backing off; while a dial of it
        runs, only the addresses that dial does not try, in one attempt beside it."""
        if peer_id == self.self_id or self._is_connected(peer_id) or self.held(peer_id):
            return False
        running = self._in_flight.get(peer_id, [])
        if running:
            if len(running) > 1:
                return False
            addrs = [a for a in with_peer_suffix(addrs, peer_id) if a not in running[0]]
        else:
            state = self._backoff.get(peer_id)
            if state is not None and self.clock() < state.retry_at:
                return False
            addrs = with_peer_suffix(addrs, peer_id)
        if not addrs:
            return False
        if peer_id not in self._known and not self._stranger_dials.take(self.clock()):
            self.counters["dials_deferred"] += 1  # a later round asks again
            return False
        if running:
            self.counters["dials_new_addresses"] += 1
        self._start(peer_id, addrs)
        return True

    def _start(self, peer_id: str, addrs: list[str]) -> None:
        tried = frozenset(addrs)
        self._in_flight.setdefault(peer_id, []).append(tried)
        task = asyncio.get_running_loop().create_task(self._attempt(peer_id, addrs, tried), name=f"dial-{peer_id[-6:]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def round(self, known_addrs: dict[str, list[str]]) -> None:
        """One periodic pass: every peer worth a connection (``known_addrs``) and every stranger."""
        for peer_id, addrs in {**known_addrs, **self._pinned}.items():
            self.want(peer_id, addrs)
        # in random order: with the stranger dials bounded, the first announced must not take them all
        for peer_id, addrs in random.sample(list(self._strangers.items()), len(self._strangers)):
            if self._is_connected(peer_id):
                del self._strangers[peer_id]  # it dialled us meanwhile
            else:
                self.want(peer_id, addrs)

    def candidates(self, known_addrs: dict[str, list[str]]) -> dict[str, list[str]]:
        """Every peer worth a connection and how to reach it: ``known_addrs`` (members), the
        strangers discovery announced and the pinned peers, without those connected now."""
        for peer_id in [p for p in self._strangers if self._is_connected(p)]:
            del self._strangers[peer_id]  # it dialled us meanwhile
        merged = {**self._strangers, **known_addrs, **self._pinned}
        return {
            peer: addrs
            for peer, addrs in merged.items()
            if peer != self.self_id and not self._is_connected(peer) and not self.held(peer)
        }

    def dialling(self) -> set[str]:
        """Peers a dial of which runs now (or waits for one of the ``max_parallel`` slots)."""
        return set(self._in_flight)

    def waiting(self) -> dict[str, float]:
        """Peers backing off, with the seconds until their next try (diagnostics)."""
        now = self.clock()
        return {peer: round(max(0.0, s.retry_at - now), 2) for peer, s in self._backoff.items()}

    async def aclose(self) -> None:
        """Cancel every dial in flight."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _attempt(self, peer_id: str, addrs: list[str], tried: frozenset[str]) -> None:
        try:
            async with self._slots:
                if self._is_connected(peer_id):
                    return
                await self._dial(addrs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counters["dials_failed"] += 1
            # the back-off is for a peer no attempt reached: not while another still runs or won
            if len(self._in_flight.get(peer_id, ())) <= 1 and not self._is_connected(peer_id):
                self._failed(peer_id)
            log.debug("dialling %s failed: %s", peer_id, exc)
        else:
            self.counters["dials_ok"] += 1
            self._backoff.pop(peer_id, None)
        finally:
            attempts = self._in_flight.get(peer_id, [])
            if tried in attempts:
                attempts.remove(tried)
            if not attempts:
                self._in_flight.pop(peer_id, None)

    def _failed(self, peer_id: str) -> None:
        state = self._backoff.setdefault(peer_id, _Backoff())
        cap = self.known_cap if peer_id in self._known else self.stranger_cap
        state.failures += 1
        state.delay = min(cap, max(self.base, state.delay * 2))
        state.retry_at = self.clock() + state.delay * random.uniform(0.75, 1.25)
        if len(self._backoff) > 4 * self.max_strangers:  # made-up peers must not grow it forever
            for stale in [p for p in self._backoff if p not in self._known and p not in self._strangers]:
                del self._backoff[stale]
