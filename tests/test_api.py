"""The local API on a real unix socket, against a real ledger: routes, bad input, keep-alive, watch."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import logging
import os
import socket
import stat

import pytest
from kairos_testing.fakenode import FakeNode

from kairos_core.api import MAX_REQUEST_BYTES, APIClient, APIServer
from kairos_core.errors import KairosError
from kairos_core.identity import Identity


@pytest.fixture
async def api(tmp_path):
    node = FakeNode()  # the ledger is real
    node.add_peer("p1")
    server = APIServer(node, tmp_path / "api.sock")
    await server.start()
    yield node, server
    await server.stop()
    await node.aclose()


async def test_peers_carry_each_connections_transport_and_rtt_to_the_cli(api, capsys):
    """``rtt_ms`` and ``transport`` in /api/peers, and in ``kairos peers`` as text and --json."""
    from kairos_core.cli import main

    node, server = api
    node.add_peer("p2", {"hostname": "far"})
    node.add_peer("p3", {"hostname": "gone"})
    node.neighbour_ids.update({"p1", "p2"})
    node.rtts.update({"p1": 0.00042, "p2": 0.0413, "p3": 0.5})  # p3 is not connected: no RTT
    node.relayed.add("p2")
    client = APIClient(server.socket_path)
    rows = {row["peer_id"]: row for row in await asyncio.to_thread(client.request, "GET", "/api/peers")}
    assert (rows["p1"]["transport"], rows["p1"]["rtt_ms"]) == ("direct", 0.42)
    assert (rows["p2"]["transport"], rows["p2"]["rtt_ms"]) == ("relayed", 41.3)
    assert (rows["p3"]["transport"], rows["p3"]["rtt_ms"]) == (None, None)

    async def cli(*argv: str) -> str:
        capsys.readouterr()
        try:
            await asyncio.to_thread(main, [*argv, "--socket", str(server.socket_path)])
        except SystemExit as exit:
            assert exit.code in (0, None)
        return capsys.readouterr().out

    shown = {row["peer_id"]: row["rtt_ms"] for row in json.loads(await cli("peers", "--json"))}
    assert shown == {"p1": 0.42, "p2": 41.3, "p3": None}
    lines = {line.split()[1]: line for line in (await cli("peers")).splitlines() if line.split()[1:2] in (["p1"], ["p2"], ["p3"])}
    assert "0.4 ms" in lines["p1"] and "41 ms (relayed)" in lines["p2"] and " ms" not in lines["p3"]


async def raw(socket_path, data: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


async def test_routes_and_socket_mode(api):
    node, server = api
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o600
    client = APIClient(server.socket_path)
    call = lambda *a, **k: asyncio.to_thread(client.request, *a, **k)  # noqa: E731
    assert (await call("GET", "/api/status"))["peer_id"] == node.ledger.peer_id
    peers = await call("GET", "/api/peers")
    assert peers == node.describe_peers() and [(p["peer_id"], p["alive"]) for p in peers] == [("p1", True)]
    written = await call("PUT", "/api/ledger/b/k%2Fslash", content='{"x": 1}')
    assert written["key"] == "k/slash" and node.ledger.get("b", "k/slash") == {"x": 1}
    assert await call("GET", "/api/ledger") == ["b"]
    assert await call("GET", "/api/ledger/b") == {"k/slash": {"x": 1}}
    assert (await call("GET", "/api/ledger/b/k%2Fslash"))["value"] == {"x": 1}
    await call("DELETE", "/api/ledger/b/k%2Fslash")
    with pytest.raises(KairosError, match="no key b/k/slash"):
        await call("GET", "/api/ledger/b/k%2Fslash")


@pytest.mark.parametrize(
    "method, path, body, status, message",
    [
        ("PUT", "/api/ledger/b/k", "not json", 400, "must be a JSON value"),
        ("PUT", "/api/ledger/nodes/someone-else", "1", 400, "not this node's to write"),
        ("PUT", "/api/ledger/b/k", json.dumps("x" * 70000), 400, "max_value_size"),
        ("GET", "/api/nothing", None, 404, "not found"),
        ("POST", "/api/ledger/b/k", "1", 405, "not allowed"),
    ],
)
async def test_bad_requests_get_clear_errors(api, method, path, body, status, message):
    _, server = api
    client = APIClient(server.socket_path)
    response = await asyncio.to_thread(client._client.request, method, path, content=body)
    assert response.status_code == status
    assert message in response.json()["error"]


async def test_oversized_body_garbage_and_keep_alive(api):
    node, server = api
    huge = b"PUT /api/ledger/b/k HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % (MAX_REQUEST_BYTES + 10)
    answer = await raw(server.socket_path, huge + b"1" * (MAX_REQUEST_BYTES + 10))
    assert b" 413 " in answer.split(b"\r\n")[0]
    assert node.ledger.get("b", "k") is None
    answer = await raw(server.socket_path, b"\x00\xffgarbage that is not http\r\n\r\n")
    assert b" 400 " in answer.split(b"\r\n")[0] and b"not HTTP/1.1" in answer
    # two requests on one connection
    two = b"GET /api/ledger HTTP/1.1\r\nhost: x\r\n\r\nGET /api/status HTTP/1.1\r\nhost: x\r\n\r\n"
    reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
    writer.write(two)
    await writer.drain()
    received = b""
    while received.count(b"HTTP/1.1 200") < 2:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, received
        received += chunk
    writer.close()
    # the server still serves after all that
    assert (await asyncio.to_thread(APIClient(server.socket_path).request, "GET", "/api/status"))["peer_id"]


async def test_watch_streams_and_ends_when_the_client_goes(api):
    node, server = api
    reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
    writer.write(b"GET /api/watch?bucket=w HTTP/1.1\r\nhost: x\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert b"200" in head and b"chunked" in head.lower()
    await asyncio.sleep(0.05)
    node.ledger.set("other", "x", 1)
    node.ledger.set("w", "a", 2)
    body = b""
    while b'"key": "a"' not in body:
        body += await asyncio.wait_for(reader.read(4096), 5)
    assert b'"bucket": "other"' not in body
    writer.close()
    await asyncio.sleep(0.2)
    assert len(server._connections) == 0  # the handler noticed the hang-up without any new update


async def test_stopping_the_api_under_an_open_watch_logs_no_error(tmp_path, caplog):
    node = FakeNode()
    server = APIServer(node, tmp_path / "api.sock")
    await server.start()
    reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
    writer.write(b"GET /api/watch HTTP/1.1\r\nhost: x\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    await asyncio.sleep(0.05)
    assert len(node.ledger._watchers) == 1
    await server.stop()  # as the node does when it stops, the watch still open
    writer.close()
    await node.aclose()
    for _ in range(3):  # an unretrieved task exception is logged when the task is collected
        await asyncio.sleep(0)
        gc.collect()
    assert not node.ledger._watchers
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


async def test_invalid_unicode_is_a_clear_400_not_a_dropped_connection(api):
    node, server = api
    client = APIClient(server.socket_path)
    for path, body in (("/api/ledger/b/k", '"\\ud800"'), ("/api/ledger/b/%ED%A0%80", "1")):
        response = await asyncio.to_thread(client._client.request, "PUT", path, content=body)
        assert response.status_code == 400, (path, response.text)
        assert "not" in response.json()["error"]
    assert node.ledger.buckets() == []


@pytest.mark.parametrize(
    "body, message",
    [
        ("[" * 100_000, "nested too deeply"),  # RecursionError in json.loads: was a 500
        ("[" * 600 + "]" * 600, "nested more than 64"),  # parses, but no value may nest that deep
        ("1" * 5000, "must be a JSON value"),  # ValueError: over 4300 digits
    ],
)
async def test_deep_or_huge_json_is_a_one_line_400_never_a_500(api, body, message, caplog):
    node, server = api
    client = APIClient(server.socket_path)
    response = await asyncio.to_thread(client._client.request, "PUT", "/api/ledger/b/k", content=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert message in error and "\n" not in error and len(error) < 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback logged
    assert node.ledger.get("b", "k") is None


async def read_watch_lines(reader, count: int) -> list[dict]:
    """The next ``count`` JSON lines of a chunked watch response (after its head)."""
    lines: list[dict] = []
    buffer = b""
    while len(lines) < count:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, f"the watch stream ended after {lines}"
        buffer += chunk
        # Chunk framing: "<hex size>\r\n<data>\r\n"; the data are whole lines.
        while b"\r\n" in buffer:
            size_text, rest = buffer.split(b"\r\n", 1)
            size = int(size_text, 16)
            if len(rest) < size + 2:
                break
            lines.extend(json.loads(line) for line in rest[:size].splitlines() if line.strip())
            buffer = rest[size + 2 :]
            if size == 0:
                return lines
    return lines


async def test_a_watch_survives_a_value_too_deep_to_encode(api):
    node, server = api
    reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
    writer.write(b"GET /api/watch?bucket=w HTTP/1.1\r\nhost: x\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    await asyncio.sleep(0.05)
    # A value that a node stored before values had a depth bound (or that a plugin pushed past
    # the checks): dataclasses.asdict in the old encoder died at ~500 levels, json at ~1000.
    from kairos_core.events import LedgerUpdate

    for depth in (600, 5000):
        deep: object = 1
        for _ in range(depth):
            deep = [deep]
        update = LedgerUpdate("w", f"deep{depth}", deep, node.ledger.peer_id, (1, 0, node.ledger.peer_id), False, False)
        node.ledger._emit([update])
    node.ledger.set("w", "after", 3)
    lines = await read_watch_lines(reader, 3)
    writer.close()
    assert [line["key"] for line in lines] == ["deep600", "deep5000", "after"]
    assert lines[0]["value"] is not None or "error" in lines[0]
    assert lines[1]["value"] is None and "nested too deeply" in lines[1]["error"]
    assert lines[2]["value"] == 3 and "error" not in lines[2]


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settle_memory() -> None:
    # Measure what is still referenced, not what glibc keeps cached after a free: without a trim,
    # RSS after a burst of large allocations stays high whoever holds them.
    gc.collect()
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def stalled_watch_client(socket_path) -> socket.socket:
    """A watch client that sends its request and then never reads a byte."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(str(socket_path))
    client.sendall(b"GET /api/watch HTTP/1.1\r\nhost: kairos\r\n\r\n")
    client.setblocking(False)
    return client


async def read_to_end(client: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    received = b""
    while chunk := await asyncio.wait_for(loop.sock_recv(client, 1 << 20), 10):
        received += chunk
    return received


async def write_values(ledger, count: int, size: int, tag: str) -> None:
    value = "x" * size
    for i in range(count):
        ledger.set("bulk", f"k{i % 50}", f"{tag}{i}{value}")
        await asyncio.sleep(0)  # one write at a time, as API clients make them


async def wait_for(condition, timeout: float = 15.0) -> None:
    from kairos_testing import wait_until

    await wait_until(condition, timeout)


async def test_a_watch_client_that_stops_reading_is_dropped_with_a_clear_last_line(api, monkeypatch):
    import kairos_core.api as api_module

    node, server = api
    monkeypatch.setattr(api_module, "WATCH_CLOSE_GRACE", 30.0)  # time enough to read the last line
    client = stalled_watch_client(server.socket_path)
    try:
        await wait_for(lambda: len(node.ledger._watchers) == 1)
        await write_values(node.ledger, 200, 30_000, "v")  # 6 MB for a client that reads nothing
        await wait_for(lambda: node.ledger.counters["watch_dropped"] == 1)
        body = await read_to_end(client)  # it reads at last: what it missed ends with the reason
    finally:
        client.close()
    assert body.endswith(b"\r\n0\r\n\r\n")  # the chunked response is properly ended
    last = json.loads(body[: -len(b"\r\n0\r\n\r\n")].rsplit(b"\r\n", 1)[-1])
    assert last == {"error": f"watch dropped: the client fell more than {api_module.WATCH_CLIENT_BUFFER} bytes behind"}
    assert node.ledger.counters["watch_dropped"] == 1


async def test_a_dropped_client_that_never_reads_is_cut_after_the_grace(api, monkeypatch):
    import kairos_core.api as api_module

    node, server = api
    monkeypatch.setattr(api_module, "WATCH_CLOSE_GRACE", 0.2)
    client = stalled_watch_client(server.socket_path)
    try:
        await wait_for(lambda: len(node.ledger._watchers) == 1)
        await write_values(node.ledger, 100, 30_000, "v")
        await wait_for(lambda: node.ledger.counters["watch_dropped"] == 1)
        await wait_for(lambda: not server._connections, timeout=5)  # the client still holds its end
    finally:
        client.close()


async def test_a_watch_client_that_keeps_up_is_never_dropped_even_by_large_values(api):
    node, server = api
    reader, writer = await asyncio.open_unix_connection(str(server.socket_path))
    writer.write(b"GET /api/watch HTTP/1.1\r\nhost: x\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    await wait_for(lambda: len(node.ledger._watchers) == 1)
    node.ledger.max_value_size = 1024 * 1024
    reading = asyncio.ensure_future(read_watch_lines(reader, 41))
    await write_values(node.ledger, 40, 60_000, "v")
    node.ledger.set("bulk", "huge", "x" * 900_000)  # one line far over the buffer bound
    lines = await reading
    writer.close()
    assert len(lines) == 41 and lines[-1]["key"] == "huge"
    assert node.ledger.counters["watch_dropped"] == 0


def settled_rss() -> int:
    # Count what is still referenced, not what glibc keeps cached after a free: without a trim,
    # RSS after a burst of large allocations stays high whoever holds them.
    gc.collect()
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    return rss_bytes()


async def rss_held_since(before: int, bound: int, timeout: float = 5.0) -> int:
    """What RSS grew by since ``before``, polled until below ``bound`` or ``timeout``: a dropped
    connection's buffers go with its transport's ``connection_lost``, a few loop turns after the
    server forgot it (on this machine ~14 MB measured at once, 0.5 MB a second later)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        held = settled_rss() - before
        if held < bound or asyncio.get_running_loop().time() > deadline:
            return held
        await asyncio.sleep(0.1)


async def write_as_a_peer(ledger, count: int, size: int, tag: str) -> None:
    """Updates that arrive from another node: they reach every watcher, but the node does not
    gossip them again, whose native memory (about the bytes written) would swamp the measurement."""
    from kairos_core.ledger import Entry, HybridLogicalClock

    peer = Identity.from_seed(b"\x07" * 32)
    clock = HybridLogicalClock(peer.peer_id)
    value = "x" * size
    for i in range(count):
        entry = Entry.signed(peer, "bulk", f"k{i % 50}", f"{tag}{i}{value}", clock.tick())
        assert len(ledger.apply_remote([entry])) == 1
        await asyncio.sleep(0)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
async def test_watch_clients_that_never_read_are_dropped_and_pin_no_memory(kairos_network, monkeypatch):
    """Through the real API of a real node: 50 watch clients that never read used to keep every
    update written after they stopped (up to 10,000 of them) alive until they closed."""
    import kairos_core.api as api_module

    monkeypatch.setattr(api_module, "WATCH_CLOSE_GRACE", 0.5)
    net = await kairos_network(1)
    node = net.nodes[0]
    await write_as_a_peer(node.ledger, 300, 32_000, "warm")
    before = settled_rss()
    clients = [stalled_watch_client(node.config.api_socket) for _ in range(50)]
    try:
        await net.wait_for(lambda: len(node.ledger._watchers) == 50)
        await write_as_a_peer(node.ledger, 1000, 32_000, "load")  # 32 MB of updates for each client
        await net.wait_for(lambda: node.ledger.counters["watch_dropped"] == 50, timeout=30)
        await net.wait_for(lambda: not node.api._connections and not node.ledger._watchers)
        held = await rss_held_since(before, 12 * 2**20)
        assert held < 12 * 2**20, f"{held / 2**20:.0f} MB held by 50 stalled watch clients"
        assert node.status()["counters"]["ledger_watch_dropped"] == 50
    finally:
        for client in clients:
            client.close()
    after = await rss_held_since(before, 12 * 2**20)
    assert after < 12 * 2**20, f"{after / 2**20:.0f} MB still held after the clients closed"
