"""Benchmark of the libp2p adapter on loopback; prints one JSON object.

    .venv/bin/python bench/p2p.py [--rounds 20] [--messages 200] [--megabytes 64]

- ``connect_admit_ms``: dial + noise + yamux + admission handshake, fresh pair of hosts each round;
- ``pubsub_one_way_ms``: publish on A until the handler on B runs (one message in flight);
- ``stream_mib_s``: 64 KiB frames A → B on one stream, acknowledged at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from kairos_core.p2p import Stream
from kairos_testing.hosts import HostFactory, collector, publish_until_received
from kairos_testing import wait_until

FRAME = 64 * 1024


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median": round(statistics.median(ordered), 3),
        "p90": round(ordered[int(len(ordered) * 0.9) - 1 if len(ordered) > 1 else 0], 3),
        "min": round(ordered[0], 3),
        "n": len(ordered),
    }


async def connect_latency(rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        factory = HostFactory()
        try:
            a = await factory.host()
            b = await factory.host()
            start = time.perf_counter()
            await a.connect(b.addresses())
            samples.append((time.perf_counter() - start) * 1000)
        finally:
            await factory.close()
    return samples


async def pubsub_latency(messages: int) -> list[float]:
    factory = HostFactory()
    try:
        a = await factory.host()
        b = await factory.host()
        inbox, handler = collector()
        b.subscribe("/bench", handler)
        a.subscribe("/bench", collector()[1])
        await a.connect(b.addresses())
        await publish_until_received(a, "/bench", inbox, b"warm-up")
        samples = []
        for i in range(messages):
            payload = b"m%d" % i
            start = time.perf_counter()
            await a.publish("/bench", payload)
            while (await inbox.get())[1] != payload:
                pass
            samples.append((time.perf_counter() - start) * 1000)
        return samples
    finally:
        await factory.close()


async def stream_throughput(megabytes: int) -> float:
    factory = HostFactory()
    try:
        a = await factory.host()
        b = await factory.host()
        total = megabytes * 1024 * 1024

        async def sink(stream: Stream) -> None:
            received = 0
            while frame := await stream.read_frame(FRAME):
                received += len(frame)
            await stream.write_frame(str(received).encode())
            await stream.close()

        b.set_stream_handler("/bench/sink", sink)
        await a.connect(b.addresses())
        await wait_until(lambda: a.peer_id in b.admitted_peers())
        stream = await a.open_stream(b.peer_id, "/bench/sink")
        frame = b"\xab" * FRAME
        start = time.perf_counter()
        for _ in range(total // FRAME):
            await stream.write_frame(frame)
        await stream.close()
        acknowledged = int(await stream.read_frame(64))
        elapsed = time.perf_counter() - start
        assert acknowledged == total, (acknowledged, total)
        return total / elapsed / (1024 * 1024)
    finally:
        await factory.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--megabytes", type=int, default=64)
    args = parser.parse_args()
    result = {
        "connect_admit_ms": _summary(await connect_latency(args.rounds)),
        "pubsub_one_way_ms": _summary(await pubsub_latency(args.messages)),
        "stream_mib_s": round(await stream_throughput(args.megabytes), 1),
        "frame_bytes": FRAME,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
