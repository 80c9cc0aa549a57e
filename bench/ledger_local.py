"""Micro-benchmarks of the ledger on one machine; prints one JSON object.

    .venv/bin/python bench/ledger_local.py [--entries 10000]

- ``local_set_per_s``: ``Ledger.set`` on a real sqlite file (one transaction each).
- ``apply_remote_*``: merging one batch of N remote entries (signature checks + one transaction).
- ``codec_*``: encoding and decoding N entries in gossip batches.
- ``digest_s``: computing the 256-range digest over N entries.
- ``late_joiner_sync_s``: a full anti-entropy session over TCP on loopback, an empty ledger pulling
  N entries from a veteran (file-backed stores on both sides), end to end.
- ``divergent_sync_s``: both sides hold N entries and each changed 5 % of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from kairos_core.identity import Identity
from kairos_core.ledger import (
    Entry,
    Ledger,
    StreamChannel,
    Version,
    decode_batch,
    open_ledger,
    split_batches,
    sync_ledgers,
)
from kairos_core.ledger.sync import DEFAULT_MAX_FRAME, _View


async def _sync_pair(a: Ledger, b: Ledger) -> float:
    accepted: asyncio.Future[StreamChannel] = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(StreamChannel(reader, writer, DEFAULT_MAX_FRAME))

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    left, right = StreamChannel(reader, writer, DEFAULT_MAX_FRAME), await accepted
    started = time.perf_counter()
    await asyncio.gather(sync_ledgers(a, left), sync_ledgers(b, right))
    elapsed = time.perf_counter() - started
    await left.aclose()
    await right.aclose()
    server.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=10_000)
    n = parser.parse_args().entries
    writers = [Identity.generate() for _ in range(5)]
    out: dict[str, float | int] = {"entries": n}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        local = open_ledger(writers[0], root / "local")
        count = min(n, 2000)
        t = time.perf_counter()
        for i in range(count):
            local.set("user", f"k{i}", {"i": i, "host": "node-%d" % i})
        out["local_set_per_s"] = round(count / (time.perf_counter() - t))
        local.close()

        now = int(time.time() * 1000)
        t = time.perf_counter()
        entries = [
            Entry.signed(
                writers[i % 5],
                "user",
                f"key-{i}",
                {"i": i, "addr": f"10.1.{i % 250}.{i % 200}"},
                Version(now - 5000, i, writers[i % 5].peer_id),
            )
            for i in range(n)
        ]
        out["sign_s"] = round(time.perf_counter() - t, 3)

        t = time.perf_counter()
        batches = split_batches(entries)
        out["codec_encode_s"] = round(time.perf_counter() - t, 3)
        out["codec_bytes_per_entry"] = round(sum(map(len, batches)) / n, 1)
        t = time.perf_counter()
        for b in batches:
            decode_batch(b)
        out["codec_decode_s"] = round(time.perf_counter() - t, 3)

        veteran = open_ledger(writers[0], root / "veteran")
        t = time.perf_counter()
        veteran.apply_remote(entries)
        out["apply_remote_batch_s"] = round(time.perf_counter() - t, 3)

        t = time.perf_counter()
        _View(veteran).digest()
        out["digest_s"] = round(time.perf_counter() - t, 4)

        joiner = open_ledger(writers[1], root / "joiner")
        out["late_joiner_sync_s"] = round(asyncio.run(_sync_pair(veteran, joiner)), 3)
        assert len(joiner) == n

        changed = max(1, n // 20)
        for i in range(changed):
            veteran.set("user", f"key-{i * 7 % n}", "changed on veteran")
            joiner.set("user", f"key-{(i * 11 + 3) % n}", "changed on joiner")
        out["divergent_sync_s"] = round(asyncio.run(_sync_pair(veteran, joiner)), 3)
        veteran.close()
        joiner.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
