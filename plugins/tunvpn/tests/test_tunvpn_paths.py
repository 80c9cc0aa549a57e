"""The path ladder (issue #15): best working path wins, down at once, up only after it settled,
and a move up that does not hold backs off — so a path that comes and goes cannot make a link flap."""

from __future__ import annotations

import pytest

from kairos_plugin_tunvpn.fallback import PathHysteresis
from kairos_plugin_tunvpn.paths import DIRECT, PUNCHED, RELAY, STREAM, Path, PathLadder

UDP = Path(DIRECT, endpoint=("198.51.100.3", 4000))
RELAYED = Path(RELAY, via="12D3KooWRelay")
STREAMED = Path(STREAM)


def test_names_are_what_the_status_shows() -> None:
    assert [p.name for p in (UDP, Path(PUNCHED, endpoint=("1.2.3.4", 5)), RELAYED, STREAMED)] == [
        "direct",
        "punched",
        "relay via 12D3KooWRelay",
        "stream",
    ]
    with pytest.raises(ValueError, match="unknown path kind"):
        Path("carrier-pigeon")


def test_down_at_once_up_at_once_until_a_move_up_did_not_hold() -> None:
    ladder = PathLadder(PathHysteresis(retry=1, stable=30), settle=1.0)
    assert ladder.choose(0.0, [STREAMED]).kind == STREAM
    # UDP works: up at once (a new link's first UDP)
    assert ladder.choose(0.5, [UDP, STREAMED]) == UDP
    # UDP stops working: the relay, not the stream, at once
    assert ladder.choose(1.0, [RELAYED, STREAMED]) == RELAYED
    assert ladder.switches == 2 and ladder.hysteresis.failures == 1
    # UDP is back, but the last move up did not hold: it must work for a second first
    assert ladder.choose(2.0, [UDP, RELAYED, STREAMED]) == RELAYED
    assert ladder.choose(3.1, [UDP, RELAYED, STREAMED]).kind == DIRECT
    assert ladder.switches == 3


def test_up_twice_in_a_row_while_every_move_held() -> None:
    # stream -> relay, and a moment later punched UDP: no wait in between (nothing failed)
    ladder = PathLadder(PathHysteresis(retry=10, stable=30), settle=1.0)
    assert ladder.choose(0.0, [RELAYED, STREAMED]) == RELAYED
    assert ladder.choose(0.5, [Path(PUNCHED, endpoint=("198.51.100.3", 4000)), RELAYED, STREAMED]).kind == PUNCHED
    assert ladder.switches == 2


def test_a_moving_endpoint_or_a_punched_label_is_the_same_path() -> None:
    ladder = PathLadder(settle=0.0)
    ladder.start(UDP, 0.0)
    moved = Path(PUNCHED, endpoint=("198.51.100.3", 4444))
    assert ladder.choose(1.0, [moved, STREAMED]) == moved
    assert ladder.current.endpoint == ("198.51.100.3", 4444) and ladder.switches == 0


def test_a_path_that_comes_and_goes_backs_off() -> None:
    hysteresis = PathHysteresis(retry=10, stable=30, max_retry=300)
    ladder = PathLadder(hysteresis, settle=1.0)
    now, switches = 0.0, []
    # a relay that works for 2 s out of every 4, for 10 minutes, seen every half second
    while now < 600:
        working = [RELAYED, STREAMED] if now % 4 < 2 else [STREAMED]
        ladder.choose(now, working)
        switches.append(ladder.switches)
        now += 0.5
    # without back-off this would switch ~300 times; with it, the waits double up to 300 s
    assert ladder.switches < 16
    assert hysteresis.failures >= 4


def test_the_stream_is_always_there() -> None:
    ladder = PathLadder()
    ladder.start(UDP, 0.0)
    assert ladder.choose(1.0, []).kind == STREAM
