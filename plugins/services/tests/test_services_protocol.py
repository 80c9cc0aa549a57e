"""The services plugin on in-process nodes (real libp2p hosts on loopback): what a peer may send
on ``/kairos/service/1.0.0`` and to the side listener, the ledger policy, and the sealing."""

from __future__ import annotations

import asyncio
import json
import struct

import pytest
from kairos_core.plugin import APIClient, KairosError, LedgerError, hookimpl

import kairos_plugin_services.plugin as services_plugin
from kairos_plugin_services import sealed, wire
from kairos_plugin_services.catalog import BUCKET
from kairos_plugin_services.plugin import _RUNTIMES
from kairos_plugin_services.relay import MAX_IDLE_PER_PEER, SideWait
from kairos_testing.delayproxy import echo_server


async def two_nodes(kairos_network, **services):
    net = await kairos_network(2, plugins=[services_plugin], overrides={"services": services})
    await net.fully_connected()
    return net, net.nodes[0], net.nodes[1]


async def request(node, peer_id: str, header: bytes) -> bytes:
    stream = await asyncio.wait_for(node.open_stream(peer_id, wire.PROTOCOL), 10)
    try:
        await stream.write(header)
        return await asyncio.wait_for(stream.read_frame(wire.MAX_MESSAGE), 10)
    except KairosError:
        return b""
    finally:
        await stream.reset()


async def test_garbage_and_oversized_headers_are_dropped_and_counted(kairos_network):
    server, port = await echo_server()
    net, exposer, rogue = await two_nodes(kairos_network)
    try:
        _RUNTIMES[id(exposer)].expose("echo", f"127.0.0.1:{port}")
        garbage = [
            struct.pack(">I", 5) + b"hello",  # a frame, not JSON
            struct.pack(">I", 9) + b'{"x": 1} ',  # JSON, not a request
            struct.pack(">I", 10_000_000),  # an oversized frame
            struct.pack(">I", 20) + b'{"service": "echo", "protocol": "tcp", "side": "AAAA"}'[:20],
        ]
        for index, data in enumerate(garbage[:3]):
            assert await request(rogue, exposer.peer_id, data) == b""  # reset, no answer
            # the core resets an oversized frame's stream itself, a moment before the plugin counts
            await net.wait_for(lambda index=index: _status(exposer).get("services_dropped_malformed") == index + 1)
        # a header cut short by a reset
        stream = await asyncio.wait_for(rogue.open_stream(exposer.peer_id, wire.PROTOCOL), 10)
        await stream.write(garbage[3][:10])
        await stream.reset()
        await net.wait_for(lambda: _status(exposer)["services_dropped_malformed"] == 4)
        # a well-formed request still works: the node did not crash and answers
        body = wire.request("echo", "tcp", None)
        answer = wire.parse_answer(await request(rogue, exposer.peer_id, struct.pack(">I", len(body)) + body))
        assert answer is not None and answer[0] is True
        unknown = wire.request("nope", "tcp", None)
        answer = wire.parse_answer(await request(rogue, exposer.peer_id, struct.pack(">I", len(unknown)) + unknown))
        assert answer is not None and answer[0] is False and "nope" in answer[1]
        assert _status(exposer)["services_rejected_requests"] == 1
        assert _status(exposer)["services_dropped_malformed"] == 4
    finally:
        server.close()


def _status(node) -> dict[str, int]:
    return {k: v for k, v in node.status()["counters"].items() if k.startswith("services_")}


async def test_streams_over_the_per_peer_limit_are_refused_and_counted(kairos_network):
    net, exposer, peer = await two_nodes(kairos_network, max_connections_per_peer=2, connect_timeout=30.0)
    held = [await asyncio.wait_for(peer.open_stream(exposer.peer_id, wire.PROTOCOL), 10) for _ in range(2)]
    await net.wait_for(lambda: sum(_RUNTIMES[id(exposer)].serving.values()) == 2)
    extra = await asyncio.wait_for(peer.open_stream(exposer.peer_id, wire.PROTOCOL), 10)
    answer = wire.parse_answer(await asyncio.wait_for(extra.read_frame(wire.MAX_MESSAGE), 10))
    assert answer is not None and answer[0] is False and "too many" in answer[1]
    assert _status(exposer)["services_rejected_over_limit"] == 1
    for stream in held + [extra]:
        await stream.reset()
    await net.wait_for(lambda: not _RUNTIMES[id(exposer)].serving)


async def test_side_listener_drops_wrong_tickets_and_forged_hellos(kairos_network):
    net, exposer, _ = await two_nodes(kairos_network)
    services = _RUNTIMES[id(exposer)]
    ticket = sealed.new_ticket()
    to_exposer, to_connector = sealed.derive_keys(sealed.new_nonce(), sealed.new_nonce(), ticket)
    loop = asyncio.get_running_loop()
    services.pending[ticket] = SideWait("peer", sealed.Sealer(to_connector), sealed.Opener(to_exposer), loop.create_future())
    wrong_key = sealed.Sealer(sealed.derive_keys(sealed.new_nonce(), sealed.new_nonce(), ticket)[0])
    for attempt in (
        sealed.new_ticket() + sealed.Sealer(to_exposer).seal(sealed.KIND_HELLO),  # unknown ticket
        ticket + wrong_key.seal(sealed.KIND_HELLO),  # a forged HELLO
        ticket + b"\x00" * 40,
    ):  # garbage
        reader, writer = await asyncio.open_connection("127.0.0.1", services.side_port)
        writer.write(attempt)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed without a word
        writer.close()
    assert _status(exposer)["services_side_rejected"] == 3
    assert not services.pending[ticket].ready.done()  # still waiting for the real peer
    reader, writer = await asyncio.open_connection("127.0.0.1", services.side_port)
    writer.write(ticket + sealed.Sealer(to_exposer).seal(sealed.KIND_HELLO))
    kind, _ = await asyncio.wait_for(sealed.Opener(to_connector).read(reader), 10)
    assert kind == sealed.KIND_HELLO and services.pending[ticket].ready.done()
    writer.close()
    services.pending.pop(ticket)


async def test_only_the_owner_writes_its_advertisement(kairos_network):
    net, a, b = await two_nodes(kairos_network)
    _RUNTIMES[id(a)].expose("web", "127.0.0.1:8080", "tcp", "the web")
    await net.wait_for(lambda: b.ledger.get(BUCKET, f"{a.peer_id}/web") is not None)
    with pytest.raises(LedgerError):
        b.ledger.set(BUCKET, f"{a.peer_id}/web", {"protocol": "tcp", "description": "forged"})
    with pytest.raises(LedgerError):  # its own key, but not an advertisement
        b.ledger.set(BUCKET, f"{b.peer_id}/web", {"protocol": "sctp", "description": ""})
    assert "to" not in b.ledger.get(BUCKET, f"{a.peer_id}/web")  # the target stays on its node


async def test_api_routes_expose_connect_and_refuse_bad_input(kairos_network):
    net, a, b = await two_nodes(kairos_network)
    server, port = await echo_server()
    try:
        client_a, client_b = APIClient(a.config.api_socket), APIClient(b.config.api_socket)

        def call(client, method, path, body=None):
            return client.request(method, f"/api/plugins/services{path}", content=json.dumps(body) if body is not None else None)

        done = await asyncio.to_thread(call, client_a, "POST", "/expose", {"name": "echo", "to": f"127.0.0.1:{port}"})
        assert done["to"] == f"127.0.0.1:{port}"
        for bad, message in (
            ({"name": "Bad Name!", "to": "1.2.3.4:5"}, "service name"),
            ({"name": "x", "to": "nowhere"}, "HOST:PORT"),
        ):
            with pytest.raises(KairosError, match=message):
                await asyncio.to_thread(call, client_a, "POST", "/expose", bad)
        await net.wait_for(lambda: b.ledger.get(BUCKET, f"{a.peer_id}/echo") is not None)
        listen = (await asyncio.to_thread(call, client_b, "POST", "/connect", {"name": "echo", "listen": "127.0.0.1:0"}))[
            "listen"
        ]
        with pytest.raises(KairosError, match="connected already"):
            await asyncio.to_thread(call, client_b, "POST", "/connect", {"name": "echo", "listen": "127.0.0.1:0"})
        reader, writer = await asyncio.open_connection("127.0.0.1", int(listen.rsplit(":", 1)[1]))
        writer.write(b"ping through the side connection")
        writer.write_eof()  # half-close: the echo still comes back
        assert await asyncio.wait_for(reader.read(), 20) == b"ping through the side connection"
        writer.close()
        listing = await asyncio.to_thread(call, client_b, "GET", "")
        assert [(s["name"], s["owner"], s["alive"]) for s in listing["services"]] == [("echo", a.peer_id, True)]
        await net.wait_for(lambda: _status(b).get("services_side_connections") == 1)
    finally:
        server.close()


def test_sealed_records_refuse_tampering_replay_and_reordering():
    to_exposer, _ = sealed.derive_keys(sealed.new_nonce(), sealed.new_nonce(), sealed.new_ticket())
    sealer = sealed.Sealer(to_exposer)
    first, second = sealer.seal(sealed.KIND_DATA, b"one"), sealer.seal(sealed.KIND_DATA, b"two")
    header = sealed.HEADER.size

    def opens(*records: bytes) -> list[bytes]:
        opener = sealed.Opener(to_exposer)
        return [opener.open(r[4], r[header:]) for r in records]

    assert opens(first, second) == [b"one", b"two"]
    with pytest.raises(sealed.SealError):
        opens(second)  # reordered (or the first one dropped)
    with pytest.raises(sealed.SealError):
        opens(first, first)  # replayed
    flipped = bytearray(first)
    flipped[-1] ^= 1
    with pytest.raises(sealed.SealError):
        opens(bytes(flipped))  # altered
    with pytest.raises(sealed.SealError):  # the kind is authenticated too
        sealed.Opener(to_exposer).open(sealed.KIND_END, first[header:])


@pytest.mark.parametrize("side", [True, False], ids=["side", "stream"])
async def test_stopping_the_exposing_node_tears_the_connection_down(kairos_network, side):
    server, port = await echo_server()
    net, exposer, connector = await two_nodes(kairos_network, side_connection=side)
    try:
        _RUNTIMES[id(exposer)].expose("echo", f"127.0.0.1:{port}")
        await net.wait_for(lambda: connector.ledger.get(BUCKET, f"{exposer.peer_id}/echo") is not None)
        listen = _RUNTIMES[id(connector)].connect("echo", "127.0.0.1:0")["listen"]
        reader, writer = await asyncio.open_connection("127.0.0.1", int(listen.rsplit(":", 1)[1]))
        writer.write(b"before")
        assert await asyncio.wait_for(reader.readexactly(6), 20) == b"before"
        await exposer.stop()
        try:
            rest = await asyncio.wait_for(reader.read(), 20)  # the end, not a hang
        except ConnectionResetError:
            rest = b""
        assert rest == b""
        writer.close()
        key = "services_side_connections" if side else "services_stream_connections"
        assert _status(connector)[key] == 1
    finally:
        server.close()


async def test_hook_kairos_api_routes(kairos_network):
    """The hook the services commands ride on: ``/api/plugins/<name>/…`` reaches the handler a
    plugin names, with the method, the rest of the path and the decoded body; a KairosError is a
    one-line 400, an unknown name a 404, a body that is not JSON a 400."""
    seen = []

    class Routes:
        @hookimpl
        def kairos_api_routes(self, node):
            def handler(method, rest, body):
                if rest == ["fail"]:
                    raise KairosError("no such thing")
                seen.append((method, rest, body))
                return {"peer_id": node.peer_id}

            return {"probe": handler}

    net = await kairos_network(1, plugins=[Routes()])
    node = net.nodes[0]
    client = APIClient(node.config.api_socket)
    answer = await asyncio.to_thread(client.request, "POST", "/api/plugins/probe/a/b%2Fc", content=b'{"x": [1]}')
    assert answer == {"peer_id": node.peer_id} and seen == [("POST", ["a", "b/c"], {"x": [1]})]
    for path, content, message in (
        ("/api/plugins/probe/fail", None, "no such thing"),
        ("/api/plugins/nobody/x", None, "no plugin serves /api/plugins/nobody"),
        ("/api/plugins/probe/x", b"{not json", "must be a JSON value"),
    ):
        with pytest.raises(KairosError, match=message):
            await asyncio.to_thread(client.request, "PUT", path, content=content)
    assert len(seen) == 1


async def test_bytes_fall_back_to_the_stream_when_the_side_connection_cannot_be_made(kairos_network):
    server, port = await echo_server()
    net, exposer, connector = await two_nodes(kairos_network)
    try:
        exposing = _RUNTIMES[id(exposer)]
        exposing.side_server.close()  # still offered in answers, but nobody listens
        await exposing.side_server.wait_closed()
        exposing.expose("echo", f"127.0.0.1:{port}")
        await net.wait_for(lambda: connector.ledger.get(BUCKET, f"{exposer.peer_id}/echo") is not None)
        listen = _RUNTIMES[id(connector)].connect("echo", "127.0.0.1:0")["listen"]
        reader, writer = await asyncio.open_connection("127.0.0.1", int(listen.rsplit(":", 1)[1]))
        payload = bytes(range(256)) * 4096
        writer.write(payload)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 60) == payload
        writer.close()
        counted = _status(connector)
        # the connection's own attempt, and the pool's (which then gives up until the next connection)
        assert counted["services_side_unreachable"] >= 1 and counted["services_stream_connections"] == 1
        assert "services_side_connections" not in counted

        # a UDP session falls back the same way, and does not try the side port again at once
        loop = asyncio.get_running_loop()
        udp_echo, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
        answers: asyncio.Queue[bytes] = asyncio.Queue()

        exposing.expose("uecho", f"127.0.0.1:{udp_echo.get_extra_info('sockname')[1]}", "udp")
        await net.wait_for(lambda: connector.ledger.get(BUCKET, f"{exposer.peer_id}/uecho") is not None)
        services = _RUNTIMES[id(connector)]
        await net.wait_for(lambda: exposer.peer_id in services.pool_failed)  # the pool's own try is over
        counted = _status(connector)
        udp_port = int(services.connect("uecho", "127.0.0.1:0")["listen"].rsplit(":", 1)[1])
        await net.wait_for(lambda: services.connectors["uecho"].transport is not None)
        client, _ = await loop.create_datagram_endpoint(lambda: Collect(answers), remote_addr=("127.0.0.1", udp_port))
        try:
            client.sendto(b"datagram")
            assert await asyncio.wait_for(answers.get(), 30) == b"datagram"
        finally:
            client.close()
            udp_echo.close()
        after = _status(connector)
        assert after["services_stream_connections"] == 2 and "services_side_connections" not in after
        assert after["services_side_unreachable"] == counted["services_side_unreachable"]  # not tried again
    finally:
        server.close()


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


class Collect(asyncio.DatagramProtocol):
    def __init__(self, answers: asyncio.Queue[bytes]) -> None:
        self.answers = answers

    def datagram_received(self, data, addr):
        self.answers.put_nowait(data)


async def test_udp_sessions_end_when_idle_and_count_over_the_limit(kairos_network):
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
    net, exposer, connector = await two_nodes(kairos_network, udp_idle_timeout=0.5, max_connections=1)
    clients = []
    try:
        _RUNTIMES[id(exposer)].expose("echo", f"127.0.0.1:{echo.get_extra_info('sockname')[1]}", "udp")
        await net.wait_for(lambda: connector.ledger.get(BUCKET, f"{exposer.peer_id}/echo") is not None)
        services = _RUNTIMES[id(connector)]
        port = int(services.connect("echo", "127.0.0.1:0")["listen"].rsplit(":", 1)[1])
        await net.wait_for(lambda: services.connectors["echo"].transport is not None)
        answers: asyncio.Queue[bytes] = asyncio.Queue()
        for _ in range(2):
            transport, _ = await loop.create_datagram_endpoint(lambda: Collect(answers), remote_addr=("127.0.0.1", port))
            clients.append(transport)
        clients[0].sendto(b"first")
        assert await asyncio.wait_for(answers.get(), 20) == b"first"
        clients[1].sendto(b"second")  # a second client address: over max_connections=1
        await net.wait_for(lambda: _status(connector).get("services_rejected_over_limit") == 1)
        await net.wait_for(lambda: not services.connectors["echo"].sessions, timeout=20)  # idle: closed
        await net.wait_for(lambda: not _RUNTIMES[id(exposer)].serving, timeout=20)  # both ends
        clients[1].sendto(b"again")  # the place is free again
        assert await asyncio.wait_for(answers.get(), 20) == b"again"
    finally:
        for transport in clients:
            transport.close()
        echo.close()


def test_answers_are_checked_before_they_are_used():
    ticket, nonce = wire.b64(sealed.new_ticket()), wire.b64(sealed.new_nonce())
    good = {"ok": True, "side": {"ticket": ticket, "nonce": nonce, "port": 4000, "hosts": ["10.0.0.1", "::1"]}}
    assert wire.parse_answer(json.dumps(good).encode())[2]["hosts"] == ["10.0.0.1", "::1"]
    for side in (
        {**good["side"], "hosts": ["intranet.example"]},  # never resolve a peer's names
        {**good["side"], "port": 0},
        {**good["side"], "ticket": nonce},
        {**good["side"], "nonce": "!!"},
    ):
        assert wire.parse_answer(json.dumps({"ok": True, "side": side}).encode()) is None
    refused = wire.parse_answer(json.dumps({"ok": False, "error": "no\x1b[2Jway"}).encode())
    assert refused == (False, "no?[2Jway", None)
    for raw in (b"", b"[]", b'{"ok": 1}', b"\xff", b'{"ok": false}'):
        assert wire.parse_answer(raw) is None


async def test_side_connections_are_pooled_and_reused(kairos_network):
    """Sequential connections reuse one proven side connection (a request on it, no stream), and
    both ends keep at most ``side_pool`` idle; a pooled one the exposing end dropped is replaced."""
    server, port = await echo_server()
    net, exposer, connector = await two_nodes(kairos_network, side_pool=2)
    try:
        _RUNTIMES[id(exposer)].expose("echo", f"127.0.0.1:{port}")
        await net.wait_for(lambda: connector.ledger.get(BUCKET, f"{exposer.peer_id}/echo") is not None)
        services = _RUNTIMES[id(connector)]
        listen = int(services.connect("echo", "127.0.0.1:0")["listen"].rsplit(":", 1)[1])

        async def echo_once(payload: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", listen)
            writer.write(payload)
            writer.write_eof()
            try:
                return await asyncio.wait_for(reader.read(), 20)
            finally:
                writer.close()

        for index in range(6):
            assert await echo_once(b"ping %d" % index) == b"ping %d" % index
            await net.wait_for(lambda: services.pool.get(exposer.peer_id))  # back in the pool
        counted = _status(connector)
        assert counted["services_side_connections"] == 6
        assert counted["services_pooled_connections"] >= 5  # all but (at most) the first
        assert "services_stream_connections" not in counted
        await net.wait_for(lambda: len(services.pool[exposer.peer_id]) == sum(_RUNTIMES[id(exposer)].idle.values()))
        assert len(services.pool[exposer.peer_id]) <= 2
        # the exposing end drops its idle side connections (a restart, a timeout): the next
        # connection still gets through, over a new one
        for pooled in services.pool[exposer.peer_id]:
            pooled.side[1].transport.abort()
        assert await echo_once(b"after") == b"after"
    finally:
        server.close()


async def test_pool_requests_are_bounded_and_garbage_on_an_idle_side_connection_is_dropped(kairos_network):
    server, port = await echo_server()
    net, exposer, rogue = await two_nodes(kairos_network, side_pool=0)
    try:
        exposing, rogue_services = _RUNTIMES[id(exposer)], _RUNTIMES[id(rogue)]
        exposing.expose("echo", f"127.0.0.1:{port}")
        sides = [await rogue_services._pool_dial(exposer.peer_id) for _ in range(MAX_IDLE_PER_PEER)]
        assert all(side is not None for side in sides)
        await net.wait_for(lambda: exposing.idle[rogue.peer_id] == MAX_IDLE_PER_PEER)
        assert await rogue_services._pool_dial(exposer.peer_id) is None  # one more: refused
        assert _status(exposer)["services_rejected_requests"] == 1
        reader, writer, sealer, _ = sides[0]
        writer.write(sealer.seal(sealed.KIND_DATA, b"not a request"))  # sealed right, but no OPEN
        await net.wait_for(lambda: _status(exposer).get("services_dropped_malformed") == 1)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # and closed
        reader, writer, _, _ = sides[1]
        writer.write(b"\x00\x00\x00\x20\x04" + b"x" * 32)  # forged: does not open
        await net.wait_for(lambda: _status(exposer).get("services_dropped_malformed") == 2)
        await net.wait_for(lambda: exposing.idle[rogue.peer_id] == MAX_IDLE_PER_PEER - 2)
        for side in sides[2:]:
            side[1].close()
        await net.wait_for(lambda: not exposing.idle)
    finally:
        server.close()
