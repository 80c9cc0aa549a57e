"""How long a Prometheus scrape takes on a node holding many ledger entries; prints one JSON object.

    .venv/bin/python bench/metrics.py [--entries 10000] [--scrapes 50]

A real node (libp2p host on loopback, sqlite ledger, the local API) is filled with ``--entries``
entries in 10 buckets, then ``GET /metrics`` is sent over its unix socket ``--scrapes`` times, one
at a time, by a client in another thread (the node's event loop serves it as it would Prometheus).

- ``scrape_ms_median`` / ``_p95`` / ``_max``: wall time of one request, connection included;
- ``render_ms_median``: the exposition alone (``NodeMetrics.render``), without HTTP;
- ``bytes``: size of one exposition; ``families``: metric families in it. Target: < 50 ms.
- ``load_before`` / ``load_after`` / ``processes``: what shared the cores meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kairos_core.localnet import LocalNetwork
from kairos_core.metrics import NodeMetrics


def _scrape(socket_path: str, count: int) -> tuple[list[float], str]:
    times, text = [], ""
    for _ in range(count):
        with httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url="http://kairos") as client:
            started = time.perf_counter()
            response = client.get("/metrics")
            times.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
            text = response.text
    return times, text


async def main(entries: int, scrapes: int) -> dict:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as root:
        net = LocalNetwork(Path(root))
        node = await net.add_node()  # ledger.max_keys_per_owner is 10,000 by default: one owner fills it
        try:
            for n in range(entries):
                node.ledger.set(f"bucket{n % 10}", f"key{n}", {"n": n, "text": "x" * 32})
            times, text = await asyncio.to_thread(_scrape, str(node.config.api_socket), scrapes)
            metrics = NodeMetrics(node)
            renders = []
            for _ in range(scrapes):
                started = time.perf_counter()
                metrics.render()
                renders.append((time.perf_counter() - started) * 1000)
            families = list(text_string_to_metric_families(text))
            entry_samples = sum(s.value for f in families if f.name == "kairos_ledger_entries" for s in f.samples)
            assert entry_samples >= entries, entry_samples
            times.sort()
            return {
                "entries": len(node.ledger),
                "scrapes": scrapes,
                "scrape_ms_median": round(statistics.median(times), 2),
                "scrape_ms_p95": round(times[int(len(times) * 0.95) - 1], 2),
                "scrape_ms_max": round(times[-1], 2),
                "render_ms_median": round(statistics.median(renders), 2),
                "bytes": len(text.encode()),
                "families": len(families),
                "target_ms": 50,
                "cpus": os.cpu_count(),
                # what shared the cores: 1-minute load average before and after, processes running
                "load_before": round(load_before, 2),
                "load_after": round(os.getloadavg()[0], 2),
                "processes": len([pid for pid in os.listdir("/proc") if pid.isdigit()]),
            }
        finally:
            await net.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--scrapes", type=int, default=50)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.entries, args.scrapes)), indent=2))
