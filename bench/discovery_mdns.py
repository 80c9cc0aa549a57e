"""Benchmark: time until a LAN of N nodes has fully discovered itself over mDNS.

Runs N probe processes in network namespaces on one bridge (real multicast), all with one
token, and measures when the last node found the last other node. Prints one JSON document.
Needs root (network namespaces). Usage: ``python bench/discovery_mdns.py [--nodes 5] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from mdns_probe import discover_lan, full_discovery_times  # noqa: E402

from kairos_testing.netlab import Lab, cleanup_stale, require_netns  # noqa: E402
from kairos_core.token import generate_token  # noqa: E402


async def one_round(nodes: int) -> dict[str, float] | None:
    token = generate_token().encode()
    async with Lab(nodes=nodes) as lab:
        results = await discover_lan(lab, {i: token for i in range(1, nodes + 1)}, timeout=20, linger=0.2)
    return full_discovery_times(results, list(range(1, nodes + 1)))


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    reason = require_netns()
    if reason:
        print(json.dumps({"bench": "discovery_mdns", "skipped": reason}))
        return
    cleanup_stale()
    rounds = [await one_round(args.nodes) for _ in range(args.rounds)]
    done = [r for r in rounds if r is not None]
    report = {
        "bench": "discovery_mdns",
        "nodes": args.nodes,
        "rounds": args.rounds,
        "complete_rounds": len(done),
        "goal_s": 2.0,
        "seconds": {key: summary([r[key] for r in done]) for key in done[0]} if done else {},
        "definitions": {
            "from_spawn": "launch of the first process (Python start-up included) to the last discovery",
            "from_first_start": "first MDNSDiscovery.start() call to the last discovery",
            "from_last_start": "last MDNSDiscovery.start() call to the last discovery",
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
