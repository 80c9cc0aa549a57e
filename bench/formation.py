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

With ``--join K``: N nodes form first and go quiet, then K more start together and join them;
one JSON line per run with ``join_formation_s`` (from the joiners' launch until all N+K count
N+K−1 members), the CPU of the old and of the new nodes from that launch until the machine is
quiet again, and the writes of their ``nodes`` entries by reason (``entry_writes_<reason>``, each
of which reaches every node) — what a batch of joiners costs the network already there.

The N (+ K) processes share this machine's cores with nothing else the bench starts. Needs root.
Usage: bench/formation.py [--sizes 20] [--runs 1] [--join K]
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


WRITE_REASONS = ("first", "neighbours_added", "neighbours_lost", "advertisement", "rtt_first", "rtt_moved", "refresh")
JOIN_COUNTERS = ("trims_announced_lazily", "unvouched_announcements_spared", "connections_trimmed")


def wait_quiet(limit: int = 60) -> int:
    """Until the machine was below 30 % busy for 8 s in a row (at most ``limit`` s); returns the
    last second it was above 50 % busy."""
    quiet_run = saturated = 0
    for second in range(limit):
        busy = machine_busy()
        if busy > 0.5:
            saturated = second + 1
        quiet_run = quiet_run + 1 if busy < 0.3 else 0
        if quiet_run >= 8:
            break
    return saturated


def counters_of(nodes, names) -> list[dict[str, int]]:
    out = []
    for node in nodes:
        counters = (node.status() or {}).get("counters") or {}
        out.append({name: counters.get(name, 0) for name in names})
    return out


def tally(per_node: list[int]) -> dict[str, int]:
    """Total, median and largest of one figure over nodes."""
    ordered = sorted(per_node)
    return {"total": sum(ordered), "per_node_median": ordered[len(ordered) // 2], "per_node_max": ordered[-1]}


def own_beats(nodes) -> list[int]:
    """How many times each node has written its ``nodes`` entry (its ``beat``): the total that
    older builds, without the ``entry_writes_*`` counters, can be compared on."""
    beats = []
    for node in nodes:
        try:
            beats.append(node.client.request("GET", f"/api/ledger/nodes/{node.peer_id}")["value"]["beat"])
        except Exception:
            beats.append(0)
    return beats


def measure_join(count: int, joining: int) -> dict:
    total = count + joining
    names = tuple(f"entry_writes_{reason}" for reason in WRITE_REASONS) + JOIN_COUNTERS
    with Lab(unique_prefix("kj"), total) as lab, tempfile.TemporaryDirectory() as root:
        network = LabNetwork(lab, Path(root))
        try:
            for i in range(1, count + 1):
                network.start(i, p2p={"disable_dht": True})
            old = list(network.nodes.values())
            for node in old:
                network.wait_up(node, timeout=120)
            network.wait_until(
                lambda: all(len(node.alive_peers()) == count - 1 for node in old), 300, "full membership", interval=0.5
            )
            wait_quiet()
            before = counters_of(old, names)
            beats_before = own_beats(old)
            old_cpu = sum(process_cpu_seconds(node.process.pid) for node in old)
            launched = time.monotonic()
            for i in range(count + 1, total + 1):
                network.start(i, p2p={"disable_dht": True})
            new = [node for node in network.nodes.values() if node not in old]
            for node in new:
                network.wait_up(node, timeout=120)
            apis_up = time.monotonic()
            nodes = list(network.nodes.values())
            network.wait_until(
                lambda: all(len(node.alive_peers()) == total - 1 for node in nodes), 300, "full membership", interval=0.5
            )
            formed = time.monotonic()
            wait_quiet()
            quiet = time.monotonic()
            after_old = counters_of(old, names)
            after_new = counters_of(new, names)
            old_beats = [a - b for a, b in zip(own_beats(old), beats_before)]
            old_delta = [{name: a[name] - b[name] for name in names} for a, b in zip(after_old, before)]

            def writes(rows: list[dict[str, int]]) -> dict:
                return {
                    **tally([sum(row[f"entry_writes_{reason}"] for reason in WRITE_REASONS) for row in rows]),
                    "by_reason": {reason: sum(row[f"entry_writes_{reason}"] for row in rows) for reason in WRITE_REASONS},
                    **{name: sum(row[name] for row in rows) for name in JOIN_COUNTERS},
                }

            return {
                "bench": "formation-join",
                "nodes": count,
                "joining": joining,
                "processes_sharing_cores": total,
                "cores": os.cpu_count(),
                "joiners_apis_up_s": round(apis_up - launched, 1),
                "join_formation_s": round(formed - launched, 1),
                "quiet_after_s": round(quiet - launched, 1),
                "old_nodes_cpu_s": round(sum(process_cpu_seconds(node.process.pid) for node in old) - old_cpu, 1),
                "new_nodes_cpu_s": round(sum(process_cpu_seconds(node.process.pid) for node in new), 1),
                "old_nodes_entry_writes": writes(old_delta),
                "old_nodes_beats": tally(old_beats),
                "new_nodes_entry_writes": writes(after_new),
            }
        finally:
            network.close()


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
            saturated = wait_quiet()
            at_quiet = sum(process_cpu_seconds(pid) for pid in pids)
            rows = counters_of(network.nodes.values(), COUNTERS)
            totals = {name: sum(row[name] for row in rows) for name in COUNTERS}
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
    parser.add_argument("--join", type=int, default=0, metavar="K", help="start K more nodes once the N have formed")
    args = parser.parse_args()
    reason = require_netns()
    if reason:
        print(json.dumps({"error": reason}))
        sys.exit(1)
    for size in (int(s) for s in args.sizes.split(",") if s):
        for _ in range(args.runs):
            print(json.dumps(measure_join(size, args.join) if args.join else measure(size)), flush=True)


if __name__ == "__main__":
    main()
