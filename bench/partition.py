#!/usr/bin/env python3
"""Partition-heal benchmark: split N `kairos run` processes 3+2, write on both sides, heal; repeat.

Each round cuts the sitting leader and one other node off from the rest (see
``kairos_testing.labpartition``), writes ``--keys`` keys on each side plus one key both sides write,
heals, and times from the heal until every node is admitted to every other (``reconnect_s``),
every acknowledged write is everywhere with the shared key resolved one way (``converge_s``), and
every node names one leader (``leader_s``). From the cut: the old leader's connections to the
majority are gone (``cut_seen_s``), its membership counts none of them (``members_lost_s``), it stops
claiming to lead (``step_down_s``), the majority names a new leader (``new_leader_s``). Prints one
JSON line per round (with the replication counters that moved after the heal), then a summary with
p50/p99/max, the rounds that never made it, and the load average before and after (other work on
the machine skews every time). The network is formed once and reused across rounds.

Needs root. Usage: bench/partition.py [--rounds 20] [--nodes 5] [--mode input|bridge|oneway]
[--split-seconds S] [--timeout 60]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from kairos_testing.labnodes import LabNetwork
from kairos_testing.labpartition import CUT_MODES, leader_of, split_and_heal
from kairos_testing.netlab import Lab, require_netns, unique_prefix

# Five processes importing libp2p at once on a loaded machine take longer than labnodes' 30 s.
STARTUP_TIMEOUT = 120.0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def wait(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--mode", choices=CUT_MODES, default="input")
    parser.add_argument("--split-seconds", type=float, default=0.0, help="keep each split at least this long")
    parser.add_argument("--keys", type=int, default=50)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--keep-logs", metavar="DIR", help="copy every node's log here at the end")
    args = parser.parse_args()
    # stopped with SIGTERM (timeout, kill), unwind so the labs delete their namespaces and nodes
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    reason = require_netns()
    if reason:
        print(json.dumps({"error": reason}))
        sys.exit(1)
    load_before = os.getloadavg()
    with Lab(unique_prefix("kp"), args.nodes) as lab, tempfile.TemporaryDirectory() as root:
        network = LabNetwork(lab, Path(root))
        rounds = []
        try:
            for i in range(1, args.nodes + 1):
                network.start(i, p2p={"disable_dht": True})
            for node in network.nodes.values():
                network.wait_up(node, timeout=STARTUP_TIMEOUT)
            wait(lambda: all(len(n.alive_peers()) == args.nodes - 1 for n in network.nodes.values()), 60)
            wait(lambda: len({leader_of(n) for n in network.nodes.values()}) == 1 and leader_of(network.nodes[1]), 60)
            for r in range(args.rounds):
                result = split_and_heal(
                    network, r, mode=args.mode, split_s=args.split_seconds, keys=args.keys, timeout=args.timeout
                )
                rounds.append(result)
                print(json.dumps({"bench": "partition_round", "round": r, **result.__dict__}), flush=True)
                if not result.ok:  # a stuck round would spoil every later one: wait for the network
                    try:
                        wait(
                            lambda: (
                                len({leader_of(n) for n in network.nodes.values()}) == 1
                                and leader_of(network.nodes[1]) is not None
                            ),
                            120,
                        )
                    except TimeoutError:
                        break
        finally:
            if args.keep_logs:
                out = Path(args.keep_logs)
                out.mkdir(parents=True, exist_ok=True)
                for node in network.nodes.values():
                    (out / f"node{node.index}.log").write_text(node.log)
            network.close()
        summary: dict = {
            "bench": "partition",
            "nodes": args.nodes,
            "mode": args.mode,
            "rounds": len(rounds),
            "split_s": args.split_seconds,
            "never_converged": sum(not r.ok for r in rounds),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        }
        for name in ("reconnect_s", "converge_s", "leader_s", "cut_seen_s", "members_lost_s", "step_down_s", "new_leader_s"):
            values = [getattr(r, name) for r in rounds if getattr(r, name) is not None]
            summary[f"{name}_p50"] = percentile(values, 0.5)
            summary[f"{name}_p99"] = percentile(values, 0.99)
            summary[f"{name}_max"] = max(values) if values else None
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
