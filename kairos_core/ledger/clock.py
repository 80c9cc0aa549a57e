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
    writes sort after it. A remote version more than ``max_drift_ms`` ahead of our wall clock is
    refused (and counted in ``rejected_future``): one peer with a wrong clock must not drag every
    node's versions into the future, where its entries would win every merge.
    """

    def __init__(
        self,
        peer_id: str,
        *,
        now_ms: Callable[[], int] = wall_clock_ms,
        max_drift_ms: int = 60_000,
    ) -> None:
        self.peer_id = peer_id
        self._now_ms = now_ms
        self.max_drift_ms = max_drift_ms
        self._wall_ms = 0
        self._counter = 0
        self.rejected_future = 0

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
        """Fold a remote version in; False (and counted) when it is refused as too far ahead."""
        if not self.acceptable(version):
            self.rejected_future += 1
            return False
        self.restore(version)
        return True

    def restore(self, version: Version) -> None:
        """Fold in a version without the drift check (versions read back from our own store)."""
        if (version.wall_ms, version.counter) > (self._wall_ms, self._counter):
            self._wall_ms, self._counter = version.wall_ms, version.counter
