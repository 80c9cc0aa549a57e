"""The VPN's counters on GET /metrics: each with its own HELP text, peers by path as a gauge."""

from __future__ import annotations

import asyncio

import httpx
from prometheus_client.parser import text_string_to_metric_families

from kairos_plugin_tunvpn.metrics import COUNTER_HELP, GAUGE_HELP
from kairos_plugin_tunvpn.plugin import TunVPNPlugin
from tunvpn_nodes import vpn_config


async def scrape(node) -> dict:
    transport = httpx.AsyncHTTPTransport(uds=str(node.config.api_socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://kairos") as client:
        text = (await client.get("/metrics")).text
    return {family.name: family for family in text_string_to_metric_families(text)}


async def test_vpn_counters_are_described_and_peers_counted_by_path(network, fakes):
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    nodes = [await network.add_node(plugins=[plugin], overrides=vpn_config()) for _ in range(2)]
    vpns = [plugin.vpn_of(n) for n in nodes]
    await network.wait_for(lambda: all(len(v.links) == 1 for v in vpns), timeout=40)
    await asyncio.sleep(1.5)  # a few keepalives: the link proved UDP, the counters were published
    await network.wait_for(lambda: nodes[0].status()["counters"].get("vpn_peers_udp") == 1, timeout=30)
    found = await scrape(nodes[0])
    published = [name for name in nodes[0].status()["counters"] if name.startswith("vpn_")]
    assert published
    for name in published:
        if name.startswith("vpn_peers_"):
            continue
        family = found[f"kairos_{name}"]
        assert "without a description" not in family.documentation, name  # every VPN counter is declared
        short = name.removeprefix("vpn_")
        assert family.documentation == COUNTER_HELP.get(short, GAUGE_HELP.get(short)), name
    assert found["kairos_vpn_fastpath"].type == "gauge"
    paths = {sample.labels["path"]: sample.value for sample in found["kairos_vpn_peers"].samples}
    assert paths == {"udp": 1, "punched": 0, "relay": 0, "stream": 0}  # udp counts punched peers too
