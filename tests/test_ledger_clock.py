"""The hybrid logical clock: monotonic, follows wall time, refuses far-future versions and is never
dragged more than half the drift bound ahead of its wall clock."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_core.ledger import HybridLogicalClock, Version
from kairos_core.ledger.clock import MAX_COUNTER

PEER = "12D3KooWPeerA"


class FakeWall:
    def __init__(self, ms: int = 1_000_000) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def test_versions_order_by_wall_then_counter_then_peer() -> None:
    assert Version(1, 5, "z") < Version(2, 0, "a")
    assert Version(2, 0, "z") < Version(2, 1, "a")
    assert Version(2, 1, "a") < Version(2, 1, "b")


def test_tick_follows_the_wall_clock_and_counts_within_a_millisecond() -> None:
    wall = FakeWall(5000)
    clock = HybridLogicalClock(PEER, now_ms=wall)
    assert clock.tick() == Version(5000, 0, PEER)
    assert clock.tick() == Version(5000, 1, PEER)
    wall.ms = 6000
    assert clock.tick() == Version(6000, 0, PEER)


def test_tick_stays_ahead_when_the_wall_clock_goes_back() -> None:
    wall = FakeWall(5000)
    clock = HybridLogicalClock(PEER, now_ms=wall)
    first = clock.tick()
    wall.ms = 1000
    assert clock.tick() > first


def test_observe_moves_local_writes_after_the_remote_version() -> None:
    wall = FakeWall(5000)
    clock = HybridLogicalClock("b-peer", now_ms=wall)
    remote = Version(5000 + 30_000, 7, "z-peer")
    assert clock.observe(remote)
    assert clock.tick() > remote


def test_observe_refuses_versions_beyond_the_drift_bound() -> None:
    wall = FakeWall(5000)
    clock = HybridLogicalClock(PEER, now_ms=wall, max_drift_ms=60_000)
    assert not clock.observe(Version(5000 + 60_001, 0, "other"))
    assert clock.rejected_future == 1
    assert clock.tick() == Version(5000, 0, PEER)  # the refused version left no trace
    assert clock.observe(Version(5000 + 60_000, 0, "other"))


def test_observe_moves_the_clock_at_most_half_the_drift_bound_ahead() -> None:
    wall = FakeWall(5000)
    clock = HybridLogicalClock(PEER, now_ms=wall, max_drift_ms=60_000)
    assert clock.max_lead_ms == 30_000
    forged = Version(5000 + 59_000, 0, "insider")
    assert clock.observe(forged)  # within the drift bound: accepted...
    assert clock.last == Version(5000 + 30_000, 0, PEER)  # ...but it drags the clock no further than the lead bound
    assert clock.capped == 1 and clock.rejected_future == 0
    assert Version(5000 + 30_000, 0, "") < clock.tick() < forged
    assert clock.observe(Version(5000 + 20_000, 3, "honest"))  # below the ceiling: folded in as usual
    assert clock.capped == 1


def test_a_dragged_clock_still_writes_within_reach_of_peers_behind_it() -> None:
    """The issue's attack on two clocks: B merges a version stamped now + 59 s; C's wall clock is
    behind B's. Every version B writes afterwards must pass C's drift check."""
    for behind_ms in (1_000, 5_000, 29_999):
        wall_b = FakeWall(10**9)
        wall_c = FakeWall(10**9 - behind_ms)
        b = HybridLogicalClock("b", now_ms=wall_b)
        c = HybridLogicalClock("c", now_ms=wall_c)
        assert b.observe(Version(wall_b.ms + 59_000, 0, "insider"))
        for _ in range(3):
            assert c.observe(b.tick()), f"a node {behind_ms} ms behind refused an honest write"
            wall_b.ms += 10
            wall_c.ms += 10
        assert c.rejected_future == 0


def test_without_the_lead_bound_the_dragged_clock_is_refused_by_a_node_behind() -> None:
    """What the lead bound prevents (max_lead_ms = max_drift_ms was the old behaviour)."""
    wall_b, wall_c = FakeWall(10**9), FakeWall(10**9 - 2_000)
    b = HybridLogicalClock("b", now_ms=wall_b, max_lead_ms=60_000)
    c = HybridLogicalClock("c", now_ms=wall_c)
    assert b.observe(Version(wall_b.ms + 59_000, 0, "insider"))
    assert not c.observe(b.tick())


def test_restore_is_bounded_by_the_lead_too() -> None:
    wall = FakeWall(5000)
    clock = HybridLogicalClock(PEER, now_ms=wall)
    clock.restore(Version(5000 + 59_000, 4, PEER))  # a far-ahead entry read back after a restart
    assert clock.last == Version(5000 + 30_000, 0, PEER)
    clock.restore(Version(5000 + 10_000, 4, PEER))  # our own earlier writes still count in full
    assert clock.last == Version(5000 + 30_000, 0, PEER)
    clock = HybridLogicalClock(PEER, now_ms=wall)
    clock.restore(Version(4000, 7, PEER))  # the wall clock went back since: we stay after our writes
    assert clock.tick() == Version(5000, 0, PEER)
    wall.ms = 3000
    assert clock.tick() == Version(5000, 1, PEER)


def test_tick_after_overwrites_a_far_ahead_entry_without_dragging_the_clock() -> None:
    wall = FakeWall(5000)
    clock = HybridLogicalClock(PEER, now_ms=wall)
    assert clock.tick_after(None) == Version(5000, 0, PEER)
    assert clock.tick_after(Version(4000, 9, "other")) == Version(5000, 1, PEER)
    far = Version(5000 + 59_000, 7, "insider")
    assert clock.observe(far)
    after = clock.tick_after(far)
    assert after == Version(far.wall_ms, far.counter + 1, PEER) and after > far
    assert clock.last.wall_ms == 5000 + 30_000  # the clock stayed at the ceiling
    assert clock.tick() < far  # other keys' writes are not dragged along
    assert clock.tick_after(Version(55_000, MAX_COUNTER, "other")) == Version(55_001, 0, PEER)
    same_reading = Version(clock.last.wall_ms + 1, clock.last.counter, "a")  # below PEER as tie-breaker
    assert clock.tick_after(same_reading) > same_reading


def test_the_lead_bound_lies_within_the_drift_bound() -> None:
    assert HybridLogicalClock(PEER, max_drift_ms=10_000).max_lead_ms == 5_000
    assert HybridLogicalClock(PEER, max_drift_ms=10_000, max_lead_ms=0).max_lead_ms == 0
    with pytest.raises(ValueError):
        HybridLogicalClock(PEER, max_drift_ms=10_000, max_lead_ms=10_001)


@settings(max_examples=200)
@given(
    st.lists(st.tuples(st.sampled_from(["tick", "observe", "wall"]), st.integers(0, 10**7), st.integers(0, 1000)), max_size=60)
)
def test_every_tick_is_greater_than_everything_seen_before_up_to_the_lead_bound(steps) -> None:
    wall = FakeWall(10**6)
    clock = HybridLogicalClock(PEER, now_ms=wall)
    seen = Version(0, 0, "")
    highest_wall = wall.ms
    for op, ms, counter in steps:
        if op == "wall":
            wall.ms = ms
            highest_wall = max(highest_wall, ms)
        elif op == "observe":
            remote = Version(ms, counter, "remote")
            if clock.observe(remote):
                seen = max(seen, min(remote, Version(wall.ms + clock.max_lead_ms, 0, "")))
        else:
            version = clock.tick()
            assert version > seen
            seen = version
        # whatever it observed, the clock is never further ahead of the wall clock than the lead bound
        assert clock.last.wall_ms <= highest_wall + clock.max_lead_ms
