#!/usr/bin/env python3
"""Ledger benchmark with real `kairos run` processes in network namespaces.

For each N (default 3, 10, 20) prints one JSON line:
- ``propagation_ms_p50`` / ``_p99``: a write through node 1's API until every node's watch stream
  reports it (all watches run in this process: one clock), over ``--writes`` writes;
- ``sustained_writes_per_s``: writes accepted by node 1 as fast as one client sends them for
  ``--burst`` seconds, and ``burst_converged_s``: from the end of the burst until every node has the
  last of them;
then one line for a late joiner catching up on ``--catchup`` entries (default 10,000).

Needs root. Usage: bench/ledger.py [--sizes 3,10,20] [--writes 40] [--burst 3] [--catchup 10000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from kairos_core.api import APIClient
from kairos_testing.labnodes import LabNetwork
from kairos_testing.netlab import Lab, require_netns, unique_prefix


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Watches:
    """One watch stream per node on bucket `bench`, recording when each key arrives."""

    def __init__(self, network: LabNetwork) -> None:
        self.arrivals: dict[str, dict[int, float]] = {}
        self.lock = threading.Lock()
        self.threads = []
        for index, node in network.nodes.items():
            thread = threading.Thread(target=self._watch, args=(index, node.root / "api.sock"), daemon=True)
            thread.start()
            self.threads.append(thread)
        time.sleep(0.5)

    def _watch(self, index: int, socket: Path) -> None:
        try:
            for update in APIClient(socket).stream("/api/watch", params={"bucket": "bench"}):
                with self.lock:
                    self.arrivals.setdefault(update["key"], {})[index] = time.monotonic()
        except Exception:
            pass  # the node stopped

    def wait_all(self, key: str, count: int, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                seen = self.arrivals.get(key, {})
                if len(seen) >= count:
                    return max(seen.values())
            time.sleep(0.002)
        raise TimeoutError(f"{key} reached {len(self.arrivals.get(key, {}))} of {count} nodes")


def start_network(lab: Lab, root: Path, count: int) -> LabNetwork:
    network = LabNetwork(lab, root)
    for i in range(1, count + 1):
        network.start(i, p2p={"disable_dht": True})
    ids = {i: network.wait_up(node, timeout=120) for i, node in network.nodes.items()}
    deadline = time.monotonic() + 120
    while not all(len(node.alive_peers()) == count - 1 for node in network.nodes.values()):
        if time.monotonic() > deadline:
            raise TimeoutError("no full membership")
        time.sleep(0.2)
    time.sleep(2)  # gossipsub heartbeats graft the mesh
    del ids
    return network


def measure(count: int, writes: int, burst: float) -> dict:
    with Lab(unique_prefix("kl"), count) as lab, tempfile.TemporaryDirectory() as root:
        network = start_network(lab, Path(root), count)
        try:
            watches = Watches(network)
            writer = APIClient(network.nodes[1].root / "api.sock")
            delays = []
            for i in range(writes):
                key = f"p{i}"
                sent = time.monotonic()
                writer.request("PUT", f"/api/ledger/bench/{key}", content=json.dumps(i))
                delays.append((watches.wait_all(key, count) - sent) * 1000)
                time.sleep(0.05)
            sent = 0
            started = time.monotonic()
            while time.monotonic() - started < burst:
                writer.request("PUT", f"/api/ledger/bench/b{sent}", content=json.dumps(sent))
                sent += 1
            ended = time.monotonic()
            converged = watches.wait_all(f"b{sent - 1}", count, timeout=120)
            return {
                "bench": "ledger",
                "nodes": count,
                "writes": writes,
                "propagation_ms_p50": round(percentile(delays, 0.5), 1),
                "propagation_ms_p99": round(percentile(delays, 0.99), 1),
                "propagation_ms_max": round(max(delays), 1),
                "sustained_writes_per_s": round(sent / (ended - started), 1),
                "burst_converged_s": round(max(0.0, converged - ended), 3),
            }
        finally:
            network.close()


def catch_up(entries: int) -> dict:
    with Lab(unique_prefix("kc"), 2) as lab, tempfile.TemporaryDirectory() as root:
        network = LabNetwork(lab, Path(root))
        try:
            first = network.start(1, p2p={"disable_dht": True})
            network.wait_up(first)
            client = APIClient(first.root / "api.sock")
            for i in range(entries):
                client.request("PUT", f"/api/ledger/bulk/k{i}", content=json.dumps({"n": i, "pad": "x" * 40}))
            started = time.monotonic()
            late = network.start(2, p2p={"disable_dht": True})
            network.wait_up(late)
            up = time.monotonic()
            late_client = APIClient(late.root / "api.sock")
            while len(late_client.request("GET", "/api/ledger/bulk")) < entries:
                if time.monotonic() - started > 120:
                    raise TimeoutError("late joiner did not catch up")
                time.sleep(0.05)
            done = time.monotonic()
            return {
                "bench": "ledger_catch_up",
                "entries": entries,
                "from_process_start_s": round(done - started, 3),
                "from_api_up_s": round(done - up, 3),
            }
        finally:
            network.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="3,10,20")
    parser.add_argument("--writes", type=int, default=40)
    parser.add_argument("--burst", type=float, default=3.0)
    parser.add_argument("--catchup", type=int, default=10000)
    args = parser.parse_args()
    reason = require_netns()
    if reason:
        print(json.dumps({"error": reason}))
        sys.exit(1)
    for size in (int(s) for s in args.sizes.split(",") if s):
        print(json.dumps(measure(size, args.writes, args.burst)), flush=True)
    if args.catchup:
        print(json.dumps(catch_up(args.catchup)), flush=True)


if __name__ == "__main__":
    main()
