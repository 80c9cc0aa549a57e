#!/usr/bin/env python3
"""Discovery benchmark: cold start of N `kairos run` processes in namespaces until full membership.

For mDNS (DHT off) and for the DHT (mDNS off, one bootstrap node), prints JSON with:
- ``from_launch_s``: launch of the first process → every node sees every other (includes Python
  and libp2p start-up, ~1 s per process on this machine);
- ``from_ready_s``: the last node's API answering → full membership (discovery proper);
then, for the mDNS network left idle, traffic per node and per peer (bytes/s on its interface), RSS
per node, and the time from a SIGKILL of one node until every other reports it gone. Needs root.

Usage: bench/discovery.py [--nodes 5] [--rounds 3] [--idle 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kairos_testing.labnodes import LabNetwork
from kairos_testing.netlab import Lab, require_netns, unique_prefix


def full_membership(network: LabNetwork, ids: dict[int, str], timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    everyone = set(ids.values())
    while time.monotonic() < deadline:
        if all(node.alive_peers() == everyone - {ids[i]} for i, node in network.nodes.items()):
            return time.monotonic()
        time.sleep(0.02)
    raise TimeoutError("no full membership")


def cold_start(mode: str, count: int, idle: float) -> dict:
    with Lab(unique_prefix("kb"), count) as lab, tempfile.TemporaryDirectory() as root:
        network = LabNetwork(lab, Path(root))
        try:
            launched = time.monotonic()
            if mode == "mdns":
                for i in range(1, count + 1):
                    network.start(i, p2p={"disable_dht": True})
                ids = {i: network.wait_up(node) for i, node in network.nodes.items()}
            else:
                first = network.start(1, p2p={"disable_mdns": True})
                ids = {1: network.wait_up(first)}
                seed = [network.multiaddr(1, ids[1])]
                for i in range(2, count + 1):
                    network.start(i, p2p={"disable_mdns": True, "bootstrap_peers": seed})
                ids.update({i: network.wait_up(network.nodes[i]) for i in range(2, count + 1)})
            ready = time.monotonic()
            done = full_membership(network, ids)
            result = {
                "mode": mode,
                "nodes": count,
                "from_launch_s": round(done - launched, 3),
                "from_ready_s": round(done - ready, 3),
            }
            if idle:
                result.update(idle_figures(lab, network, idle))
                result["left_after_kill_9_s"] = left_after_kill(network, ids, count)
            return result
        finally:
            network.close()


def left_after_kill(network: LabNetwork, ids: dict[int, str], victim: int) -> float:
    """SIGKILL one node; seconds until every other node has stopped counting it alive."""
    import signal

    killed = time.monotonic()
    network.kill(victim, signal.SIGKILL)
    others = [node for index, node in network.nodes.items() if index != victim]
    deadline = killed + 60
    while any(ids[victim] in node.alive_peers() for node in others):
        if time.monotonic() > deadline:
            raise TimeoutError("killed node still counted alive")
        time.sleep(0.02)
    return round(time.monotonic() - killed, 3)


def interface_bytes(lab: Lab, index: int) -> int:
    out = lab.run(
        index,
        ["cat", "/sys/class/net/eth0/statistics/rx_bytes", "/sys/class/net/eth0/statistics/tx_bytes"],
        check=True,
        text=True,
    ).stdout.split()
    return int(out[0]) + int(out[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def idle_figures(lab: Lab, network: LabNetwork, seconds: float) -> dict:
    time.sleep(5)  # let start-up syncs and elections settle
    before = {i: interface_bytes(lab, i) for i in network.nodes}
    time.sleep(seconds)
    after = {i: interface_bytes(lab, i) for i in network.nodes}
    per_node = [(after[i] - before[i]) / seconds for i in network.nodes]
    peers = len(network.nodes) - 1
    rss = [rss_mb(node.process.pid) for node in network.nodes.values()]
    return {
        "idle_seconds": seconds,
        "idle_bytes_per_s_per_node": round(statistics.mean(per_node), 1),
        "idle_bytes_per_s_per_peer": round(statistics.mean(per_node) / peers, 1),
        "idle_rss_mb_per_node": round(statistics.mean(rss), 1),
        "idle_rss_mb_max": round(max(rss), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle measurement (0: skip)")
    args = parser.parse_args()
    reason = require_netns()
    if reason:
        print(json.dumps({"error": reason}))
        sys.exit(1)
    for mode in ("mdns", "dht"):
        runs = [cold_start(mode, args.nodes, args.idle if (mode == "mdns" and r == 0) else 0) for r in range(args.rounds)]
        summary = {
            "bench": "discovery",
            "mode": mode,
            "nodes": args.nodes,
            "rounds": args.rounds,
            "from_ready_s_median": round(statistics.median(r["from_ready_s"] for r in runs), 3),
            "from_ready_s_max": round(max(r["from_ready_s"] for r in runs), 3),
            "from_launch_s_median": round(statistics.median(r["from_launch_s"] for r in runs), 3),
        }
        summary.update({k: v for k, v in runs[0].items() if k.startswith(("idle", "left"))})
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
