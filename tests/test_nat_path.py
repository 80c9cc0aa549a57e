"""VPN path hysteresis (issue #15): a link whose UDP comes back only one way stops flapping."""

from __future__ import annotations

import pytest

fallback = pytest.importorskip("kairos_plugin_tunvpn.fallback", reason="the tunvpn plugin is not installed")


def _simulate(seconds: float, udp_holds: bool, udp_timeout: float = 5.0) -> int:
    """Switches of a link whose UDP trials each look good; they hold only if ``udp_holds``."""
    path = fallback.PathHysteresis(retry=10.0, stable=30.0, max_retry=300.0)
    on_udp, since, last_trial, switches = False, 0.0, 0.0, 0
    path.went_down(0.0)
    now = 0.0
    while now < seconds:
        now += 1.0
        if on_udp:
            if not udp_holds and now - since > udp_timeout:
                on_udp, since, last_trial = False, now, now
                path.went_down(now)
                switches += 1
            else:
                path.holding(now)
        elif path.may_try(now, last_trial):
            last_trial = now
            on_udp, since = True, now  # the trial's keepalive came back: "UDP works again"
            path.went_up(now)
            switches += 1
    return switches


def test_one_way_udp_backs_off_instead_of_flapping_every_ten_seconds() -> None:
    # without hysteresis: up every 10 s, down 5 s later: 2 switches per ~16 s, ~450 in an hour
    switches = _simulate(3600, udp_holds=False)
    assert switches <= 2 * 20, switches  # 10, 20, 40 … capped at 300 s between trials


def test_a_path_that_holds_stays_up_and_is_forgiven() -> None:
    path = fallback.PathHysteresis(retry=10.0, stable=30.0)
    for start in (0.0, 100.0, 200.0):  # three switches up that fell back within 30 s
        path.went_up(start)
        path.went_down(start + 6)
    assert path.failures == 3 and path.retry_interval() == 80.0
    path.went_up(300.0)
    path.holding(331.0)
    assert path.failures == 0 and path.retry_interval() == 10.0
    assert _simulate(600, udp_holds=True) == 1  # up once, never down again
