"""Benchmark of kairos-plugin-dns: queries per second and latency (p50/p99) of one ``kairos run``
node's DNS server on loopback, for names answered from the ledger and for forwarded names
answered from the cache.

The node runs as its own process (``dns.listen`` on a free 127.0.0.1 port, the other plugins
disabled); its upstream is this script's own dnspython server on loopback (never the internet),
used only to fill the cache. The load is a bounded loop: ``--concurrency`` asyncio workers, each
sending one query and waiting for its answer before the next, ``--queries`` queries per case,
over the names in turn (100 ledger names, 50 exact records and 50 under a wildcard; 100
forwarded names warmed into the cache first). Queries are plain (no EDNS), as most stub
resolvers send them. An answer counts when its id matches and it is NOERROR with an answer.

Prints one JSON object per line:

    {"bench": "dns", "case": "ledger"|"cached_forward", "queries": …, "answered": …, "qps": …,
     "p50_ms": …, "p99_ms": …, "concurrency": …, "rate_limit": …,
     "load_1min_before": …, "load_1min_after": …, "runnable": …, "processes": …}

(the last four: what shared the 2 cores — the 1-minute load average, runnable tasks and
processes from /proc). Targets (issue #18): >= 5,000 q/s from the ledger with p99 < 5 ms.

Usage: .venv/bin/python bench/dns.py [--queries 20000] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import entry_points
from pathlib import Path

# this file is bench/dns.py: run as a script, its folder comes first on sys.path and its own name
# would hide dnspython's package `dns`, so the folder is taken off the path before importing it
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import dns.message  # noqa: E402
import dns.rcode  # noqa: E402
import dns.rrset  # noqa: E402

from kairos_core.plugin import APIClient, KairosError  # noqa: E402
from kairos_testing.localnodes import spawn_kairos, stop_process  # noqa: E402

NAMES = 100
# the per-source limit as configured by default: all the load comes from 127.0.0.1, which it
# leaves alone (dns.rate_limit_loopback: false), so the server's own speed is what is measured
RATE_LIMIT = 5000.0


def machine() -> dict[str, float | int]:
    fields = Path("/proc/loadavg").read_text().split()
    return {
        "load_1min": float(fields[0]),
        "runnable": int(fields[3].split("/")[0]),
        "processes": len([pid for pid in os.listdir("/proc") if pid.isdigit()]),
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def upstream(stop: threading.Event) -> int:
    """A UDP server on loopback answering ``*.up.example.`` A 192.0.2.1 (TTL 3600); returns its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.2)

    def serve() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            if query.question[0].name.to_text().endswith(".up.example."):
                response.answer.append(dns.rrset.from_text(query.question[0].name, 3600, "IN", "A", "192.0.2.1"))
            else:
                response.set_rcode(dns.rcode.NXDOMAIN)
            sock.sendto(response.to_wire(), addr)
        sock.close()

    threading.Thread(target=serve, daemon=True).start()
    port: int = sock.getsockname()[1]
    return port


def start_node(root: Path, dns_port: int, upstream_port: int) -> tuple[subprocess.Popen[bytes], APIClient]:
    token = subprocess.run(
        [sys.executable, "-m", "kairos_core", "token", "new"], capture_output=True, text=True, check=True
    ).stdout.strip()
    others = sorted({ep.name for ep in entry_points(group="kairos")} - {"dns"})
    config = {
        "p2p": {"network_token": token, "listen": ["/ip4/127.0.0.1/tcp/0"], "disable_mdns": True, "disable_dht": True},
        "node": {"state_dir": str(root), "hostname": "bench0", "log_level": "warning"},
        "plugins": {"disabled": others},
        "dns": {
            "enable": True,
            "listen": f"127.0.0.1:{dns_port}",
            "forward": [f"127.0.0.1:{upstream_port}"],
            "rate_limit": RATE_LIMIT,
        },
    }
    process = spawn_kairos(root, config)
    client = APIClient(root / "api.sock", timeout=10.0)
    deadline = time.monotonic() + 120
    while True:
        try:
            client.request("GET", "/api/plugins/dns")
            return process, client
        except KairosError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError((root / "node.log").read_text()[-3000:]) from None
            time.sleep(0.2)


async def load(port: int, names: list[str], queries: int, concurrency: int) -> tuple[int, list[float], float]:
    """``queries`` queries over ``names`` from ``concurrency`` workers; (answered, latencies, seconds)."""
    loop = asyncio.get_running_loop()
    wires = [bytearray(dns.message.make_query(name, "A").to_wire()) for name in names]
    latencies: list[float] = []
    answered = 0
    next_query = 0

    async def worker(index: int) -> None:
        nonlocal answered, next_query
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect(("127.0.0.1", port))
            while next_query < queries:
                number = next_query
                next_query += 1
                wire = wires[number % len(wires)]
                ident = (number * 7919 + index) & 0xFFFF
                struct.pack_into("!H", wire, 0, ident)
                started = time.perf_counter()
                await loop.sock_sendall(sock, bytes(wire))
                try:
                    reply = await asyncio.wait_for(loop.sock_recv(sock, 4096), 2.0)
                except TimeoutError:
                    continue
                latencies.append(time.perf_counter() - started)
                got_id, flags, _qd, ancount = struct.unpack_from("!HHHH", reply)
                if got_id == ident and flags & 0x000F == 0 and ancount > 0:
                    answered += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return answered, latencies, time.perf_counter() - started


def report(
    case: str,
    queries: int,
    answered: int,
    latencies: list[float],
    seconds: float,
    concurrency: int,
    rate_limit: float,
    before: dict[str, float | int],
) -> None:
    ordered = sorted(latencies) or [float("nan")]
    after = machine()
    print(
        json.dumps(
            {
                "bench": "dns",
                "case": case,
                "queries": queries,
                "answered": answered,
                "qps": round(answered / seconds),
                "p50_ms": round(statistics.median(ordered) * 1000, 3),
                "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
                "concurrency": concurrency,
                "rate_limit": rate_limit,
                "load_1min_before": before["load_1min"],
                "load_1min_after": after["load_1min"],
                "runnable": after["runnable"],
                "processes": after["processes"],
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=20000, help="queries per case (bounded loop)")
    parser.add_argument("--concurrency", type=int, default=4, help="queries in flight at once")
    args = parser.parse_args()
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="kairos-bench-dns-") as tmp:
        process = None
        try:
            dns_port = free_port()
            process, client = start_node(Path(tmp), dns_port, upstream(stop))
            rate_limit = RATE_LIMIT
            for index in range(NAMES // 2):
                client.request(
                    "POST",
                    "/api/plugins/dns/add",
                    content=json.dumps({"name": f"web{index}", "type": "A", "value": f"10.9.{index // 250}.{index % 250 + 1}"}),
                )
            client.request(
                "POST", "/api/plugins/dns/add", content=json.dumps({"name": "*.apps", "type": "A", "value": "10.9.9.9"})
            )
            ledger_names = [f"web{i}.kairos." for i in range(NAMES // 2)] + [f"x{i}.apps.kairos." for i in range(NAMES // 2)]
            forwarded = [f"n{i}.up.example." for i in range(NAMES)]
            time.sleep(1.5)  # the zone is rebuilt from the ledger at most once a second
            asyncio.run(load(dns_port, ledger_names + forwarded, len(ledger_names + forwarded), 1))  # warm up, fill the cache
            for case, names in (("ledger", ledger_names), ("cached_forward", forwarded)):
                before = machine()
                answered, latencies, seconds = asyncio.run(load(dns_port, names, args.queries, args.concurrency))
                report(case, args.queries, answered, latencies, seconds, args.concurrency, rate_limit, before)
        finally:
            stop.set()
            if process is not None:
                stop_process(process)


if __name__ == "__main__":
    main()
