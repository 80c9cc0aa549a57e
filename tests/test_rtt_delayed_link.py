"""RTT across a delayed link (issue #17): two ``kairos run`` processes in network namespaces that
reach each other only through a TCP relay in a middle namespace (which does not forward), the relay
holding each chunk 50 ms in each direction, so every round trip takes at least 100 ms. This
kernel has no ``sch_netem``, so the delay is the relay's, not a qdisc's. ``kairos peers`` (text and
``--json``) and the node's ``nodes`` entry must show it; once the peer is gone its RTT goes too.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kairos_testing import delayproxy
from kairos_testing.labnodes import P2P_PORT, LabNetwork, LabNode
from kairos_testing.netlab import SplitLab, unique_prefix

pytestmark = pytest.mark.netns

DELAY_MS = 50
ROUND_TRIP_MS = 2 * DELAY_MS  # the relay delays both directions
A, B = 1, 2


def cli(node: LabNode, *argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "kairos_core", *argv, "--socket", str(node.root / "api.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def start_relay(lab: SplitLab) -> int:
    """The delaying relay in the middle: on its address towards A, to B's listen address."""
    relay = lab.popen_in_middle(
        [
            sys.executable,
            str(Path(delayproxy.__file__)),
            "--listen",
            f"{lab.middle_address(A)}:0",
            "--target",
            f"{lab.address(B)}:{P2P_PORT}",
            "--delay",
            str(DELAY_MS / 1000),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    ready = json.loads(relay.stdout.readline() or '{"ready": false}')
    assert ready["ready"], ready
    return ready["port"]


def test_rtt_reflects_a_delayed_link_and_goes_with_the_peer(netns_unavailable: str | None, tmp_path: Path) -> None:
    if netns_unavailable is not None:
        pytest.skip(netns_unavailable)
    with SplitLab(unique_prefix()) as lab:
        network = LabNetwork(lab, tmp_path)
        try:
            check_rtt(lab, network)
        finally:
            network.close()


def check_rtt(lab: SplitLab, network: LabNetwork) -> None:
    # No mDNS and no DHT: the relayed connection is the only path. B's dials back to A fail.
    quiet = {"disable_dht": True, "disable_mdns": True}
    second = network.start(B, p2p=quiet)
    second_id = network.wait_up(second, timeout=60)
    # The middle does not forward: B listens, yet A cannot reach it but through the relay.
    dial = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)"
    assert lab.run(A, [sys.executable, "-c", dial, lab.address(B), str(P2P_PORT)]).returncode != 0
    port = start_relay(lab)
    via_relay = f"/ip4/{lab.middle_address(A)}/tcp/{port}/p2p/{second_id}"
    first = network.start(A, p2p={**quiet, "bootstrap_peers": [via_relay]})
    first_id = network.wait_up(first, timeout=60)
    network.wait_until(
        lambda: first.alive_peers() == {second_id} and second.alive_peers() == {first_id}, 90, "the two nodes admitted"
    )

    def row(node: LabNode, peer: str) -> dict:
        return {r["peer_id"]: r for r in json.loads(cli(node, "peers", "--json", "--all"))}[peer]

    network.wait_until(
        lambda: row(first, second_id)["rtt_ms"] is not None and row(second, first_id)["rtt_ms"] is not None, 30, "RTTs"
    )
    for node, peer in ((first, second_id), (second, first_id)):
        measured = row(node, peer)
        # every sample is >= 100 ms; 10 % of slack for when the ping's send time is stamped
        assert 0.9 * ROUND_TRIP_MS <= measured["rtt_ms"] < 1000, measured
        assert measured["transport"] == "direct"
    table = cli(first, "peers")
    line = next(line for line in table.splitlines() if second_id in line)
    assert re.search(r" \d+ ms ", line), table

    # what the dashboards of others read: the entry's rtt_ms, lined up with its neighbours
    def published() -> int | None:
        entry = first.client.request("GET", "/api/ledger/nodes").get(first_id, {})
        values = dict(zip(entry.get("neighbours", []), entry.get("rtt_ms", [])))
        return values.get(second_id)

    network.wait_until(lambda: published() is not None, 30, "node A's entry publishing its RTT to node B")
    assert 0.9 * ROUND_TRIP_MS <= published() < 1000

    network.kill(B, signal.SIGKILL)
    network.wait_until(lambda: row(first, second_id)["rtt_ms"] is None, 60, "node B's RTT gone from node A")
    assert row(first, second_id)["transport"] is None
