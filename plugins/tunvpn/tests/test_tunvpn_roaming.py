"""The budget for opening datagrams from unexpected endpoints (:mod:`kairos_plugin_tunvpn.roaming`)."""

from __future__ import annotations

import pytest

from kairos_plugin_tunvpn.roaming import RoamLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_each_source_has_its_burst_then_its_rate():
    clock = Clock()
    limiter = RoamLimiter(per_source_rate=2.0, per_source_burst=3, total_rate=1000.0, total_burst=1000, clock=clock)
    assert [limiter.allow("s") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("t")  # another source has a bucket of its own
    clock.now += 0.25  # half a token back
    assert not limiter.allow("s")
    clock.now += 0.25
    assert limiter.allow("s") and not limiter.allow("s")
    clock.now += 3600  # refilled up to the burst, no further
    assert sum(limiter.allow("s") for _ in range(10)) == 3


def test_all_sources_together_are_bounded_by_the_total():
    clock = Clock()
    limiter = RoamLimiter(per_source_rate=100.0, per_source_burst=5, total_rate=10.0, total_burst=8, clock=clock)
    assert sum(limiter.allow(("10.0.0.9", port)) for port in range(100)) == 8  # a flood from many sources
    clock.now += 0.5
    assert sum(limiter.allow(("10.0.0.9", port)) for port in range(100, 200)) == 5


def test_a_refusal_by_the_total_leaves_the_sources_token():
    clock = Clock()
    limiter = RoamLimiter(per_source_rate=0.0, per_source_burst=1, total_rate=1.0, total_burst=1, clock=clock)
    assert limiter.allow("a") and not limiter.allow("b")  # b refused for want of a total token
    clock.now += 1.0
    assert limiter.allow("b")  # b still had its own


def test_the_table_of_sources_stays_bounded():
    limiter = RoamLimiter(per_source_burst=1, total_rate=0.0, total_burst=10**6, max_sources=50)
    for port in range(10_000):
        limiter.allow(("10.0.0.9", port))
    assert len(limiter._sources) <= 50


@pytest.mark.parametrize("args", [(-1.0, 1, 1.0, 1), (1.0, 0, 1.0, 1), (1.0, 1, -1.0, 1), (1.0, 1, 1.0, 0)])
def test_nonsense_budgets_are_refused(args):
    with pytest.raises(ValueError):
        RoamLimiter(*args)
