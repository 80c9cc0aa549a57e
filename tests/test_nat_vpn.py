"""The VPN across NATs (issue #15): P public, A and B each behind its own NAT, bootstrapping from P
only (mDNS and the DHT off). UDP cannot cross between A and B (no hole punching yet), so their VPN
runs on the libp2p stream fallback over the connection relayed by P, and a ping between their VIPs
gets through.
"""

from __future__ import annotations

import shutil

import pytest

from kairos_core.labnodes import LabNetwork
from kairos_core.netlab import PORT_PRESERVING, PUBLIC, SYMMETRIC, NatLab, unique_prefix

netns = pytest.mark.netns
labvpn = pytest.importorskip("kairos_plugin_tunvpn.labvpn", reason="the tunvpn plugin is not installed")


@pytest.fixture
def nat_vpn(netns_unavailable, tmp_path):
    if netns_unavailable is not None:
        pytest.skip(netns_unavailable)
    if shutil.which("ping") is None:
        pytest.skip("the 'ping' command is missing (apt-get install iputils-ping)")
    vpn = labvpn.VPNLab(tmp_path, nodes=3)
    vpn.lab = NatLab([PUBLIC, PORT_PRESERVING, SYMMETRIC], unique_prefix("kv"))
    try:
        vpn.lab.start()
        vpn.network = LabNetwork(vpn.lab, tmp_path, autoload_plugins=True)
        yield vpn
    finally:
        vpn.close()


@netns
def test_vpn_between_two_nated_nodes_runs_over_the_relayed_connection(nat_vpn) -> None:
    vpn = nat_vpn
    net = vpn.network
    extra = {"vpn": vpn.vpn_options, "plugins": {"disabled": labvpn.other_plugins()}}
    p = net.start(1, p2p={"disable_mdns": True, "disable_dht": True}, extra=extra)
    vpn.peer_ids[1] = net.wait_up(p)
    bootstrap = [net.multiaddr(1, vpn.peer_ids[1])]
    for index in (2, 3):
        node = net.start(index, p2p={"disable_mdns": True, "disable_dht": True, "bootstrap_peers": bootstrap},
                         extra=extra)
        vpn.peer_ids[index] = net.wait_up(node)
    a_id, b_id = vpn.peer_ids[2], vpn.peer_ids[3]
    vpn.wait(lambda: all(len(vpn.links(i)) == 2 and all(row.get("vip") for row in vpn.links(i).values())
                         for i in (1, 2, 3)), 120, "VPN sessions between every pair")
    relayed = lambda index: (vpn.node(index).status() or {}).get("reachability", {}).get("relayed_peers", [])
    vpn.wait(lambda: b_id in relayed(2) and a_id in relayed(3), 60, "A and B connected through P")
    vip_b, vip_a = vpn.vip(3), vpn.vip(2)
    vpn.wait(lambda: vpn.ping(2, vip_b, count=3), 60, "a ping from A to B's VIP")
    assert vpn.ping(3, vip_a, count=3), vpn.explain(2, 3)
    assert vpn.path(2, 3) == "stream" and vpn.path(3, 2) == "stream"
