"""Leader election between real `kairos run` processes: kill -9 fail-over, 3+2 partition, steady state."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from kairos_testing.labnodes import LabNetwork

pytestmark = pytest.mark.slow

# Five processes importing libp2p at once on a loaded machine take longer than labnodes' 30 s.
STARTUP_TIMEOUT = 120.0


def leader_of(node):
    status = node.status()
    if not status or not status["leader"]:
        return None
    return status["leader"]["peer_id"], status["leader"]["epoch"]


class LeaderLog:
    """Polls every node's view of the leader in the background; records every (leader, epoch) seen."""

    def __init__(self, nodes) -> None:
        self.nodes = nodes
        self.seen: dict[int, set[str]] = {}
        self.changes = 0
        self._last: dict[int, tuple | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for node in list(self.nodes):
                if node.process.poll() is not None:
                    continue
                view = leader_of(node)
                if view:
                    self.seen.setdefault(view[1], set()).add(view[0])
                if node.index in self._last and view and self._last[node.index] and view != self._last[node.index]:
                    self.changes += 1
                if view:
                    self._last[node.index] = view
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def cluster(lab_network):
    def make(count: int, spare: int = 0) -> LabNetwork:
        network = lab_network(count + spare)  # closed by the fixture
        nodes = [network.start(i, p2p={"disable_dht": True}) for i in range(1, count + 1)]
        ids = {network.wait_up(node, timeout=STARTUP_TIMEOUT) for node in nodes}
        network.wait_until(lambda: all(node.alive_peers() == ids - {node.peer_id} for node in nodes), 30, "membership")
        network.wait_until(lambda: len({leader_of(n) for n in nodes}) == 1 and leader_of(nodes[0]), 30, "a leader")
        return network

    return make


def test_kill_9_of_the_leader_elects_a_new_one_with_a_higher_epoch(cluster):
    network = cluster(5)
    nodes = list(network.nodes.values())
    old, epoch = leader_of(nodes[0])
    victim = next(n for n in nodes if n.peer_id == old)
    victim.process.send_signal(signal.SIGKILL)
    survivors = [n for n in nodes if n is not victim]
    network.wait_until(
        lambda: all((leader_of(n) or (old, 0))[0] != old for n in survivors) and len({leader_of(n) for n in survivors}) == 1,
        15,
        "a new leader",
    )
    new, new_epoch = leader_of(survivors[0])
    assert new != old and new_epoch > epoch


def test_partition_3_2_at_most_one_leader_per_epoch_and_agreement_after_heal(cluster):
    network = cluster(5)
    nodes = list(network.nodes.values())
    log = LeaderLog(nodes)
    try:
        old, epoch = leader_of(nodes[0])
        leader_index = next(n.index for n in nodes if n.peer_id == old)
        others = [n.index for n in nodes if n.index != leader_index]
        minority, majority = [leader_index, others[0]], others[1:]
        network.lab.partition(minority, majority)
        try:
            majority_nodes = [network.nodes[i] for i in majority]
            network.wait_until(
                lambda: (
                    all((leader_of(n) or (None, 0))[1] > epoch for n in majority_nodes)
                    and len({leader_of(n) for n in majority_nodes}) == 1
                ),
                40,
                "a majority-side leader",
            )
            # the deposed leader stops claiming to lead once it sees it lost the majority
            network.wait_until(lambda: not network.nodes[leader_index].status()["is_leader"], 30, "old leader stepping down")
        finally:
            network.lab.heal()
        network.wait_until(
            lambda: len({leader_of(n) for n in nodes}) == 1 and all(leader_of(n) for n in nodes), 60, "agreement after heal"
        )
        final = leader_of(nodes[0])
        assert final[1] > epoch
        assert final[0] in {network.nodes[i].peer_id for i in majority}
    finally:
        log.stop()
    assert all(len(peers) == 1 for peers in log.seen.values()), log.seen


def test_steady_state_has_no_leader_changes(cluster):
    network = cluster(3, spare=1)
    nodes = list(network.nodes.values())
    first = leader_of(nodes[0])
    log = LeaderLog(nodes)
    time.sleep(8)  # several renewals; the benchmark watches a longer span
    extra = network.start(4, p2p={"disable_dht": True})  # a newcomer never takes over
    network.wait_up(extra)
    time.sleep(5)
    log.stop()
    assert log.changes == 0
    assert {leader_of(n) for n in [*nodes, extra]} == {first}
