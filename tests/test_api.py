"""The local API on a real unix socket, against a real ledger: routes, bad input, keep-alive, watch."""

from __future__ import annotations

import asyncio
import json
import stat

import pytest

from kairos_core.api import MAX_REQUEST_BYTES, APIClient, APIServer
from kairos_core.errors import KairosError
from kairos_core.identity import Identity
from kairos_core.ledger import Ledger, LedgerStore


class FakeMembership:
    def describe(self):
        return [{"peer_id": "p1", "alive": True}]


class FakeNode:
    """Just what the API reads; the ledger is real."""

    def __init__(self, tmp_path):
        self.ledger = Ledger(Identity.generate(), LedgerStore(tmp_path / "ledger.db"))
        self.membership = FakeMembership()

    def status(self):
        return {"peer_id": self.ledger.peer_id, "ledger_entries": len(self.ledger)}


@pytest.fixture
async def api(tmp_path):
    node = FakeNode(tmp_path)
    server = APIServer(node, tmp_path / "api.sock")
    await server.start()
    yield node, server
    await server.stop()
    node.ledger.close()


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
    assert await call("GET", "/api/peers") == [{"peer_id": "p1", "alive": True}]
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


async def test_invalid_unicode_is_a_clear_400_not_a_dropped_connection(api):
    node, server = api
    client = APIClient(server.socket_path)
    for path, body in (("/api/ledger/b/k", '"\\ud800"'), ("/api/ledger/b/%ED%A0%80", "1")):
        response = await asyncio.to_thread(client._client.request, "PUT", path, content=body)
        assert response.status_code == 400, (path, response.text)
        assert "not" in response.json()["error"]
    assert node.ledger.buckets() == []
