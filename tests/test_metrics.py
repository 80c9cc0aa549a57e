"""Prometheus metrics: real nodes scraped on their unix socket and on a TCP listener, the
exposition parsed with prometheus_client's own parser; the plugin registry's rules."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kairos_core.errors import KairosError
from kairos_core.metrics import MAX_LABEL_SETS, MetricRegistry, metric_name, parse_listen
from kairos_core.plugin import hookimpl


class MeteredPlugin:
    """Declares a labelled gauge, a plain counter it counts through count(), and one left undeclared."""

    @hookimpl
    def kairos_startup(self, node):
        node.counter("metered_greetings", "Greetings this test plugin sent.")
        node.count("metered_greetings", 2)
        queue = node.gauge("metered_queue", "Items the test plugin holds, by kind.", labels=("kind",))
        queue.set(7, kind="plain")
        queue.set(1, kind="urgent")
        node.gauge("metered_level", "A gauge published through set_counters.")
        node.set_counters("metered", {"level": 5})
        node.count("metered_undeclared", 3)


async def scrape_unix(node) -> str:
    transport = httpx.AsyncHTTPTransport(uds=str(node.config.api_socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://kairos") as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(found: dict, name: str, **labels) -> float:
    family = found[name]
    for sample in family.samples:
        if sample.labels == labels and not sample.name.endswith("_created"):
            return sample.value
    raise AssertionError(f"no sample {name}{labels}: {family.samples}")


async def test_a_real_node_exports_every_counter_with_help_and_the_gauges(kairos_network):
    net = await kairos_network(2, plugins=[MeteredPlugin()])
    await net.fully_connected()
    node = net.nodes[0]
    node.ledger.set("things", "a", 1)
    node.ledger.set("things", "b", 2)
    before = node.status()["counters"]
    found = families(await scrape_unix(node))
    status = node.status()

    # every counter of kairos status is there, each with a HELP text (those kept before the scrape:
    # one that first appears after it, say the first ledger sync's, was not there to export)
    for name in before:
        if ":" in name or name.startswith("vpn_peers_"):
            continue  # labelled families, checked below
        family = found[metric_name(name)]  # the parser strips _total from a counter's family name
        assert family.documentation.strip(), name
        expected = "gauge" if name == "metered_level" else "counter"
        assert family.type == expected, name
    assert value(found, "kairos_members_alive") == 1
    assert value(found, "kairos_connections") == 1
    assert value(found, "kairos_ledger_entries", bucket="things") == 2
    assert value(found, "kairos_ledger_entries", bucket="nodes") == len(node.ledger.items("nodes"))
    # the sum over the host's per-protocol traffic counters (p2p_in_bytes:<protocol>)
    bytes_in = sum(v for k, v in before.items() if k.startswith("p2p_in_bytes:"))
    assert (
        bytes_in
        <= value(found, "kairos_p2p_bytes", direction="in")
        <= sum(v for k, v in status["counters"].items() if k.startswith("p2p_in_bytes:"))
    )
    leader = status["leader"]
    assert value(found, "kairos_leader_epoch") == (leader["epoch"] if leader else 0)
    assert value(found, "kairos_is_leader") == int(status["is_leader"])
    # the core's counters have their own words, not the placeholder
    assert "proved the network token" in found["kairos_p2p_admission_ok"].documentation
    # the plugin's declarations: help, kind, labels
    assert found["kairos_metered_greetings"].documentation == "Greetings this test plugin sent."
    assert value(found, "kairos_metered_greetings") == 2
    assert value(found, "kairos_metered_queue", kind="plain") == 7
    assert value(found, "kairos_metered_queue", kind="urgent") == 1
    assert found["kairos_metered_level"].type == "gauge" and value(found, "kairos_metered_level") == 5
    assert "without a description" in found["kairos_metered_undeclared"].documentation
    assert value(found, "kairos_metered_undeclared") == 3
    # a tombstone is not an entry; a bucket of tombstones only is no bucket
    node.ledger.delete("things", "a")
    assert value(families(await scrape_unix(node)), "kairos_ledger_entries", bucket="things") == 1
    node.ledger.delete("things", "b")
    assert "things" not in [s.labels["bucket"] for s in families(await scrape_unix(node))["kairos_ledger_entries"].samples]
    node.ledger.set("things", "a", 3)  # a tombstone overwritten by a value counts again
    assert node.ledger.bucket_sizes()["things"] == 1
    expected: dict = {}
    for entry in node.ledger.entries():
        if not entry.deleted:
            expected[entry.bucket] = expected.get(entry.bucket, 0) + 1
    assert node.ledger.bucket_sizes() == expected


async def test_the_tcp_listener_serves_metrics_and_nothing_else(kairos_network):
    net = await kairos_network(1, overrides={"api": {"metrics_listen": "127.0.0.1:0"}})
    node = net.nodes[0]
    host, port = node.metrics_server.metrics_address
    assert host == "127.0.0.1" and port > 0
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
        response = await client.get("/metrics")
        assert response.status_code == 200
        found = families(response.text)
        assert value(found, "kairos_members_alive") == 0
        # no status, ledger or writes over TCP: that listener has no authentication
        assert (await client.get("/api/status")).status_code == 404
        assert (await client.put("/api/ledger/b/k", content=b"1")).status_code == 404
        assert (await client.post("/metrics")).status_code == 405
    assert node.ledger.get("b", "k") is None
    await node.stop()
    with pytest.raises(OSError):  # the listener closed with the node
        await asyncio.open_connection(host, port)


async def test_a_bad_metrics_listen_is_one_clear_error(kairos_network):
    with pytest.raises(KairosError, match="api.metrics_listen"):
        await kairos_network(1, overrides={"api": {"metrics_listen": "localhost"}})


def test_parse_listen():
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    for bad in ("9464", "host:", ":9464", "h:99999", "h:x"):
        with pytest.raises(KairosError):
            parse_listen(bad)


def test_the_registry_refuses_conflicts_and_bounds_labels():
    store: dict = {}
    registry = MetricRegistry(store)
    counter = registry.counter("demo_sent", "Sent.")
    assert registry.counter("demo_sent", "Sent.") is counter  # declaring again is harmless
    counter.inc(2)
    assert store["demo_sent"] == 2 and counter.value() == 2  # the counter kairos status shows
    with pytest.raises(KairosError, match="declared already"):
        registry.gauge("demo_sent", "Sent.")
    with pytest.raises(KairosError, match="cannot go down"):
        counter.inc(-1)
    with pytest.raises(KairosError, match="HELP"):
        registry.counter("demo_nohelp", "  ")
    with pytest.raises(KairosError, match="the core's"):
        registry.counter("ledger_applied", "Mine now.")
    with pytest.raises(KairosError, match="name"):
        registry.gauge("Demo-Bad", "Bad name.")
    by_peer = registry.gauge("demo_by_peer", "Per peer.", labels=("peer",))
    with pytest.raises(KairosError, match="labels"):
        by_peer.set(1, path="udp")
    for n in range(MAX_LABEL_SETS):
        by_peer.set(n, peer=f"p{n}")
    by_peer.set(5, peer="p3")  # an existing combination may still change
    with pytest.raises(KairosError, match="combinations"):
        by_peer.set(1, peer="one-too-many")
    assert by_peer.value(peer="p3") == 5


async def test_the_metrics_listener_is_bounded_like_the_dashboards(kairos_network, monkeypatch):
    # found in review: the metrics listener had no connection cap, and a client sending one byte
    # a minute held a connection on either listener for as long as it liked
    from kairos_core import api

    monkeypatch.setattr(api, "TCP_REQUEST_DEADLINE", 1.0)
    net = await kairos_network(1, overrides={"api": {"metrics_listen": "127.0.0.1:0"}})
    node = net.nodes[0]
    host, port = node.metrics_server.metrics_address
    reader, writer = await asyncio.open_connection(host, port)

    async def trickle() -> None:  # a request head that never ends: one byte every 0.2 s, 8 s long
        with contextlib.suppress(ConnectionError):
            for byte in b"GET /metrics HTTP/1.1\r\nhost: x\r\nx-pad: 0123456"[:40]:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.2)

    trickling = asyncio.create_task(trickle())
    try:
        closed = await asyncio.wait_for(reader.read(), 20)
    except ConnectionResetError:  # closed with trickled bytes unread: the kernel answers them with a reset
        closed = b""
    assert closed == b"" and not trickling.done(), "a trickled request head kept its connection to the end"
    trickling.cancel()
    writer.close()

    idle = [await asyncio.open_connection(host, port) for _ in range(api.MAX_WEB_CONNECTIONS)]
    try:
        for _ in range(50):
            if node.metrics_server._web_connections == api.MAX_WEB_CONNECTIONS:
                break
            await asyncio.sleep(0.05)
        extra_reader, extra_writer = await asyncio.open_connection(host, port)
        answer = await asyncio.wait_for(extra_reader.read(), 10)
        extra_writer.close()
        assert answer.startswith(b"HTTP/1.1 503")
    finally:
        for _, idle_writer in idle:
            idle_writer.close()
