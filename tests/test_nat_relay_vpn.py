"""Relayed sealed datagrams across NATs (issue #15): P public, A and B each behind a symmetric NAT
(no hole punching gets through), bootstrapping from P only. Their VPN runs ``relay via P``: P
forwards their sealed datagrams between its UDP sessions with each, without their keys. Ping and
TCP (iperf3) cross between the VIPs; the relay session ends when B leaves."""

from __future__ import annotations

import json
import shutil
import signal
import time

import pytest

from kairos_testing.netlab import SYMMETRIC

netns = pytest.mark.netns
labvpn = pytest.importorskip("kairos_testing.vpnlab", reason="the tunvpn plugin is not installed")


@pytest.fixture
def symmetric_vpn(netns_unavailable, tmp_path):
    if netns_unavailable is not None:
        pytest.skip(netns_unavailable)
    for tool in ("ping", "iperf3"):
        if shutil.which(tool) is None:
            pytest.skip(f"the '{tool}' command is missing (apt-get install iputils-ping iperf3)")
    with labvpn.NatVPNLab(tmp_path, [SYMMETRIC, SYMMETRIC]) as vpn:
        yield vpn


@netns
def test_two_nodes_behind_symmetric_nats_reach_each_other_relay_via_the_public_node(symmetric_vpn) -> None:
    vpn = symmetric_vpn
    relay = vpn.peer_ids[1]
    via = f"relay via {relay}"
    vpn.wait(lambda: vpn.path(2, 3) == via and vpn.path(3, 2) == via, 60, f"A and B on '{via}'")
    vip_b, vip_a = vpn.vip(3), vpn.vip(2)
    vpn.wait(lambda: vpn.ping(2, vip_b, count=3), 30, "a ping from A to B's VIP")
    assert vpn.ping(3, vip_a, count=3), vpn.explain(2, 3)
    server = vpn.popen(3, "iperf3", "-s", "-1", "-B", vip_b)
    try:
        time.sleep(0.5)
        result = vpn.run(2, "iperf3", "-c", vip_b, "-t", "2", "-J", timeout=60)
        received = json.loads(result.stdout)["end"]["sum_received"]["bytes"]
    finally:
        server.kill()
        server.wait(timeout=10)
    assert received > 1 << 20, vpn.explain(1, 2)
    assert vpn.path(2, 3) == via, vpn.explain(2, 3)  # the bulk transfer stayed on the relay
    # P carried it all (its counters are published once a second)
    vpn.wait(lambda: vpn.counters(1).get("vpn_relay_forwarded_bytes", 0) > received, 10, "P's count of relayed bytes")
    assert vpn.counters(1).get("vpn_relay_sessions") == 1
    # B leaves: P's session with it goes, and the relay session with it
    vpn.network.kill(3, signal.SIGTERM)
    vpn.wait(lambda: vpn.counters(1).get("vpn_relay_ended_left", 0) >= 1, 60, "P ends the relay session")
    assert vpn.counters(1).get("vpn_relay_sessions") == 0
