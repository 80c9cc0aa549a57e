"""Token buckets: what bounds how often one peer, one source or everybody together may make us
work (the dialler's dials of strangers, the DNS server's queries per source IP, the VPN's opens of
datagrams from new endpoints).

Sans-IO: the caller passes the time (seconds, monotonic), so tests step it and hot paths read the
clock once for several buckets. Not thread-safe: each user calls under its own lock or loop.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["TokenBucket", "TokenBuckets"]


class TokenBucket:
    """``rate`` tokens a second, up to ``burst`` kept; full at ``now`` when made.

    :param rate: tokens a second (0: none come back once taken).
    :param burst: the most kept, and so the most taken at once.
    """

    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate < 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate >= 0 and burst >= 1, not rate {rate}, burst {burst}")
        self.rate, self.burst = float(rate), float(burst)
        self.tokens, self.at = self.burst, now

    def available(self, now: float) -> float:
        """The tokens there are at ``now`` (refilled since the last call; a clock that went back
        adds none)."""
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
        return self.tokens

    def take(self, now: float) -> bool:
        """Take one token if there is one at ``now``; False (and nothing taken) if there is none."""
        if self.available(now) < 1.0:
            return False
        self.tokens -= 1.0
        return True


class TokenBuckets:
    """One :class:`TokenBucket` per key (a source address, a peer), each full when its key is
    first seen; at most ``max_keys`` kept, the longest unused forgotten first, so a flood of new
    keys costs bounded memory (a forgotten key starts full again: bound the total with a bucket
    of its own where that matters).
    """

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, not {max_keys}")
        TokenBucket(rate, burst, 0.0)  # the same checks of rate and burst, now
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def bucket(self, key: Hashable, now: float) -> TokenBucket:
        """``key``'s bucket (a full one for a new key), now the most recently used."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def take(self, key: Hashable, now: float) -> bool:
        """Take a token from ``key``'s bucket if it has one."""
        return self.bucket(key, now).take(now)

    def __len__(self) -> int:
        return len(self._buckets)
