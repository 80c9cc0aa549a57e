"""What publishing RTTs in the ``nodes`` entries costs the ledger (issue #17); prints one JSON object.

    .venv/bin/python bench/rtt.py [--nodes 3] [--window 120]

Two in-process networks of ``--nodes`` nodes on loopback run side by side for ``--window`` idle
seconds after forming: one with ``membership.rtt_publish_interval`` at its default (60 s), one
with it 0 (RTTs only ride on writes that happen anyway). For each:

- ``entry_writes_per_node_per_min``: rewrites of the ``nodes`` entries in the window (each one is
  gossiped to every node), per node and minute;
- ``rtt_ms_seen``: the smallest and largest RTT the nodes measured meanwhile (loopback under the
  machine's load: the jitter that could trigger rewrites);

and ``entry_bytes``: a ``nodes`` entry as JSON with and without ``rtt_ms`` and ``relayed``, for
the neighbours these nodes have and for a node with 16 (``p2p.connections.high``).
``load_before`` / ``load_after`` / ``processes``: what shared the cores meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# Run as a script, this folder comes first on sys.path, and its dns.py would hide dnspython.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from kairos_core.localnet import LocalNetwork  # noqa: E402


def _beats(network: LocalNetwork) -> dict[str, int]:
    observer = network.nodes[0]
    return {node.peer_id: (observer.ledger.get("nodes", node.peer_id) or {}).get("beat", 0) for node in network.nodes}


def _entry_bytes(entry: dict[str, Any], neighbours: int) -> dict[str, int]:
    fake_ids = [f"12D3KooW{index:044d}" for index in range(neighbours)]
    grown = {**entry, "neighbours": fake_ids, "rtt_ms": [42] * neighbours, "relayed": []}
    bare = {key: value for key, value in grown.items() if key not in ("rtt_ms", "relayed")}
    return {"with_rtt": len(json.dumps(grown)), "without": len(json.dumps(bare))}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--window", type=float, default=120.0)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        networks = {
            "default_60s": LocalNetwork(Path(tmp) / "default"),
            "interval_0": LocalNetwork(Path(tmp) / "zero"),
        }
        overrides = {"default_60s": None, "interval_0": {"membership": {"rtt_publish_interval": 0}}}
        try:
            for name, network in networks.items():
                await network.start(args.nodes, overrides=overrides[name])
            for network in networks.values():
                await network.fully_connected(60)
            await asyncio.sleep(10)  # the follow-up writes with the first RTTs
            before = {name: _beats(network) for name, network in networks.items()}
            seen: dict[str, list[float]] = {name: [] for name in networks}
            loop = asyncio.get_running_loop()
            end = loop.time() + args.window
            while loop.time() < end:
                for name, network in networks.items():
                    for node in network.nodes:
                        seen[name] += [link["rtt_s"] * 1000 for link in node.host.links().values() if link["rtt_s"]]
                await asyncio.sleep(2)
            report: dict[str, Any] = {}
            for name, network in networks.items():
                after = _beats(network)
                writes = sum(after[peer] - before[name][peer] for peer in after)
                report[name] = {
                    "entry_writes_per_node_per_min": round(writes / args.nodes / (args.window / 60), 3),
                    "rtt_ms_seen": [round(min(seen[name]), 2), round(max(seen[name]), 2)] if seen[name] else None,
                }
            sample = networks["default_60s"].nodes[0]
            entry = sample.ledger.get("nodes", sample.peer_id)
            report["entry_bytes"] = {
                f"{args.nodes - 1}_neighbours": _entry_bytes(entry, args.nodes - 1),
                "16_neighbours": _entry_bytes(entry, 16),
            }
        finally:
            for network in networks.values():
                await network.stop()
    report.update(
        {
            "nodes": args.nodes,
            "window_s": args.window,
            "note": f"{2 * args.nodes} nodes in this one process; loopback; see docs/scaling.md for the cost model",
            "load_before": round(load_before, 2),
            "load_after": round(os.getloadavg()[0], 2),
            "processes": len([pid for pid in os.listdir("/proc") if pid.isdigit()]),
        }
    )
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main())
