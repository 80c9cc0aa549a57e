#!/usr/bin/env python3
"""Scale benchmark: N real `kairos run` processes in namespaces on one bridge, for several N.

For each N (``--sizes``, default 10 25 50 100) it starts the nodes in batches (``--batch`` at a
time, each batch waiting for its APIs, so start-up load does not distort formation), then prints
one JSON line with:

- ``formation_s``: from the last API up to every node counting N-1 members;
- ``idle_cpu_share_per_node``: median over nodes of CPU time / wall time in a quiet window
  (``--quiet`` seconds, default 30), from /proc;
- ``idle_rss_mb_per_node``: median RSS;
- ``idle_bytes_per_s_per_node``: median of (rx + tx bytes of the node's interface) / window;
- ``connections_per_node``: median and max admitted connections;
- ``propagation_ms_p50`` / ``_p99``: a write on one node until every other node's watch stream
  delivers it (``--writes`` writes);
- ``left_after_kill_9_s``: kill -9 of a non-leader until no survivor counts it alive;
- ``failover_s``: kill -9 of the leader until every survivor names one new leader.

Needs root. All N processes share this machine's cores: the JSON says how many there are.
Usage: bench/scale.py [--sizes 10 25 50 100] [--quiet 30] [--writes 10] [--batch 10]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from kairos_core.labnodes import LabNetwork
from kairos_core.labpartition import leader_of
from kairos_core.netlab import Lab, require_netns, unique_prefix

TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else None


def wait(condition, timeout, interval=0.2):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(interval)
    return time.monotonic()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def interface_bytes(lab: Lab, index: int) -> int:
    out = lab.run(index, ["cat", "/sys/class/net/eth0/statistics/rx_bytes", "/sys/class/net/eth0/statistics/tx_bytes"])
    return sum(int(x) for x in out.stdout.split())


def members(node) -> int:
    status = node.status()
    return status["members"] if status else -1


def propagation(network, writer, others, key: str) -> list[float]:
    arrived: dict[int, float] = {}
    ready = threading.Barrier(len(others) + 1, timeout=30)

    def watch(node):
        stream = node.client.stream("/api/watch", params={"bucket": "scale"})
        try:
            ready.wait()
            for update in stream:
                if update.get("key") == key:
                    arrived[node.index] = time.monotonic()
                    return
        except Exception:
            return
        finally:
            stream.close()

    threads = [threading.Thread(target=watch, args=(n,), daemon=True) for n in others]
    for thread in threads:
        thread.start()
    ready.wait()
    time.sleep(1.0)  # the watch requests reach the nodes
    started = time.monotonic()
    writer.client.request("PUT", f"/api/ledger/scale/{key}", json={"at": started})
    for thread in threads:
        thread.join(timeout=15)
    return [(arrived[n.index] - started) * 1000 for n in others if n.index in arrived]


def run_size(n: int, args) -> dict:
    with Lab(unique_prefix("ks"), n) as lab, tempfile.TemporaryDirectory() as root:
        network = LabNetwork(lab, Path(root))
        try:
            for first in range(1, n + 1, args.batch):
                batch = [network.start(i, p2p={"disable_dht": True}) for i in range(first, min(n, first + args.batch - 1) + 1)]
                for node in batch:
                    network.wait_up(node, timeout=120)
            last_api = time.monotonic()
            nodes = list(network.nodes.values())
            formed = wait(lambda: all(members(node) == n - 1 for node in nodes), args.timeout, interval=0.5)
            result = {"bench": "scale", "nodes": n, "processes_sharing_cores": n, "cores": os.cpu_count(),
                      "formation_s": round(formed - last_api, 2)}
            time.sleep(5)  # let formation's work settle
            pids = {node.index: node.process.pid for node in nodes}
            cpu0 = {i: cpu_seconds(p) for i, p in pids.items()}
            net0 = {node.index: interface_bytes(lab, node.index) for node in nodes}
            t0 = time.monotonic()
            time.sleep(args.quiet)
            elapsed = time.monotonic() - t0
            cpu = [(cpu_seconds(p) - cpu0[i]) / elapsed for i, p in pids.items()]
            traffic = [(interface_bytes(lab, node.index) - net0[node.index]) / elapsed for node in nodes]
            connections = [(node.status() or {}).get("admitted", 0) for node in nodes]
            result.update({
                "idle_cpu_share_per_node": round(statistics.median(cpu), 4),
                "idle_rss_mb_per_node": round(statistics.median(rss_mb(p) for p in pids.values()), 1),
                "idle_bytes_per_s_per_node": round(statistics.median(traffic)),
                "connections_per_node": {"median": statistics.median(connections), "max": max(connections)},
            })
            delays = []
            for w in range(args.writes):
                writer = nodes[w % len(nodes)]
                delays += propagation(network, writer, [x for x in nodes if x is not writer], f"k{w}")
            result["propagation_ms_p50"] = round(percentile(delays, 0.5), 1) if delays else None
            result["propagation_ms_p99"] = round(percentile(delays, 0.99), 1) if delays else None
            result["propagation_delivered"] = f"{len(delays)}/{args.writes * (n - 1)}"

            leader, _ = leader_of(nodes[0]) or (None, 0)
            victim = next(node for node in nodes if node.peer_id != leader)
            survivors = [node for node in nodes if node is not victim]
            killed = time.monotonic()
            victim.process.send_signal(signal.SIGKILL)
            try:
                gone = wait(lambda: all(victim.peer_id not in node.alive_peers() for node in survivors), 60, interval=0.1)
                result["left_after_kill_9_s"] = round(gone - killed, 2)
            except TimeoutError:
                result["left_after_kill_9_s"] = None
            view = leader_of(survivors[0])
            if view:
                old, epoch = view
                target = next(node for node in survivors if node.peer_id == old)
                rest = [node for node in survivors if node is not target]
                killed = time.monotonic()
                target.process.send_signal(signal.SIGKILL)
                try:
                    done = wait(lambda: len({leader_of(x) for x in rest}) == 1
                                and (leader_of(rest[0]) or (old, 0))[1] > epoch, 60, interval=0.1)
                    result["failover_s"] = round(done - killed, 2)
                except TimeoutError:
                    result["failover_s"] = None
            return result
        finally:
            network.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--quiet", type=float, default=30.0)
    parser.add_argument("--writes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=300.0, help="longest wait for formation")
    args = parser.parse_args()
    reason = require_netns()
    if reason:
        print(json.dumps({"error": reason}))
        sys.exit(1)
    for n in args.sizes:
        try:
            print(json.dumps(run_size(n, args)), flush=True)
        except TimeoutError:
            print(json.dumps({"bench": "scale", "nodes": n, "error": f"no full membership within {args.timeout} s"}), flush=True)


if __name__ == "__main__":
    main()
