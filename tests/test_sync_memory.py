"""A peer that asks for the whole ledger again and again costs the server a bounded amount of memory
(issue #12, finding 5): sync responses are encoded frame by frame as they are sent, not all first.

The server is a real ledger serving real sessions over TCP on loopback; the peer is a raw client
that sends an empty digest (so every range is wanted) and reads the dump. Memory is what Python
allocates (tracemalloc's peak) while the sessions run, beyond what was allocated before them.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from pathlib import Path

from kairos_core.identity import Identity
from kairos_core.ledger import StreamChannel, SyncError, open_ledger, sync_ledgers
from kairos_core.ledger.sync import _View, _DIGEST, _ENTRIES, _ENTRIES_END, _ROOT, _WIRE_VERSION, EMPTY_RANGE, RANGES, pack_digest

SERVER = Identity.from_seed(bytes([9]) * 32)
FRAME = 64 * 1024  # the sessions' frame limit (a token's is larger; smaller shows the bound)
ENTRIES = 4000
VALUE = "x" * 2000  # ~2 KB per entry: the dump is ~8.5 MB of frames
DUMPS = 6  # sessions one after the other
CONCURRENT = 4  # sessions at once (MAX_SERVED_PER_PEER bounds this per peer in the node)
# What one session may hold beyond its view of the ledger (a dict slot per entry it offers, measured
# below; it grows with the number of entries, not their size): a few frames in flight, the
# transports' buffers on both ends. Far below one copy of the dump.
FRAMES_BOUND = 3 * 512 * 1024


async def _dump_client(channel: StreamChannel) -> int:
    """Ask for everything, read it all, give nothing; the bytes of entries received."""
    await channel.send(_ROOT + bytes(16))  # no ledger's root
    assert (await channel.recv())[:1] == _ROOT
    await channel.send(_DIGEST + bytes([_WIRE_VERSION]) + pack_digest(EMPTY_RANGE * RANGES))
    frame = await channel.recv()
    assert frame[:1] == _DIGEST
    received = 0
    while True:
        frame = await channel.recv()
        if frame == _ENTRIES_END:
            break
        assert frame[:1] == _ENTRIES
        received += len(frame)
        del frame
    await channel.send(_ENTRIES_END)
    return received


async def _serve_dumps(ledger, count: int) -> list[int]:
    served: list[asyncio.Task] = []

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        channel = StreamChannel(reader, writer, FRAME)
        served.append(asyncio.current_task())
        try:
            await sync_ledgers(ledger, channel, max_frame=FRAME)
        finally:
            await channel.aclose()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:

        async def one() -> int:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            channel = StreamChannel(reader, writer, FRAME)
            try:
                return await _dump_client(channel)
            finally:
                await channel.aclose()

        sizes = list(await asyncio.gather(*(one() for _ in range(count))))
        await asyncio.gather(*served)  # the server's side of each session has ended too
        served.clear()
        return sizes
    finally:
        server.close()
        await server.wait_closed()


async def test_whole_ledger_dumps_cost_the_server_a_bounded_amount_of_memory(tmp_path: Path) -> None:
    ledger = open_ledger(SERVER, tmp_path / "server")
    try:
        for i in range(ENTRIES):
            ledger.set("data", f"key-{i:05d}", VALUE)
        await _serve_dumps(ledger, 1)  # a first session fills what is cached once (range_of)
        gc.collect()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            view = _View(ledger)
            view_cost = tracemalloc.get_traced_memory()[0] - base
            del view
            bound = view_cost + FRAMES_BOUND
            for _ in range(DUMPS):
                tracemalloc.reset_peak()
                sizes = await _serve_dumps(ledger, 1)
                peak = tracemalloc.get_traced_memory()[1] - base
                assert sizes[0] > 3 * bound  # the dump itself is far above the bound
                assert peak < bound, f"one dump took {peak} bytes at its peak (view {view_cost})"
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - base
            assert grown < FRAMES_BOUND // 4, f"{grown} bytes stayed after {DUMPS} dumps"

            tracemalloc.reset_peak()
            sizes = await _serve_dumps(ledger, CONCURRENT)
            peak = tracemalloc.get_traced_memory()[1] - base
            assert all(size > 3 * bound for size in sizes)
            assert peak < CONCURRENT * bound, f"{CONCURRENT} dumps at once took {peak} bytes"
        finally:
            tracemalloc.stop()
    finally:
        ledger.close()


async def test_an_oversized_frame_is_refused_at_its_length_not_buffered(tmp_path: Path) -> None:
    """The channel would take 20 MiB frames (a token's message size); the session's limit is 1 MiB
    and the channel is narrowed to it, so an 8 MiB frame is refused before it is read."""
    ledger = open_ledger(SERVER, tmp_path / "server")
    outcome: asyncio.Future = asyncio.get_running_loop().create_future()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        channel = StreamChannel(reader, writer, 20 * 1024 * 1024)
        try:
            await sync_ledgers(ledger, channel)
            outcome.set_result(None)
        except Exception as exc:
            outcome.set_result(exc)
        finally:
            await channel.aclose()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        big = 8 * 1024 * 1024
        tracemalloc.start()
        try:
            writer.write(big.to_bytes(4, "big") + b"D" * (256 * 1024))  # the start of a big frame
            failure = await asyncio.wait_for(outcome, 10)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert isinstance(failure, SyncError) and "exceeds" in str(failure)
        assert peak < big // 4, f"{peak} bytes allocated for a frame refused at its length"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
        ledger.close()
