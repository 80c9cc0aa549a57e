#!/usr/bin/env python3
"""Leader fail-over benchmark: SIGKILL the leader of N `kairos run` processes, repeatedly.

Each round kills the current leader and measures, on this machine's one clock, the time until
every survivor reports one new leader with a higher epoch (``failover_s``), then restarts the
killed node (same identity and state) before the next round. Then watches a steady network for
``--steady`` seconds and counts leader changes (there should be none). Prints JSON lines.

Needs root. Usage: bench/failover.py [--nodes 5] [--kills 10] [--steady 60]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from kairos_testing.labnodes import LabNetwork
from kairos_testing.netlab import Lab, require_netns, unique_prefix


def leader_of(node):
    status = node.status()
    if not status or not status["leader"]:
        return None
    return status["leader"]["peer_id"], status["leader"]["epoch"]


def wait(condition, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.02)
    return time.monotonic()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--steady", type=float, default=60.0)
    args = parser.parse_args()
    reason = require_netns()
    if reason:
        print(json.dumps({"error": reason}))
        sys.exit(1)
    with Lab(unique_prefix("kf"), args.nodes) as lab, tempfile.TemporaryDirectory() as root:
        network = LabNetwork(lab, Path(root))
        try:
            for i in range(1, args.nodes + 1):
                network.start(i, p2p={"disable_dht": True})
            ids = {i: network.wait_up(node) for i, node in network.nodes.items()}
            wait(lambda: all(len(n.alive_peers()) == args.nodes - 1 for n in network.nodes.values()), 60)
            wait(lambda: len({leader_of(n) for n in network.nodes.values()}) == 1 and leader_of(network.nodes[1]), 60)
            times = []
            for _ in range(args.kills):
                old, epoch = leader_of(network.nodes[1])
                index = next(i for i, peer in ids.items() if peer == old)
                survivors = [n for i, n in network.nodes.items() if i != index]
                killed = time.monotonic()
                network.kill(index, signal.SIGKILL)
                network.nodes[index].process.wait()
                # the condition is polled to the end before the loop moves on
                done = wait(
                    lambda: (
                        len({leader_of(n) for n in survivors}) == 1  # noqa: B023
                        and (leader_of(survivors[0]) or (old, 0))[1] > epoch  # noqa: B023
                    ),
                    60,
                )
                times.append(done - killed)
                network.start(index, p2p={"disable_dht": True})  # same state dir: same identity
                network.wait_up(network.nodes[index])
                wait(lambda: all(len(n.alive_peers()) == args.nodes - 1 for n in network.nodes.values()), 60)
                wait(lambda: len({leader_of(n) for n in network.nodes.values()}) == 1, 60)
            print(
                json.dumps(
                    {
                        "bench": "failover",
                        "nodes": args.nodes,
                        "kills": args.kills,
                        "failover_s_p50": round(percentile(times, 0.5), 3),
                        "failover_s_p99": round(percentile(times, 0.99), 3),
                        "failover_s_max": round(max(times), 3),
                        "failover_s_mean": round(statistics.mean(times), 3),
                    }
                ),
                flush=True,
            )
            if args.steady:
                views = {i: leader_of(n) for i, n in network.nodes.items()}
                changes, started = 0, time.monotonic()
                while time.monotonic() - started < args.steady:
                    for i, node in network.nodes.items():
                        view = leader_of(node)
                        if view and view != views[i]:
                            changes += 1
                            views[i] = view
                    time.sleep(0.2)
                print(
                    json.dumps({"bench": "steady_state", "nodes": args.nodes, "seconds": args.steady, "leader_changes": changes}),
                    flush=True,
                )
        finally:
            network.close()


if __name__ == "__main__":
    main()
