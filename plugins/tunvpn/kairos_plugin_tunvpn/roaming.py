"""How many datagrams from unexpected UDP endpoints the data plane may spend an AES-GCM open on.

A datagram names its session by a key id that anyone who sees the traffic can read off the wire,
so the key id alone proves nothing: someone on the LAN who copies it into a flood makes the
receiver attempt an AES-GCM open per datagram (measured: ping from 1 ms to 305 ms, 15 % loss).
The data plane therefore opens without limit only datagrams from the endpoint (ip, port) the
session last authenticated from. A datagram from any other endpoint may still be the peer — a new
address, a NAT rebinding, a session whose peer has not been heard yet — so it is not refused
outright: it is opened while :class:`RoamLimiter` has a token for it, per source endpoint and for
all such sources together, and dropped unopened otherwise. Once one of them authenticates, the
session's endpoint moves there (roaming) and the rest pass without tokens.

So a flood from one source costs a few opens per second, a flood from many (spoofed) sources no
more than the total rate, and the peer's own traffic never waits for a token. While a flood from
many sources drains the total budget, a peer that really moved is opened only as tokens come
back; until then its datagrams take the libp2p stream, which the flood does not touch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

from kairos_core.plugin import TokenBucket, TokenBuckets

#: Opens per second (and at once) that one unexpected source endpoint may cost.
PER_SOURCE_RATE = 8.0
PER_SOURCE_BURST = 16
#: Opens per second (and at once) that all unexpected source endpoints together may cost.
TOTAL_RATE = 256.0
TOTAL_BURST = 256
#: Source endpoints remembered at most; past that the idlest are forgotten (the total still bounds).
MAX_SOURCES = 4096


class RoamLimiter:
    """Token buckets (the core's), one per source endpoint and one for all of them.

    Not thread-safe: the data plane calls it under its receive lock.

    :param per_source_rate: tokens per second of each source's bucket (0: none come back).
    :param per_source_burst: size of each source's bucket, full for a source not seen before.
    :param total_rate: tokens per second of the bucket shared by all sources.
    :param total_burst: size of the shared bucket.
    :param max_sources: sources remembered at most.
    :param clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        per_source_rate: float = PER_SOURCE_RATE,
        per_source_burst: int = PER_SOURCE_BURST,
        total_rate: float = TOTAL_RATE,
        total_burst: int = TOTAL_BURST,
        *,
        max_sources: int = MAX_SOURCES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if min(per_source_rate, total_rate) < 0 or min(per_source_burst, total_burst) < 1 or max_sources < 1:
            raise ValueError("rates must be >= 0, bursts and max_sources >= 1")
        self.per_source_rate = per_source_rate
        self.per_source_burst = per_source_burst
        self.total_rate = total_rate
        self.total_burst = total_burst
        self.max_sources = max_sources
        self._clock = clock
        self._total = TokenBucket(total_rate, total_burst, clock())
        # forgetting the idlest sources is cheap and bounded; what a flood from many sources may
        # cost is bounded by the shared bucket anyway
        self._sources = TokenBuckets(per_source_rate, per_source_burst, max_sources)

    def allow(self, source: Hashable) -> bool:
        """Take a token for one open of a datagram from ``source``; False if there is none."""
        now = self._clock()
        bucket = self._sources.bucket(source, now)
        # both buckets or neither: a refusal by one leaves the other's token
        if bucket.available(now) < 1 or self._total.available(now) < 1:
            return False
        return bucket.take(now) and self._total.take(now)
