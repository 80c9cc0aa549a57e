"""The VPN between two nodes behind NAT, per NAT kind: which path, how soon, RTT and throughput.

Run as root: ``.venv/bin/python bench/nat.py [--runs 10] [--seconds 5] [--watch 60] [--kinds none,port-preserving,symmetric]``.
Each run builds a :class:`kairos_testing.netlab.NatLab` — a public node P and nodes A and B each behind
its own router of the kind (``none``: A and B public too) — starts real ``kairos run`` nodes with the
tunvpn plugin, A and B bootstrapping from P only (mDNS and the DHT off), and prints one JSON line:

- ``path``: how A sends to B once the best path for the kind is reached (``direct`` with no NAT,
  ``punched`` through port-preserving NATs, ``relay via <P>`` through symmetric ones), or the
  path at the deadline (``target_reached`` false); ``relayed``: whether A's libp2p connection to B runs
  through P's relay; ``libp2p_transport``: how it runs (``direct``, ``relayed``, or ``punched``: a TCP
  connection through both NATs that replaced the relayed one);
- ``time_to_path_s``: from both A and B being up (their API answers) until that path is in use on
  A and a ping between the VIPs gets through over it; ``time_to_ping_s``: until the first ping got
  through (any path); ``startup_s``: from starting A and B until both were up (process start,
  imports: load-bound); ``punch``: A's and B's punch attempts, successes and failures;
- ``rtt_ms``: ping A→B VIP, 20 pings 0.2 s apart (min/avg/max);
- ``iperf3_mbit_s``: iperf3 TCP A→B between the VIPs for ``--seconds``, one stream;
- ``relay_cpu_share``: P's CPU seconds per second of the iperf3 run (what relaying costs it: its
  data plane forwards the pair's datagrams when the path is ``relay via P``);
- ``path_switches``: A's ``vpn_path_switches`` during the measuring (0 = no flapping);
  ``watch_switches``: the same over ``--watch`` seconds of an idle, stable network after it (the
  first run of each kind only; absent with ``--watch 0``).

After the runs, one ``summary`` line per kind (runs that reached the kind's path, and in < 10 s;
runs where ping and TCP worked; median and worst time to path; median and lowest throughput) and
one ``punched_vs_direct`` line: the median punched throughput over the median direct one of the
same invocation (the target: within 20 %).

Processes sharing the machine's 2 cores: the three nodes, ping/iperf3, and whatever else
runs (other sessions' tests): figures are noisy, compare only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kairos_testing.labnodes import process_cpu_seconds as cpu_seconds
from kairos_testing.netlab import NAT_KINDS, PORT_PRESERVING, PUBLIC, SYMMETRIC, require_netns
from kairos_testing.vpnlab import NatVPNLab


def node_pid(vpn: NatVPNLab, index: int) -> int:
    """The pid of the python process of node ``index`` (``ip netns exec`` execs into it)."""
    return vpn.node(index).process.pid


def rtt(vpn: NatVPNLab, vip: str) -> dict | None:
    out = vpn.run(2, "ping", "-c", "20", "-i", "0.2", "-W", "2", vip, timeout=30).stdout
    match = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)/", out)
    return {"min": float(match[1]), "avg": float(match[2]), "max": float(match[3])} if match else None


def iperf(vpn: NatVPNLab, vip: str, seconds: int) -> tuple[float | None, float]:
    server = vpn.popen(3, "iperf3", "-s", "-1", "-B", vip, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    pid = node_pid(vpn, 1)
    before, started = cpu_seconds(pid), time.monotonic()
    result = vpn.run(2, "iperf3", "-c", vip, "-t", str(seconds), "-J", timeout=seconds + 30)
    elapsed = time.monotonic() - started
    share = (cpu_seconds(pid) - before) / elapsed
    server.wait(timeout=10)
    try:
        mbit = json.loads(result.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    except (ValueError, KeyError):
        mbit = None
    return mbit, share


#: the path each kind should reach (a prefix of the path's name)
TARGETS = {"none": ("direct",), PORT_PRESERVING: ("punched",), SYMMETRIC: ("relay via",)}
PATH_DEADLINE = 60.0


def punch_counters(vpn: NatVPNLab) -> dict[str, int]:
    totals: dict[str, int] = {}
    for index in (2, 3):
        for name, value in vpn.counters(index).items():
            if name.startswith("vpn_punch_"):
                key = name.removeprefix("vpn_punch_")
                totals[key] = totals.get(key, 0) + value
    return totals


def one_run(kind: str, seconds: int, watch: float = 0.0) -> dict:
    kinds = [PUBLIC, PUBLIC] if kind == "none" else [kind, kind]
    targets = TARGETS[kind]
    with tempfile.TemporaryDirectory(prefix="kairos-nat-") as root, NatVPNLab(Path(root), kinds) as vpn:
        up = vpn.nated_up_at  # NatVPNLab.start returned once every pair had a VPN session
        vip_b = vpn.vip(3)
        first_ping = None
        deadline = up + PATH_DEADLINE
        while True:
            path = vpn.path(2, 3)
            pinged = vpn.ping(2, vip_b, count=1)
            now = time.monotonic()
            if pinged and first_ping is None:
                first_ping = now - up
            if pinged and path is not None and path.startswith(targets):
                break
            if now > deadline:
                break
        time_to_path = time.monotonic() - up
        if first_ping is None:
            return {"kind": kind, "path": path, "error": f"no ping between the VIPs within {PATH_DEADLINE:.0f} s"}
        reached = path is not None and path.startswith(targets)
        switches_before = vpn.counters(2).get("vpn_path_switches", 0)
        ping = rtt(vpn, vip_b)
        mbit, share = iperf(vpn, vip_b, seconds)
        switches = vpn.counters(2).get("vpn_path_switches", 0) - switches_before
        watched = {}
        if watch > 0:
            time.sleep(watch)
            watched = {
                "watch_s": watch,
                "watch_switches": vpn.counters(2).get("vpn_path_switches", 0) - switches_before - switches,
                "watch_path": vpn.path(2, 3),
            }
        return {
            "kind": kind,
            "path": path,
            "target_reached": reached,
            "relayed": vpn.peer_ids[3] in vpn.relayed_peers(2),
            "libp2p_transport": vpn.transport(2, vpn.peer_ids[3]),
            "time_to_path_s": round(time_to_path, 2) if reached else None,
            "time_to_ping_s": round(first_ping, 2),
            "startup_s": round(up - vpn.nated_started_at, 2),
            "punch": punch_counters(vpn),
            "rtt_ms": ping,
            "iperf3_mbit_s": round(mbit, 1) if mbit is not None else None,
            "relay_cpu_share": round(share, 3),
            "path_switches": switches,
            **watched,
            "load": os.getloadavg()[0],
        }


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def summary(kind: str, results: list[dict]) -> dict:
    times = [r["time_to_path_s"] for r in results if r.get("time_to_path_s") is not None]
    mbits = [r["iperf3_mbit_s"] for r in results if r.get("iperf3_mbit_s")]
    return {
        "summary": kind,
        "runs": len(results),
        "reached": sum(bool(r.get("target_reached")) for r in results),
        "reached_under_10s": sum(t < 10.0 for t in times),
        "ping_and_tcp_worked": sum(bool(r.get("rtt_ms")) and bool(r.get("iperf3_mbit_s")) for r in results),
        "time_to_path_s": {"median": median(times), "max": max(times, default=None)},
        "iperf3_mbit_s": {"median": median(mbits), "min": min(mbits, default=None)},
        "path_switches": sum(r.get("path_switches", 0) for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--kinds", default="none,port-preserving,symmetric")
    parser.add_argument(
        "--watch", type=float, default=60.0, help="seconds to count path switches after the first run's measuring"
    )
    args = parser.parse_args()
    # stopped with SIGTERM (timeout, kill), unwind so the labs delete their namespaces and nodes
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    reason = require_netns()
    if reason:
        sys.exit(f"bench/nat.py: {reason}")
    kinds = args.kinds.split(",")
    for kind in kinds:
        if kind != "none" and kind not in NAT_KINDS[1:]:
            sys.exit(f"bench/nat.py: unknown kind {kind!r}")
    summaries = {}
    for kind in kinds:
        results = []
        for run in range(1, args.runs + 1):
            result = one_run(kind, args.seconds, args.watch if run == 1 else 0.0)
            results.append(result)
            print(json.dumps({"run": run, **result}), flush=True)
        summaries[kind] = summary(kind, results)
        print(json.dumps(summaries[kind]), flush=True)
    if "none" in summaries and PORT_PRESERVING in summaries:
        direct = summaries["none"]["iperf3_mbit_s"]["median"]
        punched = summaries[PORT_PRESERVING]["iperf3_mbit_s"]["median"]
        ratio = round(punched / direct, 3) if direct and punched else None
        print(json.dumps({"punched_vs_direct": ratio, "direct_mbit_s": direct, "punched_mbit_s": punched}), flush=True)


if __name__ == "__main__":
    main()
