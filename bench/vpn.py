"""VPN data plane throughput and latency, next to the raw veth and peer VPNs, in one run.

Run as root: ``.venv/bin/python bench/vpn.py [--seconds 5] [--no-peers]``. Prints one JSON document:

- ``steps``: iperf3 TCP A→B through our forwarder (1 and 4 streams) for each build-up step
  in pure Python (per-packet I/O → TUN offloads + TSO split + UDP GSO/GRO → + receive coalescing),
  then the full design with the C fast path, with the CPU share each forwarder process used;
- ``loss_1pct``: the full design with 1% of the datagrams dropped by nft on the receiver's input;
- ``rtt_ms``: ping p50/p99 over the raw veth and through the VPN, and what the VPN adds, with
  one ping per 10 ms (forwarders idle in between) and per 1 ms (a busy link); and the same through
  ``plain_relay.py``, a forwarder that does nothing but move packets — the floor of any Python
  data plane on this machine;
- ``nodes``: the same VPN as run by real ``kairos run`` nodes (tunvpn plugin, VIPs from the
  ledger, keys agreed over libp2p): iperf3 1/4 streams over UDP, ping RTT, and iperf3 over the
  libp2p-stream fallback with UDP blocked by nft, with the CPU share of each node process;
- ``peers``: ``bench/vpn-peers.sh`` (raw veth, wireguard-go, nebula, yggdrasil).

The machine is small and shared: figures are noisy, compare only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

from kairos_testing.namespaces import PORT, NamespacePair, netns_missing

PEERS_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vpn-peers.sh")
STEPS = {  # the build-up in pure Python, then the same full design with the C fast path
    "per_packet": {"offload": False, "udp_gso": False, "udp_gro": False, "coalesce": False, "pure_python": True},
    "offload_split_gso_gro": {"offload": True, "udp_gso": True, "udp_gro": True, "coalesce": False, "pure_python": True},
    "offload_split_gso_gro_coalesce": {"offload": True, "udp_gso": True, "udp_gro": True, "coalesce": True, "pure_python": True},
    "full_design_c_fastpath": {"offload": True, "udp_gso": True, "udp_gro": True, "coalesce": True},
}
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def iperf(lab: NamespacePair, target: str, seconds: int, streams: int) -> dict:
    server = lab.popen("b", "iperf3", "-s", "-1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.4)
    pids = {side: proc.pid for side, proc in lab.forwarders.items()}
    cpu_before = {side: cpu_seconds(pid) for side, pid in pids.items()}
    started = time.monotonic()
    result = lab.run("a", "iperf3", "-c", target, "-t", str(seconds), "-P", str(streams), "-J", timeout=seconds + 30)
    elapsed = time.monotonic() - started
    server.wait(timeout=10)
    try:
        end = json.loads(result.stdout)["end"]
        figure = {"mbit_s": round(end["sum_received"]["bits_per_second"] / 1e6, 1), "retr": end["sum_sent"].get("retransmits")}
    except (ValueError, KeyError) as error:
        return {"error": f"{error}: {result.stdout[-200:]} {result.stderr[-200:]}"}
    if pids:
        figure["cpu_share"] = {side: round((cpu_seconds(pid) - cpu_before[side]) / elapsed, 2) for side, pid in pids.items()}
    return figure


def ping_rtts(lab: NamespacePair, target: str, count: int = 500, interval: str = "0.01") -> list[float]:
    result = lab.run("a", "ping", "-c", str(count), "-i", interval, "-s", "56", target, timeout=60)
    return sorted(float(m) for m in re.findall(r"time=([\d.]+) ms", result.stdout))


def percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))] if values else float("nan")


def set_loss(lab: NamespacePair, percent: int | None) -> None:
    ns = lab.ns["b"]
    subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "vpnloss"], capture_output=True)
    if percent:
        script = (
            "table inet vpnloss {\n chain input {\n  type filter hook input priority 0;\n"
            f"  udp dport {PORT} numgen random mod 100 < {percent} drop\n }}\n}}\n"
        )
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=script, text=True, check=True)


def run_forwarders(lab: NamespacePair, options: dict) -> None:
    for side in "ab":
        proc = lab.forwarders.pop(side, None)
        if proc is not None:
            proc.stdin.close()
            proc.wait(timeout=10)
    for side in "ab":
        lab.start_forwarder(side, **options)
    if not lab.wait_ping("a", lab.vip["b"]):
        raise RuntimeError("no ping through the VPN")


def bench_ours(seconds: int) -> dict:
    report: dict = {"steps": {}}
    with NamespacePair(prefix="vpnb", octet=150) as lab:
        report["veth"] = {f"p{n}": iperf(lab, lab.underlay["b"], seconds, n) for n in (1, 4)}
        raw = ping_rtts(lab, lab.underlay["b"])
        for name, options in STEPS.items():
            run_forwarders(lab, options)
            report["steps"][name] = {f"p{n}": iperf(lab, lab.vip["b"], seconds, n) for n in (1, 4)}
            print(json.dumps({name: report["steps"][name]}), file=sys.stderr, flush=True)
        # the full design stays up for the loss and latency runs
        report["rtt_ms"] = rtt_report(lab, raw)
        set_loss(lab, 1)
        report["loss_1pct"] = {f"p{n}": iperf(lab, lab.vip["b"], seconds, n) for n in (1, 4)}
        set_loss(lab, None)
        report["counters_b"] = lab.counters("b")
        report["rtt_ms"]["floor_plain_relay"] = plain_relay_rtts(lab, raw)
    return report


def rtt_report(lab: NamespacePair, raw: list[float]) -> dict:
    """Ping through the VPN at two paces, next to the raw veth: what the VPN adds, p50 and p99.

    ``idle`` (one ping per 10 ms) finds the forwarders asleep with cold caches every time;
    ``busy`` (one per 1 ms) is the latency of a link that carries traffic.
    """
    report: dict = {"veth": {"p50": percentile(raw, 0.5), "p99": percentile(raw, 0.99)}}
    for pace, interval, count in (("idle_10ms", "0.01", 500), ("busy_1ms", "0.001", 2000)):
        vpn = ping_rtts(lab, lab.vip["b"], count=count, interval=interval)
        report[pace] = {"p50": percentile(vpn, 0.5), "p99": percentile(vpn, 0.99)}
        report[pace]["added"] = {q: round(report[pace][q] - report["veth"][q], 3) for q in ("p50", "p99")}
    return report


def plain_relay_rtts(lab: NamespacePair, raw: list[float]) -> dict:
    """The same pings through ``plain_relay.py`` (no sealing, no batching): the platform's floor."""
    for side in "ab":
        proc = lab.forwarders.pop(side, None)
        if proc is not None:
            proc.stdin.close()
            proc.wait(timeout=10)
    relay = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plain_relay.py")
    for side, other in (("a", "b"), ("b", "a")):
        proc = lab.popen(
            side,
            sys.executable,
            relay,
            "kplain0",
            f"{lab.vip[side]}/24",
            lab.underlay[side],
            lab.underlay[other],
            str(PORT),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if proc.stdout.readline().strip() != "ready":
            return {"error": "plain relay did not start"}
    if not lab.wait_ping("a", lab.vip["b"]):
        return {"error": "no ping through the plain relay"}
    return rtt_report(lab, raw)


def iperf_nodes(lab, seconds: int, streams: int) -> dict:
    """iperf3 from node 1 to node 2's VIP, with each node process's CPU share."""
    target = lab.vip(2)
    server = lab.popen(2, "iperf3", "-s", "-1", "-B", target, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.4)
    pids = {i: lab.node(i).process.pid for i in (1, 2)}
    cpu_before = {i: cpu_seconds(pid) for i, pid in pids.items()}
    started = time.monotonic()
    result = lab.run(1, "iperf3", "-c", target, "-t", str(seconds), "-P", str(streams), "-J", timeout=seconds + 30)
    elapsed = time.monotonic() - started
    server.wait(timeout=10)
    try:
        end = json.loads(result.stdout)["end"]
    except (ValueError, KeyError) as error:
        return {"error": f"{error}: {result.stdout[-200:]} {result.stderr[-200:]}"}
    return {
        "mbit_s": round(end["sum_received"]["bits_per_second"] / 1e6, 1),
        "retr": end["sum_sent"].get("retransmits"),
        "cpu_share": {f"node{i}": round((cpu_seconds(pid) - cpu_before[i]) / elapsed, 2) for i, pid in pids.items()},
    }


def bench_nodes(seconds: int) -> dict:
    """The VPN between two real `kairos run` nodes (see module docstring)."""
    import tempfile

    from kairos_testing.vpnlab import VPNLab

    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="kvb") as root, VPNLab(root, nodes=2) as lab:
        report["udp"] = {f"p{n}": iperf_nodes(lab, seconds, n) for n in (1, 4)}
        report["rtt_ms"] = {}
        for pace, interval, count in (("idle_10ms", "0.01", "500"), ("busy_1ms", "0.001", "2000")):
            rtts = sorted(
                float(m)
                for m in re.findall(
                    r"time=([\d.]+) ms", lab.run(1, "ping", "-c", count, "-i", interval, lab.vip(2), timeout=60).stdout
                )
            )
            report["rtt_ms"][pace] = {"p50": percentile(rtts, 0.5), "p99": percentile(rtts, 0.99)}
        lab.block_udp(1)
        try:
            lab.wait(lambda: lab.path(1, 2) == "stream" and lab.path(2, 1) == "stream", 30, "fallback")
            report["stream_fallback"] = {"p1": iperf_nodes(lab, seconds, 1)}
        finally:
            lab.unblock_udp(1)
        report["counters_node2"] = lab.counters(2)
    return report


def bench_peers(seconds: int) -> dict:
    available = {
        name: shutil.which(binary) is not None
        for name, binary in (("wireguard-go", "wireguard-go"), ("nebula", "nebula"), ("yggdrasil", "yggdrasil"))
    }
    systems = ["veth"] + [name for name, ok in available.items() if ok]
    if shutil.which("wg") is None and "wireguard-go" in systems:
        systems.remove("wireguard-go")
    result = subprocess.run(
        ["bash", PEERS_SCRIPT, str(seconds), *systems], capture_output=True, text=True, timeout=60 * len(systems) + 60
    )
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return {"available": available, "results": lines}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--no-nodes", action="store_true", help="skip the run through real kairos nodes")
    parser.add_argument("--only-nodes", action="store_true", help="only the run through real kairos nodes")
    args = parser.parse_args()
    reason = netns_missing() or (None if shutil.which("iperf3") else "needs iperf3")
    if reason:
        print(json.dumps({"skipped": reason}))
        return 0
    report = {
        "note": "2-core machine shared with other work: noisy; compare within this run only",
        "cpus": os.cpu_count(),
        "seconds": args.seconds,
    }
    if not args.only_nodes:
        report.update(bench_ours(args.seconds))
    if not args.no_nodes:
        report["nodes"] = bench_nodes(args.seconds)
    if not args.no_peers and not args.only_nodes:
        report["peers"] = bench_peers(args.seconds)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
