"""Benchmark of kairos-plugin-services on this machine: iperf3 TCP through a service vs the raw
loopback link, in the same run, and the set-up time of one connection (p50/p99).

Three ``kairos run`` processes on loopback (no root): node 0 exposes an iperf3 server and a TCP
echo server; node 1 connects with the sealed side connection (the default, pooled: a new
connection's request goes on an idle proven side connection), node 2 with
``services.side_connection: false``, so its bytes go over the admitted libp2p stream, and node 3
with ``services.side_pool: 0`` (every connection negotiated on a stream: the set-up before the
pool). The set-up cases take turns connection by connection, so they share the same load.

The VPN leg (root and network namespaces; skipped with its reason otherwise, or with
``--no-vpn``): two ``kairos run`` nodes in namespaces joined by a veth, with tunvpn and the
services plugin; from node 1, iperf3 TCP to an iperf3 server in node 2's namespace over the raw
veth, through the VPN (node 2's VIP) and through a service node 2 exposes — the three in the
same run, one after the other. Not through
the VPN: that needs root and TUN devices (bench/vpn.py measures the VPN).

Prints one JSON object per line:

    {"bench": "services", "case": "raw"|"side"|"stream", "gbit_per_s": …, "seconds": …,
     "load_1min": …, "runnable": …, "processes": …}   (the last three: what shared the cores)
    {"bench": "services", "case": "setup_side"|"setup_side_unpooled"|"setup_stream", "p50_ms": …, "p99_ms": …, "n": …}
    {"bench": "services", "case": "lab_raw"|"lab_vpn"|"lab_service", "gbit_per_s": …, "seconds": …}

Usage: .venv/bin/python bench/services.py [--seconds 5] [--setups 200] [--no-vpn]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from kairos_core.plugin import APIClient

from kairos_testing.localnodes import LocalNodes, free_port


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


def _token() -> str:
    from kairos_core.token import generate_token  # the bench may use the core's own tools

    return generate_token().encode()


def iperf3(port: int, seconds: float, host: str = "127.0.0.1", prefix: tuple[str, ...] = ()) -> float:
    out = subprocess.run(
        [*prefix, "iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    result = json.loads(out.stdout)
    if "error" in result:
        raise RuntimeError(result["error"])
    return result["end"]["sum_received"]["bits_per_second"] / 1e9


def setup_time(port: int) -> float:
    """Seconds from connect() to the first echoed byte, on a fresh connection."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"x")
        if sock.recv(1) != b"x":
            raise RuntimeError("no echo")
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def sharing() -> dict[str, float | int]:
    """What else ran on the cores: the 1-minute load and the runnable tasks now (``/proc/loadavg``),
    and how many processes exist besides this benchmark's own."""
    fields = Path("/proc/loadavg").read_text().split()
    return {
        "load_1min": float(fields[0]),
        "runnable": int(fields[3].split("/")[0]),
        "processes": len([p for p in os.listdir("/proc") if p.isdigit()]),
    }


def vpn_leg(seconds: float) -> None:
    """iperf3 over the raw veth, the VPN and a service between two lab nodes (see the docstring)."""
    from kairos_testing.netlab import require_netns
    from kairos_testing.vpnlab import VPNLab

    reason = require_netns()
    if reason is not None:
        print(json.dumps({"bench": "services", "case": "lab", "skipped": reason}), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="kbs") as root, VPNLab(Path(root), nodes=2, plugins=("services",)) as lab:
        port = 5201
        server = lab.popen(2, "iperf3", "-s", "-p", str(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            exposer, connector = APIClient(lab.node(2).root / "api.sock"), APIClient(lab.node(1).root / "api.sock")
            exposer.request(
                "POST", "/api/plugins/services/expose", content=json.dumps({"name": "iperf", "to": f"127.0.0.1:{port}"})
            )
            lab.wait(
                lambda: any(e["name"] == "iperf" for e in connector.request("GET", "/api/plugins/services")["services"]),
                30,
                "the service in node 1's catalog",
            )
            listen = connector.request(
                "POST", "/api/plugins/services/connect", content=json.dumps({"name": "iperf", "listen": "127.0.0.1:0"})
            )["listen"]
            inside = tuple(lab.lab.command(1, []))  # run in node 1's namespace
            shared = {"bench": "services", "cpus": os.cpu_count(), **sharing()}
            cases = (
                ("lab_raw", lab.lab.address(2), port),
                ("lab_vpn", lab.vip(2), port),
                ("lab_service", "127.0.0.1", int(listen.rsplit(":", 1)[1])),
            )
            for case, host, target_port in cases:
                gbit = iperf3(target_port, seconds, host, inside)
                print(json.dumps({**shared, "case": case, "gbit_per_s": round(gbit, 3), "seconds": seconds}), flush=True)
        finally:
            server.terminate()
            server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--setups", type=int, default=200)
    parser.add_argument("--no-vpn", action="store_true", help="skip the VPN leg (which needs root and namespaces)")
    args = parser.parse_args()
    if shutil.which("iperf3") is None:
        sys.exit("iperf3 is not installed (Debian package iperf3)")
    root = Path(tempfile.mkdtemp(prefix="kairos-bench-services-"))
    iperf_port = free_port()
    echo = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    echo.daemon_threads = True
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    server = subprocess.Popen(
        ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    net = LocalNodes(root, _token())
    try:
        net.start(
            {
                "expose": [
                    {"name": "iperf", "to": f"127.0.0.1:{iperf_port}"},
                    {"name": "echo", "to": f"127.0.0.1:{echo.server_address[1]}"},
                ]
            }
        )
        sided = net.start()
        streamed = net.start({"side_connection": False})
        unpooled = net.start({"side_pool": 0})
        net.wait_mesh()
        ports = {}
        for case, node in (("side", sided), ("stream", streamed), ("side_unpooled", unpooled)):
            client = APIClient(node.socket)
            for name in ("iperf", "echo"):
                ports[case, name] = client.request(
                    "POST",
                    "/api/plugins/services/connect",
                    content=json.dumps({"name": name, "listen": "127.0.0.1:0", "protocol": "tcp"}),
                )["listen"].rsplit(":", 1)[1]
        net.wait_until(
            lambda: all(len(n.api("GET", "/api/plugins/services")["services"]) == 2 for n in net.nodes),
            30,
            "the catalog on every node",
        )
        shared = {"bench": "services", "cpus": os.cpu_count(), **sharing()}
        for case, port in (("raw", iperf_port), ("side", ports["side", "iperf"]), ("stream", ports["stream", "iperf"])):
            gbit = iperf3(int(port), args.seconds)
            print(json.dumps({**shared, "case": case, "gbit_per_s": round(gbit, 3), "seconds": args.seconds}), flush=True)
        cases = ("side", "side_unpooled", "stream")
        times: dict[str, list[float]] = {case: [] for case in cases}
        for _ in range(args.setups):
            for case in cases:
                times[case].append(setup_time(int(ports[case, "echo"])))
        for case in cases:
            print(
                json.dumps(
                    {
                        **shared,
                        "case": f"setup_{case}",
                        "n": len(times[case]),
                        "p50_ms": round(percentile(times[case], 0.5) * 1000, 2),
                        "p99_ms": round(percentile(times[case], 0.99) * 1000, 2),
                    }
                ),
                flush=True,
            )
    finally:
        net.close()
        server.terminate()
        server.wait()
        echo.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    if not args.no_vpn:
        vpn_leg(args.seconds)


if __name__ == "__main__":
    main()
