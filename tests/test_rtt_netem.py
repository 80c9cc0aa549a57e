"""RTT across a delayed link (issue #17): two ``kairos run`` processes in network namespaces, each
node's ``eth0`` delaying what it sends by 50 ms (``tc qdisc … netem delay 50ms``), so every round
trip takes at least 100 ms. ``kairos peers`` (text and ``--json``) and the node's ``nodes`` entry
must show it; once the peer is gone its RTT goes too.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys

import pytest

DELAY_MS = 50
ROUND_TRIP_MS = 2 * DELAY_MS  # both ends delay what they send

pytestmark = pytest.mark.skipif(shutil.which("tc") is None, reason="needs tc (Debian package iproute2)")


def cli(node, *argv: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "kairos_core", *argv, "--socket", str(node.root / "api.sock")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_rtt_reflects_a_netem_delay_and_goes_with_the_peer(lab_network) -> None:
    network = lab_network(2)
    for index in (1, 2):
        added = network.lab.run(index, ["tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", f"{DELAY_MS}ms"])
        if added.returncode != 0:
            pytest.skip(f"netem unavailable: {added.stderr.decode(errors='replace').strip()}")
    first, second = (network.start(index, p2p={"disable_dht": True}) for index in (1, 2))
    ids = [network.wait_up(node, timeout=60) for node in (first, second)]
    network.wait_until(lambda: first.alive_peers() == {ids[1]} and second.alive_peers() == {ids[0]}, 90, "the two nodes admitted")

    def row(node, peer: str) -> dict:
        return {r["peer_id"]: r for r in json.loads(cli(node, "peers", "--json", "--all"))}[peer]

    network.wait_until(lambda: row(first, ids[1])["rtt_ms"] is not None and row(second, ids[0])["rtt_ms"] is not None, 30, "RTTs")
    for node, peer in ((first, ids[1]), (second, ids[0])):
        measured = row(node, peer)
        # every sample is >= 100 ms; 10 % of slack for when the ping's send time is stamped
        assert 0.9 * ROUND_TRIP_MS <= measured["rtt_ms"] < 1000, measured
        assert measured["transport"] == "direct"
    table = cli(first, "peers")
    line = next(line for line in table.splitlines() if ids[1] in line)
    assert re.search(r" \d+ ms ", line), table

    # what the dashboards of others read: the entry's rtt_ms, lined up with its neighbours
    def published() -> int | None:
        entry = first.client.request("GET", "/api/ledger/nodes").get(ids[0], {})
        values = dict(zip(entry.get("neighbours", []), entry.get("rtt_ms", [])))
        return values.get(ids[1])

    network.wait_until(lambda: published() is not None, 30, "node 1's entry publishing its RTT to node 2")
    assert 0.9 * ROUND_TRIP_MS <= published() < 1000

    network.kill(2, signal.SIGKILL)
    network.wait_until(lambda: row(first, ids[1])["rtt_ms"] is None, 60, "node 2's RTT gone from node 1")
    assert row(first, ids[1])["transport"] is None
