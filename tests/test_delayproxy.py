"""The delaying TCP relay of the test kit (``kairos_testing.delayproxy``), on loopback: bytes arrive
intact and in order, never sooner than the delay each way, and a dead target or bad arguments end
cleanly (issue #17: the RTT namespace test relies on it instead of netem)."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from kairos_testing import delayproxy
from kairos_testing.delayproxy import DelayingProxy, echo_server

DELAY = 0.05


async def test_a_round_trip_takes_at_least_twice_the_delay_and_keeps_the_bytes() -> None:
    server, echo_port = await echo_server()
    proxy = DelayingProxy(echo_port, DELAY)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", await proxy.start())
        started = time.monotonic()
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert time.monotonic() - started >= 2 * DELAY  # held once each way: the floor it promises
        payload = bytes(range(256)) * 4096  # 1 MiB, many chunks: order must survive the queues
        writer.write(payload)
        assert await reader.readexactly(len(payload)) == payload
        writer.close()
    finally:
        await proxy.close()
        server.close()


async def test_a_dead_target_closes_the_client_connection() -> None:
    server, dead_port = await echo_server()
    server.close()
    await server.wait_closed()
    proxy = DelayingProxy(dead_port, DELAY)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", await proxy.start())
        assert await asyncio.wait_for(reader.read(1), 10) == b""
        assert proxy.failed_upstream == 1
        writer.close()
    finally:
        await proxy.close()


async def test_the_script_relays_and_stops_on_sigterm() -> None:
    server, echo_port = await echo_server()
    script = str(Path(delayproxy.__file__))
    argv = [sys.executable, script, "--listen", "127.0.0.1:0", "--target", f"127.0.0.1:{echo_port}", "--delay", "0.01"]
    relay = await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE)
    try:
        assert relay.stdout is not None
        ready = json.loads(await asyncio.wait_for(relay.stdout.readline(), 30))
        assert ready["ready"] is True
        reader, writer = await asyncio.open_connection("127.0.0.1", ready["port"])
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
        writer.close()
        relay.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(relay.wait(), 10) == 0
    finally:
        if relay.returncode is None:
            relay.kill()
            await relay.wait()
        server.close()


def test_bad_arguments_are_an_error_message_not_a_traceback() -> None:
    script = str(Path(delayproxy.__file__))
    done = subprocess.run(
        [sys.executable, script, "--listen", "nowhere", "--target", "127.0.0.1:1"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert "expected ADDRESS:PORT" in done.stderr and "Traceback" not in done.stderr
