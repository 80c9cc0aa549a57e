"""The hybrid logical clock: monotonic, follows wall time, refuses far-future versions."""

from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_core.ledger import HybridLogicalClock, Version

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


@settings(max_examples=200)
@given(st.lists(st.tuples(st.sampled_from(["tick", "observe", "wall"]), st.integers(0, 10**7),
                          st.integers(0, 1000)), max_size=60))
def test_every_tick_is_greater_than_everything_seen_before(steps) -> None:
    wall = FakeWall(10**6)
    clock = HybridLogicalClock(PEER, now_ms=wall)
    seen = Version(0, 0, "")
    for op, ms, counter in steps:
        if op == "wall":
            wall.ms = ms
        elif op == "observe":
            remote = Version(ms, counter, "remote")
            if clock.observe(remote):
                seen = max(seen, remote)
        else:
            version = clock.tick()
            assert version > seen
            seen = version
