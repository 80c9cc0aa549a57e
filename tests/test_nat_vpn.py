"""The VPN across NATs (issue #15): P public, A and B each behind its own NAT, bootstrapping from P
only (mDNS and the DHT off). UDP cannot cross between A and B (B's NAT is symmetric), so their VPN
runs ``relay via P``: P forwards their sealed datagrams (:mod:`kairos_plugin_tunvpn.relaydgram`),
and a ping between their VIPs gets through. Between P and each of them UDP works both ways and
stays.
"""

from __future__ import annotations

import shutil
import time

import pytest

from kairos_testing.netlab import PORT_PRESERVING, SYMMETRIC

netns = pytest.mark.netns
labvpn = pytest.importorskip("kairos_testing.vpnlab", reason="the tunvpn plugin is not installed")


@pytest.fixture
def nat_vpn(netns_unavailable, tmp_path):
    if netns_unavailable is not None:
        pytest.skip(netns_unavailable)
    if shutil.which("ping") is None:
        pytest.skip("the 'ping' command is missing (apt-get install iputils-ping)")
    with labvpn.NatVPNLab(tmp_path, [PORT_PRESERVING, SYMMETRIC]) as vpn:
        yield vpn


@netns
def test_vpn_between_two_nated_nodes_runs_over_the_relayed_connection(nat_vpn) -> None:
    vpn = nat_vpn
    a_id, b_id = vpn.peer_ids[2], vpn.peer_ids[3]
    vpn.wait(lambda: b_id in vpn.relayed_peers(2) and a_id in vpn.relayed_peers(3), 60, "A and B connected through P")
    vip_b, vip_a = vpn.vip(3), vpn.vip(2)
    vpn.wait(lambda: vpn.ping(2, vip_b, count=3), 60, "a ping from A to B's VIP")
    assert vpn.ping(3, vip_a, count=3), vpn.explain(2, 3)
    # no UDP between them (one NAT is symmetric): P relays their sealed datagrams
    via = f"relay via {vpn.peer_ids[1]}"
    vpn.wait(lambda: vpn.path(2, 3) == via and vpn.path(3, 2) == via, 60, f"A and B on '{via}'")
    # P and each NATed node: UDP both ways (P answers at the router's mapping the node's
    # datagrams come from, not at its LAN address), and it stays there: the ~10 s flip is gone
    for nated in (2, 3):
        vpn.wait(
            lambda: vpn.path(1, nated) == "direct" and vpn.path(nated, 1) == "direct",  # noqa: B023 (polled here)
            60,
            f"UDP both ways between P and node {nated}",
        )
    switches = {i: vpn.counters(i).get("vpn_path_switches", 0) for i in (1, 2, 3)}
    time.sleep(25)  # two and a half of the old flip's periods
    assert {i: vpn.counters(i).get("vpn_path_switches", 0) for i in (1, 2, 3)} == switches, vpn.explain(1, 2)
    assert vpn.path(1, 2) == vpn.path(2, 1) == "direct"
