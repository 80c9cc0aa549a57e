"""What the metrics endpoint and the web dashboard add to a node's memory; prints JSON lines.

    .venv/bin/python bench/ops_rss.py [--warmup 20] [--scrapes 200] [--loads 50]

Two real ``kairos run`` processes on loopback (one network, mDNS and the DHT off), run twice:
once with the default API (unix socket only), once with ``api.metrics_listen`` and
``api.http_listen`` on. In each run both nodes idle for ``--warmup`` seconds, then node 0's RSS is
read (``idle_rss_mb``); then it serves ``--scrapes`` Prometheus scrapes and ``--loads`` dashboard
loads (the page and every JSON call its script makes) — over TCP when on, over the unix socket when
off — and after 5 s its RSS is read again (``used_rss_mb``). The last line compares them:
``idle_delta_mb`` and ``used_delta_mb`` (target: < 5 MB). ``load`` and ``processes`` say what shared
the 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from kairos_core.token import generate_token

DASHBOARD_CALLS = [
    "/",
    "/dashboard/app.js",
    "/dashboard/style.css",
    "/api/status",
    "/api/peers",
    "/api/ledger",
    "/api/ledger/nodes",
    "/api/ledger/vpn",
    "/api/ledger/leader",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wait_for_socket(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), base_url="http://kairos") as client:
                if client.get("/api/status").status_code == 200:
                    return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"no API at {path}")


def run(root: Path, token: str, ops_on: bool, warmup: float, scrapes: int, loads: int) -> dict:
    ports = [free_port() for _ in range(2)]
    processes, sockets, web = [], [], None
    try:
        for index, port in enumerate(ports):
            state = root / f"node{index}"
            state.mkdir(parents=True)
            api: dict = {}
            if ops_on and index == 0:
                web = (free_port(), free_port())
                api = {"metrics_listen": f"127.0.0.1:{web[0]}", "http_listen": f"127.0.0.1:{web[1]}"}
            config = {
                "p2p": {
                    "network_token": token,
                    "listen": [f"/ip4/127.0.0.1/tcp/{port}"],
                    "disable_mdns": True,
                    "disable_dht": True,
                    "bootstrap_peers": [] if index == 0 else [f"/ip4/127.0.0.1/tcp/{ports[0]}"],
                },
                "node": {"state_dir": str(state), "hostname": f"node{index}"},
                "api": api,
                "plugins": {"disabled": ["tunvpn", "k3s", "kubevip", "services", "dns"]},
            }
            (state / "kairos.yaml").write_text(yaml.safe_dump(config))
            log = open(state / "node.log", "w")
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "kairos_core", "run", "-c", str(state / "kairos.yaml")],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            sockets.append(state / "api.sock")
        for path in sockets:
            wait_for_socket(path)
        time.sleep(warmup)
        idle = rss_mb(processes[0].pid)
        if ops_on:
            url = subprocess.run(
                [sys.executable, "-m", "kairos_core", "dashboard", "--url", "--json", "--socket", str(sockets[0])],
                capture_output=True,
                text=True,
                check=True,
            )
            login = json.loads(url.stdout)["url"]
            metrics = httpx.Client(base_url=f"http://127.0.0.1:{web[0]}")
            dashboard = httpx.Client(base_url=f"http://127.0.0.1:{web[1]}", follow_redirects=True)
            dashboard.get(login).raise_for_status()  # the cookie
        else:
            metrics = dashboard = httpx.Client(transport=httpx.HTTPTransport(uds=str(sockets[0])), base_url="http://kairos")
        started = time.perf_counter()
        for _ in range(scrapes):
            metrics.get("/metrics").raise_for_status()
        for _ in range(loads):
            for path in DASHBOARD_CALLS:
                dashboard.get(path).raise_for_status()
        used_s = time.perf_counter() - started
        time.sleep(5)
        used = rss_mb(processes[0].pid)
        return {
            "ops": "on" if ops_on else "off",
            "idle_rss_mb": round(idle, 1),
            "used_rss_mb": round(used, 1),
            "requests": scrapes + loads * len(DASHBOARD_CALLS),
            "requests_s": round(used_s, 2),
        }
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=float, default=20)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--loads", type=int, default=50)
    args = parser.parse_args()
    token = generate_token().encode()
    results = {}
    for ops_on in (False, True):
        with tempfile.TemporaryDirectory() as root:
            result = run(Path(root), token, ops_on, args.warmup, args.scrapes, args.loads)
        result.update(load=round(os.getloadavg()[0], 2), processes=sum(1 for entry in os.listdir("/proc") if entry.isdigit()))
        results[result["ops"]] = result
        print(json.dumps(result), flush=True)
    print(
        json.dumps(
            {
                "idle_delta_mb": round(results["on"]["idle_rss_mb"] - results["off"]["idle_rss_mb"], 1),
                "used_delta_mb": round(results["on"]["used_rss_mb"] - results["off"]["used_rss_mb"], 1),
                "target_mb": 5,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
