"""Which of a peer's connections are closed as idle duplicates (kairos_core.p2p.duplicates)."""

from __future__ import annotations

from kairos_core.p2p.duplicates import GRACE, ConnectionView, duplicates_to_close

LOW, HIGH = "12D3KooWAAA", "12D3KooWZZZ"
NOW = 1000.0
OLD = NOW - GRACE - 1


def test_the_lower_id_closes_the_idle_one_of_two_and_keeps_its_own_dial():
    # LOW dialled connection 0, HIGH dialled connection 1
    at_low = [ConnectionView(outbound=True, created_at=OLD, streams=0), ConnectionView(outbound=False, created_at=OLD, streams=0)]
    assert duplicates_to_close(LOW, HIGH, at_low, NOW) == [1]
    at_high = [
        ConnectionView(outbound=False, created_at=OLD, streams=0),
        ConnectionView(outbound=True, created_at=OLD, streams=0),
    ]
    assert duplicates_to_close(HIGH, LOW, at_high, NOW) == []  # the higher id leaves it to the lower


def test_a_connection_with_streams_is_kept_and_the_idle_one_closed_whoever_dialled_it():
    conns = [ConnectionView(True, OLD, 0), ConnectionView(False, OLD, 3)]
    assert duplicates_to_close(LOW, HIGH, conns, NOW) == [0]


def test_single_busy_and_young_connections_are_left_alone():
    assert duplicates_to_close(LOW, HIGH, [ConnectionView(True, OLD, 0)], NOW) == []
    busy = [ConnectionView(True, OLD, 1), ConnectionView(False, OLD, 2)]
    assert duplicates_to_close(LOW, HIGH, busy, NOW) == []
    young = [ConnectionView(True, OLD, 0), ConnectionView(False, NOW - 1, 0)]
    assert duplicates_to_close(LOW, HIGH, young, NOW) == []  # the young one may get a stream yet


def test_of_three_idle_connections_the_first_own_dial_is_kept():
    conns = [ConnectionView(False, OLD, 0), ConnectionView(True, OLD - 5, 0), ConnectionView(True, OLD, 0)]
    assert duplicates_to_close(LOW, HIGH, conns, NOW) == [0, 2]
