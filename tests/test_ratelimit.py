"""The core's token buckets (kairos_core.plugin.TokenBucket / TokenBuckets), on a stepped clock."""

from __future__ import annotations

import pytest

from kairos_core.plugin import TokenBucket, TokenBuckets


def test_a_bucket_starts_full_refills_at_its_rate_and_keeps_at_most_its_burst():
    bucket = TokenBucket(rate=2.0, burst=3, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(100.4)  # 0.8 of a token
    assert bucket.take(100.5) and not bucket.take(100.5)  # one came back
    assert bucket.available(1000.0) == 3.0  # never more than the burst


def test_a_refusal_takes_nothing_and_a_clock_going_back_adds_nothing():
    bucket = TokenBucket(rate=1.0, burst=1, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(10.5) and bucket.available(10.5) == pytest.approx(0.5)
    assert bucket.available(5.0) == pytest.approx(0.5)  # stepped back: no tokens from it
    assert bucket.take(11.0)


def test_rate_zero_means_none_come_back():
    bucket = TokenBucket(rate=0, burst=2, now=0.0)
    assert bucket.take(0.0) and bucket.take(1.0) and not bucket.take(10**6)


@pytest.mark.parametrize("rate, burst", [(-1, 1), (1, 0), (1, 0.5)])
def test_bad_rates_and_bursts_are_refused(rate, burst):
    with pytest.raises(ValueError, match="rate >= 0 and burst >= 1"):
        TokenBucket(rate, burst, 0.0)
    with pytest.raises(ValueError):
        TokenBuckets(rate, burst)


def test_buckets_per_key_are_independent_and_bounded_forgetting_the_idlest():
    buckets = TokenBuckets(rate=0, burst=1, max_keys=3)
    assert buckets.take("a", 0.0) and not buckets.take("a", 0.0)
    assert buckets.take("b", 0.0) and buckets.take("c", 0.0)
    assert not buckets.take("a", 1.0)  # used last now: "b" is the idlest
    assert buckets.take("d", 1.0) and len(buckets) == 3
    assert buckets.take("b", 2.0)  # forgotten, so full again ("c" is forgotten now)
    assert not buckets.take("a", 2.0)  # still remembered, and still empty
    assert buckets.take("c", 2.0)
    assert len(buckets) == 3
    with pytest.raises(ValueError, match="max_keys"):
        TokenBuckets(1, 1, max_keys=0)


def test_a_flood_of_new_keys_costs_bounded_memory():
    buckets = TokenBuckets(rate=1, burst=1, max_keys=100)
    for n in range(10_000):
        buckets.take(("10.0.0.1", n), float(n))
    assert len(buckets) == 100
