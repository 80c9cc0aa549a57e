#!/usr/bin/env python3
"""What it costs N `kairos run` processes, started together, to form a network.

For each N (default 20) prints one JSON line:
- ``formation_s``: from the first launch until every node counts N−1 members (as
  ``bench/ledger.py`` waits for), and ``cpu_s_to_formation``: the CPU the N processes used by then;
- ``cpu_s_after_formation`` and ``saturated_s_after_formation``: the CPU they used from then until
  the machine was quiet (8 s in a row below 30 % busy, at most 60 s), and the last second above
  50 % busy — the tail that delays the first writes after formation;
- ``counters``: the network's sums of the counters that explain it (sync sessions run and
  confirmed, checks that still differed, sessions that waited for a slot, sync bytes, stale and
  applied entries, gossip copies sent).

The N processes share this machine's cores with nothing else the bench starts. Needs root.
Usage: bench/formation.py [--sizes 20] [--runs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from kairos_testing.labnodes import LabNetwork, process_cpu_seconds
from kairos_testing.netlab import Lab, require_netns, unique_prefix

COUNTERS = (
    "syncs",
    "syncs_confirmed",
    "syncs_still_differing",
    "admission_syncs_queued",
    "admission_syncs_taken_over",
    "admission_syncs_abandoned",
    "p2p_in_bytes:/kairos/sync/1.1.0",
    "ledger_stale",
    "ledger_applied",
    "deltas_sent",
    "p2p_gossip_out_messages",
    "p2p_gossip_out_message_bytes",
)


def machine_busy(interval: float = 1.0) -> float:
    """Share of the machine's CPU time that was busy over the next ``interval`` seconds."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # idle + iowait

    total0, idle0 = sample()
    time.sleep(interval)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def measure(count: int) -> dict:
    with Lab(unique_prefix("kf"), count) as lab, tempfile.TemporaryDirectory() as root:
        network = LabNetwork(lab, Path(root))
        try:
            started = time.monotonic()
            for i in range(1, count + 1):
                network.start(i, p2p={"disable_dht": True})
            for node in network.nodes.values():
                network.wait_up(node, timeout=120)
            network.wait_until(
                lambda: all(len(node.alive_peers()) == count - 1 for node in network.nodes.values()),
                300 - (time.monotonic() - started),
                "full membership",
                interval=0.2,
            )
            formed = time.monotonic()
            pids = [node.process.pid for node in network.nodes.values()]
            at_formation = sum(process_cpu_seconds(pid) for pid in pids)
            quiet_run = saturated = 0
            for second in range(60):
                busy = machine_busy()
                if busy > 0.5:
                    saturated = second + 1
                quiet_run = quiet_run + 1 if busy < 0.3 else 0
                if quiet_run >= 8:
                    break
            at_quiet = sum(process_cpu_seconds(pid) for pid in pids)
            totals = dict.fromkeys(COUNTERS, 0)
            for node in network.nodes.values():
                counters = (node.status() or {}).get("counters") or {}
                for name in COUNTERS:
                    totals[name] += counters.get(name, 0)
            return {
                "bench": "formation",
                "nodes": count,
                "processes_sharing_cores": count,
                "cores": os.cpu_count(),
                "formation_s": round(formed - started, 1),
                "cpu_s_to_formation": round(at_formation, 1),
                "cpu_s_after_formation": round(at_quiet - at_formation, 1),
                "saturated_s_after_formation": saturated,
                "counters": totals,
            }
        finally:
            network.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="20")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    reason = require_netns()
    if reason:
        print(json.dumps({"error": reason}))
        sys.exit(1)
    for size in (int(s) for s in args.sizes.split(",") if s):
        for _ in range(args.runs):
            print(json.dumps(measure(size)), flush=True)


if __name__ == "__main__":
    main()
