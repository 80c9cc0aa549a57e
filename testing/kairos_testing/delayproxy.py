"""A TCP relay that holds every chunk ``delay`` seconds in each direction, in order: a link with a
known round-trip floor of 2 x ``delay`` where the kernel has no ``sch_netem`` to delay a veth.

Used in-process (:class:`DelayingProxy`, on loopback) and as a script run inside a network
namespace (``ip netns exec <ns> python3 delayproxy.py --listen ADDR:PORT --target ADDR:PORT``),
which prints one JSON line ``{"ready": true, "port": N}`` once it listens and relays until it gets
SIGTERM or SIGINT. Only the standard library is imported, so the file runs as a plain script.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

CHUNK = 65536


class DelayingProxy:
    """Accepts on ``listen_host`` and relays each connection to ``target``, every chunk held
    ``delay`` seconds after it was read (each direction on its own), order kept."""

    def __init__(self, target_port: int, delay: float, *, target_host: str = "127.0.0.1", listen_host: str = "127.0.0.1") -> None:
        if delay < 0:
            raise ValueError(f"a delay cannot be negative: {delay}")
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.delay = delay
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task] = set()
        self.writers: list[asyncio.StreamWriter] = []
        #: connections whose target could not be reached (closed at once)
        self.failed_upstream = 0

    async def start(self, port: int = 0) -> int:
        """Listen (``port`` 0: one the system picks); returns the port."""
        self.server = await asyncio.start_server(self._accept, self.listen_host, port)
        return self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            # The target is down: the client sees its connection closed, as a refused dial would.
            self.failed_upstream += 1
            writer.close()
            return
        self.writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
            for job in (self._read(source, queue), self._write(queue, sink)):
                task = asyncio.ensure_future(job)
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def _read(self, source: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while chunk := await source.read(CHUNK):
                queue.put_nowait((loop.time() + self.delay, chunk))
        except OSError:
            pass  # a reset counts as the end of this direction
        queue.put_nowait((loop.time() + self.delay, b""))  # end of stream, delayed like the data

    async def _write(self, queue: asyncio.Queue[tuple[float, bytes]], sink: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                due, chunk = await queue.get()
                await asyncio.sleep(max(0.0, due - loop.time()))
                if not chunk:
                    return
                sink.write(chunk)
                await sink.drain()
        except OSError:
            pass  # the other side went away: nothing more to deliver
        finally:
            sink.close()

    async def close(self) -> None:
        """Stop listening and drop every relayed connection."""
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def echo_server(host: str = "127.0.0.1") -> tuple[asyncio.Server, int]:
    """A TCP server sending back whatever it reads (a target to relay to); returns it and its port."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, host, 0)
    return server, server.sockets[0].getsockname()[1]


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected ADDRESS:PORT, not {text!r}")
    return host, int(port)


async def _serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    proxy = DelayingProxy(target[1], delay, target_host=target[0], listen_host=listen[0])
    port = await proxy.start(listen[1])
    print(json.dumps({"ready": True, "port": port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await proxy.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TCP relay delaying each direction by a fixed time.")
    parser.add_argument("--listen", type=_address, required=True, help="ADDRESS:PORT to accept on (port 0: any)")
    parser.add_argument("--target", type=_address, required=True, help="ADDRESS:PORT to relay to")
    parser.add_argument("--delay", type=float, default=0.050, help="seconds each chunk is held, per direction")
    args = parser.parse_args(argv)
    if args.delay < 0:
        parser.error("--delay cannot be negative")
    try:
        asyncio.run(_serve(args.listen, args.target, args.delay))
    except OSError as exc:
        print(json.dumps({"ready": False, "error": str(exc)}), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
