"""Versions of ledger entries: a hybrid logical clock.

A version is ``(wall_ms, counter, peer_id)``. Tuples compare element by element, so versions are
totally ordered and the peer id breaks ties between writes made in the same millisecond. The clock
follows wall time when it can and the counter when it cannot (a burst inside one millisecond, or a
peer whose clock is ahead), so a local write always gets a version greater than every version this
node has written or merged.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

# Bounds a peer cannot exceed: they keep every version representable in JSON (2**53) and sqlite,
# and stop a hostile counter from pushing ours towards overflow.
MAX_WALL_MS = 2**53 - 1
MAX_COUNTER = 2**32 - 1


class Version(NamedTuple):
    """A hybrid logical clock reading; greater means later. Peer id last, as tie-breaker."""

    wall_ms: int
    counter: int
    peer_id: str


def wall_clock_ms() -> int:
    """Unix time in milliseconds."""
    return time.time_ns() // 1_000_000


class HybridLogicalClock:
    """The hybrid logical clock of one peer.

    ``tick()`` stamps a local write; ``observe(version)`` folds in a remote version so later local
    writes sort after it. Two bounds keep one peer with a wrong (or hostile) clock from dragging
    every node's versions into the future, where its entries would win every merge:

    - a remote version more than ``max_drift_ms`` ahead of our wall clock is refused (counted in
      ``rejected_future``) and leaves no trace;
    - an accepted one moves this clock at most ``max_lead_ms`` (default half of ``max_drift_ms``)
      ahead of our wall clock (counted in ``capped`` when it would have gone further).

    So this clock, and every version we write, is never more than ``max_lead_ms`` ahead of our
    wall clock, whatever peers send, and a peer whose wall clock is less than ``max_drift_ms -
    max_lead_ms`` behind ours accepts all of them. Without the second bound one write stamped just
    inside the drift bound pulled every node that merged it that far ahead, and a node a second
    behind then refused all their honest writes. The price: ``tick()`` sorts after every observed
    version only up to that ceiling; a version further ahead (an entry between the two bounds)
    keeps winning its own key until the wall clock catches up, unless a local write overwrites it
    through :meth:`tick_after`.
    """

    def __init__(
        self,
        peer_id: str,
        *,
        now_ms: Callable[[], int] = wall_clock_ms,
        max_drift_ms: int = 60_000,
        max_lead_ms: int | None = None,
    ) -> None:
        self.peer_id = peer_id
        self._now_ms = now_ms
        self.max_drift_ms = max_drift_ms
        # Half the drift bound each: our versions run at most half of it ahead of our wall clock,
        # so a peer less than the other half behind us still finds every one within its bound.
        self.max_lead_ms = max_drift_ms // 2 if max_lead_ms is None else max_lead_ms
        if not 0 <= self.max_lead_ms <= max_drift_ms:
            raise ValueError(f"max_lead_ms must be between 0 and max_drift_ms ({max_drift_ms}), not {self.max_lead_ms}")
        self._wall_ms = 0
        self._counter = 0
        self.rejected_future = 0
        self.capped = 0

    @property
    def last(self) -> Version:
        """The greatest version issued or observed so far."""
        return Version(self._wall_ms, self._counter, self.peer_id)

    def now_ms(self) -> int:
        """The wall clock this HLC follows, in milliseconds."""
        return self._now_ms()

    def tick(self) -> Version:
        """A new version for a local write, greater than every version seen so far."""
        now = self._now_ms()
        if now > self._wall_ms:
            self._wall_ms, self._counter = now, 0
        else:
            self._counter += 1
            if self._counter > MAX_COUNTER:
                # Only reachable after 2**32 writes in one millisecond of a stalled clock: step
                # the logical wall forward instead of overflowing.
                self._wall_ms, self._counter = self._wall_ms + 1, 0
        return Version(self._wall_ms, self._counter, self.peer_id)

    def acceptable(self, version: Version) -> bool:
        """False when ``version`` is too far in the future to be trusted."""
        return version.wall_ms <= self._now_ms() + self.max_drift_ms

    def observe(self, version: Version) -> bool:
        """Fold a remote version in, at most ``max_lead_ms`` ahead of our wall clock; False (and
        counted) when it is refused as more than ``max_drift_ms`` ahead."""
        if not self.acceptable(version):
            self.rejected_future += 1
            return False
        if self._fold(version):
            self.capped += 1
        return True

    def restore(self, version: Version) -> None:
        """Fold in a version without the drift check (versions read back from our own store).

        The lead bound still applies: an entry that was merged between the two bounds must not
        drag the clock when the node restarts either.
        """
        self._fold(version)

    def tick_after(self, floor: Version | None) -> Version:
        """A version for a local write that also sorts after ``floor`` (the entry it replaces).

        Usually just :meth:`tick`. When ``floor`` is beyond the lead bound (merged between the two
        bounds), the write is stamped right after it instead; the clock itself moves only as far
        as the bound allows, so overwriting a far-ahead entry drags no other write.
        """
        version = self.tick()
        if floor is None or version > floor:
            return version
        if floor.counter < MAX_COUNTER:
            after = Version(floor.wall_ms, floor.counter + 1, self.peer_id)
        else:
            after = Version(floor.wall_ms + 1, 0, self.peer_id)
        self._fold(after)
        return after

    def _fold(self, version: Version) -> bool:
        """Move this clock up to ``version``, or to the lead ceiling if that is lower; True when the
        ceiling cut it short."""
        ceiling = self._now_ms() + self.max_lead_ms
        reading = (version.wall_ms, version.counter)
        capped = version.wall_ms > ceiling
        if capped:
            reading = (ceiling, 0)
        if reading > (self._wall_ms, self._counter):
            self._wall_ms, self._counter = reading
        return capped
