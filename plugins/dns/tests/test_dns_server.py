"""The DNS server of real nodes (in this process, real libp2p hosts and ledgers on loopback)
queried by ``dig``: members' names, ledger records and their precedence, a forwarded name (to the
test's own upstream) and its cache, malformed and oversized packets, the rate limit, no loop."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import struct

import dns.message
import dns.rcode
import pytest
from dnstools import DIG, NEEDS_DIG, Upstream, dig, status

import kairos_plugin_dns.plugin as dns_plugin

pytestmark = pytest.mark.skipif(DIG is None, reason=NEEDS_DIG)


def port_of(node) -> int:
    server = dns_plugin.runtime(node).server
    assert server is not None, "the DNS server did not start"
    return server.address[1]


def claim(node, vip: str) -> None:
    """The VIP claim the tunvpn plugin would publish (its `vpn` bucket), written by the node itself."""
    node.ledger.set("vpn", node.peer_id, {"vip": vip, "udp_port": 1, "claimed": [1, 0], "static": False})


@pytest.fixture
def upstream():
    with Upstream() as server:
        yield server


async def test_members_records_wildcards_and_forwarded_names(kairos_network, upstream):
    net = await kairos_network(
        2,
        plugins=[dns_plugin],
        overrides={
            # Kairos's p2p.dns turns the server on (dns.enable declares that path)
            "p2p": {"dns": True},
            "dns": {"listen": "127.0.0.1:0", "forward": [f"127.0.0.1:{upstream.port}"]},
        },
    )
    await net.fully_connected()
    a, b = net.nodes
    port = port_of(a)
    claim(a, "10.1.0.1")
    claim(b, "10.1.0.2")
    a.ledger.set("dns", "web.kairos./A", {"values": ["10.9.0.1", "10.9.0.2"], "ttl": 30})
    a.ledger.set("dns", "*.apps.kairos./A", {"values": ["10.9.1.1"], "ttl": 30})
    b.ledger.set("dns", "*.b.apps.kairos./A", {"values": ["10.9.2.1"], "ttl": 30})
    b.ledger.set("dns", "pinned.b.apps.kairos./TXT", {"values": ["hello world"], "ttl": 30})
    b.ledger.set("dns", "out.example.org./A", {"values": ["198.51.100.7"], "ttl": 30})
    await net.wait_for(lambda: len(a.ledger.items("dns")) == 5 and len(a.ledger.items("vpn")) == 2)
    await asyncio.sleep(dns_plugin.ZONE_REFRESH)  # members' hostnames are read at most once a second

    assert (await dig(port, "+short", f"{b.hostname}.kairos.")).split() == ["10.1.0.2"]
    assert (await dig(port, "+short", f"{a.hostname.upper()}.KAIROS.")).split() == ["10.1.0.1"]
    assert sorted((await dig(port, "+short", "web.kairos.")).split()) == ["10.9.0.1", "10.9.0.2"]
    assert (await dig(port, "+short", "x.apps.kairos.")).split() == ["10.9.1.1"]
    assert (await dig(port, "+short", "deep.x.b.apps.kairos.")).split() == ["10.9.2.1"]  # longer wildcard
    assert (await dig(port, "+short", "pinned.b.apps.kairos.", "TXT")).strip() == '"hello world"'
    nodata = await dig(port, "pinned.b.apps.kairos.", "A")  # exact name, no A: NODATA, no fall-through
    assert status(nodata) == "NOERROR" and "ANSWER: 0" in nodata and " aa" in nodata
    assert status(await dig(port, "nobody.kairos.")) == "NXDOMAIN"
    assert not upstream.queries, "names of the domain were forwarded"
    assert (await dig(port, "+short", "out.example.org.")).split() == ["198.51.100.7"]
    assert (await dig(port, "+tcp", "+short", "web.kairos.")).split() != []

    first = await dig(port, "+short", "www.up.example.")
    again = await dig(port, "+short", "www.up.example.")
    assert first.split() == again.split() and first.split()[0].startswith("192.0.2.")
    assert upstream.queries.count("www.up.example.") == 1, "the second answer came from upstream, not the cache"
    assert status(await dig(port, "missing.example.")) == "NXDOMAIN"
    assert status(await dig(port, "missing.example.")) == "NXDOMAIN"
    assert upstream.queries.count("missing.example.") == 1, "the negative answer was not cached"
    assert a.counters["dns_cache_hits"] >= 2 and a.counters["dns_forwarded"] == 2

    # a member that leaves loses its name at the next refresh
    await b.stop()
    await net.wait_for(lambda: not a.members(), timeout=30)
    await asyncio.sleep(dns_plugin.ZONE_REFRESH)
    assert status(await dig(port, f"{b.hostname}.kairos.")) == "NXDOMAIN"


def _exchange(port: int, payload: bytes, timeout: float = 1.0, host: str = "127.0.0.1") -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(payload, (host, port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


async def test_malformed_oversized_and_reflected_packets_are_answered_formerr_or_dropped(kairos_network):
    net = await kairos_network(
        1, plugins=[dns_plugin], overrides={"dns": {"enable": True, "listen": "127.0.0.1:0", "resolv_conf": "/dev/null"}}
    )
    node = net.nodes[0]
    node.ledger.set("dns", "web.kairos./A", {"values": ["10.9.0.1"], "ttl": 30})
    port = port_of(node)
    garbage_question = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0) + b"\x3fabc"
    reply = await asyncio.to_thread(_exchange, port, garbage_question)
    assert reply is not None and reply[:2] == b"\xbe\xef" and reply[3] & 0x0F == dns.rcode.FORMERR
    assert await asyncio.to_thread(_exchange, port, b"\x01\x02\x03") is None
    assert await asyncio.to_thread(_exchange, port, b"\x00" * 5000) is None
    response = dns.message.make_response(dns.message.make_query("web.kairos.", "A")).to_wire()
    assert await asyncio.to_thread(_exchange, port, response) is None
    two_questions = struct.pack("!HHHHHH", 7, 0x0100, 2, 0, 0, 0) + dns.message.make_query("a.", "A").to_wire()[12:] * 2
    reply = await asyncio.to_thread(_exchange, port, two_questions)
    assert reply is not None and reply[3] & 0x0F == dns.rcode.FORMERR
    assert node.counters["dns_formerr"] == 2
    assert node.counters["dns_dropped_malformed"] == 2 and node.counters["dns_dropped_oversized"] == 1
    # no upstream: other names are refused; the node answers on
    assert status(await dig(port, "elsewhere.example.")) == "REFUSED"
    assert (await dig(port, "+short", "web.kairos.")).split() == ["10.9.0.1"]
    # a TCP message announced larger than max_query_size closes the connection, counted
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(struct.pack("!H", 60000) + b"x" * 100)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert node.counters["dns_dropped_oversized"] == 2


def _host_address() -> str | None:
    """A non-loopback IPv4 address of this host (queries from it to itself are not loopback)."""
    try:
        shown = subprocess.run(["ip", "-j", "-4", "addr", "show", "scope", "global"], capture_output=True, text=True, timeout=10)
        return next(a["local"] for link in json.loads(shown.stdout) for a in link.get("addr_info", []))
    except (OSError, ValueError, StopIteration, KeyError, subprocess.SubprocessError):
        return None


@pytest.mark.parametrize("limit_loopback", [False, True])
async def test_rate_limit_per_source_and_no_forward_to_itself(kairos_network, limit_loopback):
    settings = {"rate_limit": 1, "rate_burst": 5, "resolv_conf": "/dev/null", "rate_limit_loopback": limit_loopback}
    net = await kairos_network(1, plugins=[dns_plugin], overrides={"dns": {"enable": True, "listen": "0.0.0.0:0", **settings}})
    node = net.nodes[0]
    node.ledger.set("dns", "web.kairos./A", {"values": ["10.9.0.1"], "ttl": 30})
    port = port_of(node)
    query = dns.message.make_query("web.kairos.", "A").to_wire()
    # this host's programs on loopback: one bucket with rate_limit_loopback, else not limited
    answered = [await asyncio.to_thread(_exchange, port, query, 0.3) for _ in range(10)]
    if limit_loopback:
        assert sum(reply is not None for reply in answered) <= 6
        assert node.counters["dns_rate_limited"] >= 4
    else:
        assert all(reply is not None for reply in answered)
        assert node.counters.get("dns_rate_limited", 0) == 0
        # another source is limited all the same (here this host's own non-loopback address)
        host = _host_address()
        if host is None:
            pytest.skip("this host has no non-loopback IPv4 address to query from")
        answered = [await asyncio.to_thread(_exchange, port, query, 0.3, host) for _ in range(10)]
        assert sum(reply is not None for reply in answered) <= 6
        assert node.counters["dns_rate_limited"] >= 4

    # a server told to forward to its own address refuses that upstream instead of looping
    own = free_udp_port()
    net2 = await kairos_network(
        1,
        plugins=[dns_plugin],
        overrides={
            "dns": {"enable": True, "listen": f"127.0.0.1:{own}", "forward": [f"127.0.0.1:{own}", f"127.0.0.1:{own + 1}"]}
        },
    )
    server = dns_plugin.runtime(net2.nodes[0]).server
    assert server is not None and server.describe()["refused_upstreams"] == [f"127.0.0.1:{own}"]
    assert server.upstreams == [("127.0.0.1", own + 1)]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_records_count_against_the_open_buckets_quota(kairos_network):
    net = await kairos_network(1, plugins=[dns_plugin], overrides={"ledger": {"max_keys_per_owner": 2}})
    runtime = dns_plugin.runtime(net.nodes[0])
    runtime.add({"name": "a", "type": "A", "value": "10.0.0.1"})
    runtime.add({"name": "b", "type": "A", "value": "10.0.0.2"})
    with pytest.raises(dns_plugin.UsageError, match="quota"):
        runtime.add({"name": "c", "type": "A", "value": "10.0.0.3"})
    assert [row["name"] for row in runtime.records()] == ["a.kairos.", "b.kairos."]
