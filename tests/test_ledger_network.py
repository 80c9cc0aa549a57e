"""The ledger between real `kairos run` processes: concurrent writers, and a partition that heals."""

from __future__ import annotations

import json
import threading
import time

import pytest

from kairos_testing.labnodes import LabNetwork

pytestmark = pytest.mark.slow

FAST_SYNC = {"ledger": {"sync_interval": 2.0}}


@pytest.fixture
def network(lab_network):
    def make(count: int) -> LabNetwork:
        network = lab_network(count)  # closed by the fixture
        nodes = [network.start(i, p2p={"disable_dht": True}, extra=FAST_SYNC) for i in range(1, count + 1)]
        ids = {network.wait_up(node) for node in nodes}
        network.wait_until(lambda: all(node.alive_peers() == ids - {node.peer_id} for node in nodes), 30, "membership")
        return network

    return make


def entry(node, bucket: str, key: str):
    try:
        return node.client.request("GET", f"/api/ledger/{bucket}/{key}")
    except Exception:
        return None


def test_five_concurrent_writers_of_one_key_converge_on_one_winner(network):
    net = network(5)
    nodes = list(net.nodes.values())
    barrier = threading.Barrier(len(nodes))
    written = {}

    def write(node):
        barrier.wait()
        written[node.index] = node.client.request("PUT", "/api/ledger/race/key", content=json.dumps(f"from {node.index}"))

    threads = [threading.Thread(target=write, args=(node,)) for node in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # the winner is the write with the greatest version, on every node
    expected = max(written.values(), key=lambda e: (e["version"][0], e["version"][1], e["version"][2]))
    net.wait_until(
        lambda: all((entry(n, "race", "key") or {}).get("version") == expected["version"] for n in nodes),
        20,
        "convergence on one winner",
    )
    assert {entry(n, "race", "key")["value"] for n in nodes} == {expected["value"]}


def test_partition_writes_on_both_sides_heal_and_nothing_is_lost(network):
    net = network(5)
    nodes = net.nodes
    side_a, side_b = [1, 2, 3], [4, 5]
    net.lab.partition(side_a, side_b)
    acknowledged: dict[str, dict] = {}
    try:
        time.sleep(0.5)
        for index in side_a + side_b:
            for n in range(5):
                key = f"n{index}-{n}"
                acknowledged[key] = nodes[index].client.request("PUT", f"/api/ledger/split/{key}", content=json.dumps(n))
        # both sides also overwrite one shared key; the later version must win everywhere
        shared = [nodes[i].client.request("PUT", "/api/ledger/split/shared", content=json.dumps(f"side {i}")) for i in (2, 5)]
        time.sleep(1.0)
        # during the partition, each side sees only its own writes
        assert entry(nodes[1], "split", "n4-0") is None
        assert entry(nodes[4], "split", "n1-0") is None
    finally:
        net.lab.heal()
    winner = max(shared, key=lambda e: tuple(e["version"]))
    every_key = set(acknowledged) | {"shared"}
    net.wait_until(
        lambda: all(set(n.client.request("GET", "/api/ledger/split")) == every_key for n in nodes.values()),
        60,
        "convergence after heal",
    )
    for node in nodes.values():
        items = node.client.request("GET", "/api/ledger/split")
        assert all(items[key] == int(key.rsplit("-", 1)[1]) for key in acknowledged)
        assert items["shared"] == winner["value"]
