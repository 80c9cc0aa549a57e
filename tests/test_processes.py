"""Real `kairos run` processes in network namespaces on one bridge: mDNS, DHT, admission, kill -9."""

from __future__ import annotations

import signal
import time

import pytest

from kairos_testing.labnodes import LabNetwork
from kairos_core.token import generate_token

pytestmark = pytest.mark.slow


def test_five_nodes_find_each_other_by_mdns_and_kill_9_is_seen_as_left(lab_network):
    network = lab_network(5)
    nodes = [network.start(i, p2p={"disable_dht": True}) for i in range(1, 6)]
    ids = {node.index: network.wait_up(node) for node in nodes}
    network.wait_until(
        lambda: all(node.alive_peers() == set(ids.values()) - {ids[node.index]} for node in nodes),
        30,
        "full membership over mDNS",
    )

    network.kill(3, signal.SIGKILL)
    survivors = [node for node in nodes if node.index != 3]
    network.wait_until(lambda: all(ids[3] not in node.alive_peers() for node in survivors), 10, "left after kill -9")
    assert all(len(node.alive_peers()) == 3 for node in survivors)


def test_dht_only_through_one_bootstrap_node(lab_network):
    network = lab_network(3)
    bootstrap = network.start(1, p2p={"disable_mdns": True})
    bootstrap_id = network.wait_up(bootstrap)
    seed = [network.multiaddr(1, bootstrap_id)]
    others = [network.start(i, p2p={"disable_mdns": True, "bootstrap_peers": seed}) for i in (2, 3)]
    ids = {bootstrap_id, *(network.wait_up(node) for node in others)}
    everyone = [bootstrap, *others]
    network.wait_until(
        lambda: all(node.alive_peers() == ids - {node.peer_id} for node in everyone), 30, "full membership over the DHT"
    )
    # nodes 2 and 3 knew only the bootstrap node: they must end up connected to each other directly
    network.wait_until(
        lambda: all(row["connected"] for row in others[0].client.request("GET", "/api/peers")),
        30,
        "a direct connection found through the DHT",
    )


def test_a_node_with_another_token_stays_out(lab_network):
    network = lab_network(3)
    members = [network.start(i, p2p={"disable_dht": True}) for i in (1, 2)]
    member_ids = {node.index: network.wait_up(node) for node in members}
    # the outsider dials a member directly (it cannot find them: its mDNS names differ): admission must refuse it
    outsider = network.start(
        3, token=generate_token(), p2p={"disable_dht": True, "bootstrap_peers": [network.multiaddr(1, member_ids[1])]}
    )
    outsider_id = network.wait_up(outsider)
    outsider.client.request("PUT", "/api/ledger/probe/x", content="1")
    network.wait_until(
        lambda: all(node.alive_peers() == set(member_ids.values()) - {node.peer_id} for node in members), 30, "members"
    )
    network.wait_until(
        lambda: (
            members[0].status()["counters"].get("p2p_admission_failed", 0) > 0
            or outsider.status()["counters"].get("p2p_admission_failed", 0) > 0
        ),
        15,
        "a refused admission",
    )
    assert all(outsider_id not in node.alive_peers() for node in members)
    assert outsider.alive_peers() == set()
    assert all("probe" not in node.client.request("GET", "/api/ledger") for node in members)


def test_sigterm_stops_a_node_cleanly_and_fast(lab_network):
    network = lab_network(1)
    node = network.start(1, p2p={"disable_dht": True})
    network.wait_up(node)
    started = time.monotonic()
    node.process.send_signal(signal.SIGTERM)
    code = node.process.wait(timeout=10)
    elapsed = time.monotonic() - started
    assert code == 0, node.log[-2000:]
    assert elapsed < 5, f"took {elapsed:.1f} s"  # generous bound; the benchmark reports the figure
    assert not (node.root / "api.sock").exists()


def test_a_kairos_token_never_rotating_works_unchanged(netlab, tmp_path):
    """Kairos generates tokens with interval = max int64: window 0 forever, no previous window."""
    import dataclasses

    base = generate_token()
    forever = 2**63 - 1
    kairos_token = dataclasses.replace(
        base, dht=dataclasses.replace(base.dht, interval=forever), crypto=dataclasses.replace(base.crypto, interval=forever)
    )
    network = LabNetwork(netlab(2), tmp_path, token=kairos_token)
    try:
        nodes = [network.start(i, p2p={"disable_dht": True}) for i in (1, 2)]
        ids = {network.wait_up(node) for node in nodes}
        network.wait_until(
            lambda: all(node.alive_peers() == ids - {node.peer_id} for node in nodes), 30, "membership with a Kairos token"
        )
        nodes[0].client.request("PUT", "/api/ledger/k/v", content="1")
        network.wait_until(lambda: nodes[1].client.request("GET", "/api/ledger/k") == {"v": 1}, 15, "replication")
    finally:
        network.close()
