"""Healed partitions heal the network: five real `kairos run` processes split 3+2 again and again.

Every round cuts the sitting leader and one more node off (see ``kairos_testing.labpartition``),
writes on both sides, heals, and demands that every node reconnects to every other, holds every
acknowledged write of both sides with the key both sides wrote resolved one way everywhere, and
names one leader. Timings are the benchmark's (``bench/partition.py``); here only "it happens
within the round's timeout" is checked.
"""

from __future__ import annotations

import pytest

from kairos_testing.labnodes import LabNetwork
from kairos_testing.labpartition import leader_of, split_and_heal

pytestmark = [pytest.mark.slow, pytest.mark.netns]

NODES = 5
ROUNDS = 10
# libp2p refuses to redial a failed peer for 60 s (its negative cache) and the lease is 15 s:
# a split this long outlasts both.
LONG_SPLIT = 70.0
# Five processes importing libp2p at once on a loaded machine take longer than labnodes' 30 s.
STARTUP_TIMEOUT = 120.0


@pytest.fixture
def network(lab_network):
    network = lab_network(NODES)  # closed by the fixture, pass or fail
    for i in range(1, NODES + 1):
        network.start(i, p2p={"disable_dht": True})
    ids = {network.wait_up(node, timeout=STARTUP_TIMEOUT) for node in network.nodes.values()}
    network.wait_until(lambda: all(n.alive_peers() == ids - {n.peer_id} for n in network.nodes.values()), 60, "full membership")
    network.wait_until(
        lambda: len({leader_of(n) for n in network.nodes.values()}) == 1 and leader_of(network.nodes[1]) is not None,
        60,
        "a leader",
    )
    return network


def _explain(network: LabNetwork, result) -> str:
    logs = "\n".join(f"--- node {n.index}\n{n.log[-2000:]}" for n in network.nodes.values())
    return f"{result}\n{logs}"


def test_ten_3_2_splits_each_reconnect_converge_and_agree(network):
    for round_no in range(ROUNDS):
        result = split_and_heal(network, round_no, mode="input", timeout=45)
        assert result.ok and not result.missing, _explain(network, result)
        assert result.acknowledged == 100
        assert result.step_down_s is not None, "the minority's old leader kept saying it leads"


def test_a_split_that_drops_one_direction_only(network):
    result = split_and_heal(network, 0, mode="oneway", timeout=45)
    assert result.ok and not result.missing, _explain(network, result)
    assert result.step_down_s is not None


def test_a_split_longer_than_the_negative_cache_and_the_lease(network):
    result = split_and_heal(network, 0, mode="input", split_s=LONG_SPLIT, timeout=45)
    assert result.ok and not result.missing, _explain(network, result)
