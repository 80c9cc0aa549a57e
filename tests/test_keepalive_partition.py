"""A silent cut between two real `kairos run` processes is noticed at both ends of the connection.

Only one end of a connection sends keepalive probes (kairos_core.p2p.keepalive); the other end
notices the probes stop. Cut off by a firewall that drops everything (no RST, no FIN), each node
must still see the other gone, and see it back after the heal.
"""

from __future__ import annotations

import time

import pytest

from kairos_core.p2p.keepalive import KEEPALIVE_DEAD, SILENCE_LIMIT

pytestmark = [pytest.mark.slow, pytest.mark.netns]

STARTUP_TIMEOUT = 120.0
# Either end's detection (the listener's is the later), the membership update and a loaded
# machine's slack; far below the ~15 minutes TCP alone would take.
NOTICED_WITHIN = SILENCE_LIMIT + KEEPALIVE_DEAD + 10


def test_both_ends_notice_a_silent_cut_and_find_each_other_after_the_heal(lab_network):
    network = lab_network(2)
    nodes = [network.start(i, p2p={"disable_dht": True}) for i in (1, 2)]
    ids = [network.wait_up(node, timeout=STARTUP_TIMEOUT) for node in nodes]
    network.wait_until(lambda: all(n.alive_peers() == set(ids) - {n.peer_id} for n in nodes), 60, "membership")
    network.lab.partition([1], [2])
    try:
        cut = time.monotonic()
        network.wait_until(lambda: all(not n.alive_peers() for n in nodes), NOTICED_WITHIN, "both ends noticing the cut")
        assert time.monotonic() - cut >= 1.0  # nothing was closed before the silence began
    finally:
        network.lab.heal()
    network.wait_until(lambda: all(n.alive_peers() == set(ids) - {n.peer_id} for n in nodes), 90, "membership after the heal")
