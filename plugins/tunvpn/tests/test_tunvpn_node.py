"""The VPN on in-process nodes (LocalNetwork): VIP allocation through the ledger, key exchange,
packets over UDP and over the fallback stream — with socket pairs standing in for TUN devices."""

from __future__ import annotations

import asyncio
import ipaddress
import logging

import pytest

from kairos_core.errors import ConfigError
from kairos_testing import LocalNetwork
from kairos_plugin_tunvpn import addressing
from kairos_plugin_tunvpn import tun as tun_module
from kairos_plugin_tunvpn.addressing import holders, read_claims
from kairos_plugin_tunvpn.plugin import TunVPNPlugin
from tunvpn_nodes import vpn_config
from tunvpn_packets import icmp_echo


async def start_nodes(net: LocalNetwork, count: int, plugin: TunVPNPlugin, overrides: dict, concurrently: bool = False):
    if concurrently:
        # every node claims before it has heard of any other: the ledger must sort it out
        nodes = await asyncio.gather(*(net.add_node(plugins=[plugin], overrides=overrides, connect=False) for _ in range(count)))
        for i, node in enumerate(nodes):
            for other in nodes[i + 1 :]:
                await node.connect(other.host.addresses())
        return list(nodes)
    return [await net.add_node(plugins=[plugin], overrides=overrides) for _ in range(count)]


def converged_vips(nodes) -> dict[str, ipaddress.IPv4Address] | None:
    """The agreed peer → VIP map, or None while the nodes disagree or a VIP is shared."""
    views = []
    for node in nodes:
        claims = read_claims(node.ledger.items("vpn"), ipaddress.IPv4Network("10.1.0.0/28"))
        if len(claims) != len(nodes):
            return None
        if len({c.vip for c in claims.values()}) != len(claims):
            return None
        views.append({p: c.vip for p, c in claims.items()})
    return views[0] if all(v == views[0] for v in views) else None


async def test_ten_nodes_starting_together_get_distinct_vips(network, fakes):
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    nodes = await start_nodes(network, 10, plugin, vpn_config(cidr="10.1.0.0/28"), concurrently=True)
    await network.wait_for(lambda: converged_vips(nodes) is not None, timeout=30)
    vips = converged_vips(nodes)
    assert len(set(vips.values())) == 10
    for node in nodes:
        vpn = plugin.vpn_of(node)
        assert vpn.address.ip == vips[node.peer_id]  # the device follows the claim it holds
    for node in nodes:  # every node sees every other as the holder of its own claim
        assert {
            c.peer_id: vip
            for vip, c in holders(read_claims(node.ledger.items("vpn"), ipaddress.IPv4Network("10.1.0.0/28")).values()).items()
        } == vips


async def test_packets_cross_between_three_nodes_over_udp(network, fakes):
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    nodes = await start_nodes(network, 3, plugin, vpn_config())
    vpns = [plugin.vpn_of(n) for n in nodes]
    await network.wait_for(lambda: all(len(v.links) == 2 for v in vpns), timeout=20)
    await network.wait_for(lambda: all(v.plane.vip_of(p) == v.vips.get(p) for v in vpns for p in v.links), 10)
    a, b = vpns[0], vpns[1]
    ping = bytes(icmp_echo(src=a.address.ip.packed, dst=b.address.ip.packed, payload=b"hello b"))
    fakes.received(b.peer_id)
    fakes.inject(a.peer_id, ping)
    await network.wait_for(lambda: any(p == ping for p in fakes.received(b.peer_id)), timeout=5)
    await asyncio.sleep(1.5)  # a few keepalives: every link proved UDP
    assert all(link.path == "direct" for v in vpns for link in v.links.values())
    assert nodes[0].counters["vpn_rx_packets"] > 0
    # the status key that `kairos vpn status` reads
    assert set(nodes[0].ledger.get("vpn", f"{nodes[0].peer_id}/links")) == {nodes[1].peer_id, nodes[2].peer_id}


async def test_packets_cross_over_the_stream_when_udp_is_off(network, fakes):
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    nodes = await start_nodes(network, 2, plugin, vpn_config(udp=False))
    a, b = (plugin.vpn_of(n) for n in nodes)
    await network.wait_for(lambda: b.peer_id in a.links and a.peer_id in b.links, timeout=20)
    await network.wait_for(lambda: a.plane.vip_of(b.peer_id) == b.address.ip, timeout=10)
    ping = bytes(icmp_echo(src=a.address.ip.packed, dst=b.address.ip.packed, payload=b"via stream"))
    fakes.inject(a.peer_id, ping)
    await network.wait_for(lambda: any(p == ping for p in fakes.received(b.peer_id)), timeout=5)
    assert a.links[b.peer_id].path == "stream"
    assert a.counters["vpn_fallback_datagrams_sent"] >= 1
    assert b.counters["vpn_fallback_datagrams_delivered"] >= 1
    assert b.plane.counters["rx_packets"] >= 1


async def test_spoofed_inner_source_over_the_stream_is_dropped(network, fakes):
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    nodes = await start_nodes(network, 2, plugin, vpn_config(udp=False))
    a, b = (plugin.vpn_of(n) for n in nodes)
    await network.wait_for(
        lambda: a.plane.vip_of(b.peer_id) == b.address.ip and b.plane.vip_of(a.peer_id) == a.address.ip, timeout=20
    )
    forged = bytes(icmp_echo(src=bytes([10, 1, 0, 250]), dst=b.address.ip.packed, payload=b"forged"))
    fakes.inject(a.peer_id, forged)
    await network.wait_for(lambda: b.plane.counters["drop_spoofed_source"] >= 1, timeout=5)
    assert all(p != forged for p in fakes.received(b.peer_id))


async def test_a_departed_peer_loses_its_session(network, fakes):
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    nodes = await start_nodes(network, 2, plugin, vpn_config())
    a = plugin.vpn_of(nodes[0])
    await network.wait_for(lambda: nodes[1].peer_id in a.links, timeout=20)
    await nodes[1].stop()
    # a clean stop leaves the network: membership reports it left once disconnected and stale
    nodes[0].membership.ttl = 0.5
    await network.wait_for(lambda: nodes[1].peer_id not in a.links, timeout=15)
    assert not a.plane.has_peer(nodes[1].peer_id)


async def test_a_membership_flap_keeps_a_session_that_still_carries_packets(network, fakes, monkeypatch):
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    nodes = await start_nodes(network, 2, plugin, vpn_config())
    a, peer = plugin.vpn_of(nodes[0]), nodes[1].peer_id
    await network.wait_for(lambda: peer in a.links and a.plane.last_heard(peer) is not None, timeout=20)
    members = nodes[0].members
    monkeypatch.setattr(nodes[0], "members", lambda: {p: m for p, m in members().items() if p != peer})
    await asyncio.sleep(3.0)  # three udp_timeouts of vpn_config(): keepalives keep arriving
    assert peer in a.links and a.plane.has_peer(peer)
    await nodes[1].stop()  # now it falls silent too: the session goes
    await network.wait_for(lambda: peer not in a.links, timeout=15)
    assert not a.plane.has_peer(peer)


async def test_a_node_that_loses_its_vip_after_start_is_known_by_its_new_one(network, fakes, monkeypatch):
    """x and a both claim 10.1.0.1 at start. b meets x first (a session with x on that VIP), then
    a, whose claim is older: x moves, and both peers route to and accept x's new VIP without a
    restart, while x's old one is no longer x's."""
    monkeypatch.setattr(addressing, "candidate", lambda peer_id, net, attempt=0: addressing._nth_host(net, attempt * 7))
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    a = await network.add_node(plugins=[plugin], overrides=vpn_config(), connect=False, name="a")
    b = await network.add_node(plugins=[plugin], overrides=vpn_config(address="10.1.0.50/24"), connect=False, name="b")
    x = await network.add_node(plugins=[plugin], overrides=vpn_config(), connect=False, name="x")
    va, vb, vx = (plugin.vpn_of(n) for n in (a, b, x))
    contested = ipaddress.IPv4Address("10.1.0.1")
    assert va.address.ip == vx.address.ip == contested
    await x.connect(b.host.addresses())
    await network.wait_for(lambda: vb.plane.vip_of(x.peer_id) == contested, timeout=20)
    await a.connect(b.host.addresses())
    await a.connect(x.host.addresses())
    vpns = (va, vb, vx)
    await network.wait_for(lambda: vx.address.ip != contested and all(len(v.links) == 2 for v in vpns), timeout=30)
    assert va.address.ip == contested and vx.counters["vpn_address_moves"] == 1
    await network.wait_for(
        lambda: all(v.plane.vip_of(o.peer_id) == o.address.ip for v in vpns for o in vpns if o is not v), timeout=10
    )
    for peer in (va, vb):
        fakes.received(peer.peer_id)
        ping = bytes(icmp_echo(src=vx.address.ip.packed, dst=peer.address.ip.packed, payload=b"from the new VIP"))
        fakes.inject(x.peer_id, ping)
        await network.wait_for(lambda: ping in fakes.received(peer.peer_id), timeout=5)  # noqa: B023 (awaited here)
        stale = bytes(icmp_echo(src=contested.packed, dst=peer.address.ip.packed, payload=b"from the old VIP"))
        before = peer.plane.counters["drop_spoofed_source"]
        fakes.inject(x.peer_id, stale)
        await network.wait_for(lambda: peer.plane.counters["drop_spoofed_source"] == before + 1, timeout=5)  # noqa: B023 (awaited here)
    assert va.vips[x.peer_id] == vb.vips[x.peer_id] == vx.address.ip


async def test_static_address_is_used(network, fakes):
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    node = await network.add_node(plugins=[plugin], overrides=vpn_config(address="10.1.0.77/24"))
    vpn = plugin.vpn_of(node)
    assert str(vpn.address) == "10.1.0.77/24"
    assert node.ledger.get("vpn", node.peer_id)["static"] is True


async def test_without_a_tun_device_the_node_runs_on_with_one_error(network, monkeypatch, caplog):
    monkeypatch.setattr(tun_module, "TUN_PATH", "/nonexistent/net/tun")
    plugin = TunVPNPlugin()
    with caplog.at_level(logging.ERROR):
        node = await network.add_node(plugins=[plugin], overrides={"vpn": {}})
    assert plugin.vpn_of(node) is None
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == ["vpn disabled: TUN unavailable: /nonexistent/net/tun does not exist (load the tun module)"]
    assert node.status()["peer_id"] == node.peer_id  # the node itself is fine
    assert node.ledger.get("vpn", node.peer_id) is None  # no VIP claimed without a device


async def test_a_bad_vpn_section_is_refused_with_the_config(network):
    """Found when the config is read (``kairos config check`` shows it too), not by a node that
    then runs without its VPN."""
    with pytest.raises(ConfigError) as info:
        await network.add_node(plugins=[TunVPNPlugin()], overrides={"vpn": {"cidr": "10.1.0.0/24", "address": "192.168.9.9/24"}})
    assert info.value.problems == ["vpn.address: 192.168.9.9 is not a host address of vpn.cidr 10.1.0.0/24"]


async def test_an_edgevpn_address_without_cidr_sets_the_network_of_the_claimed_vip(network, fakes):
    # Kairos: p2p.vpn.env.ADDRESS with EdgeVPN's prefix and no vpn.cidr of ours
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    overrides = {**vpn_config(), "p2p": {"vpn": {"env": {"DHCP": "false", "ADDRESS": "10.2.0.5/24"}}}}
    node = await network.add_node(plugins=[plugin], overrides=overrides)
    vpn = plugin.vpn_of(node)
    assert str(vpn.address) == "10.2.0.5/24" and str(vpn.settings.network) == "10.2.0.0/24"
    claim = node.ledger.get("vpn", node.peer_id)
    assert claim["vip"].split("/")[0] == "10.2.0.5" and claim["static"] is True


async def test_packets_cross_between_members_that_are_not_neighbours(network, fakes):
    # A chain a - hub - b with a degree of one or two: a and b are members of each other only
    # through the hub's voucher; the key exchange dials the connection it needs.
    plugin = TunVPNPlugin(make_plane=fakes.make_plane, keepalive=fakes.keepalive)
    overrides = {**vpn_config(), "p2p": {"connections": {"low": 1, "high": 8}}}
    hub = await network.add_node(plugins=[plugin], overrides=overrides)
    a = await network.add_node(plugins=[plugin], overrides=overrides, connect=False)
    b = await network.add_node(plugins=[plugin], overrides=overrides, connect=False)
    await a.connect(hub.host.addresses())
    await b.connect(hub.host.addresses())
    await network.wait_for(lambda: b.peer_id in a.members() and a.peer_id in b.members(), timeout=20)
    va, vb = plugin.vpn_of(a), plugin.vpn_of(b)
    await network.wait_for(lambda: b.peer_id in va.links and a.peer_id in vb.links, timeout=20)
    await network.wait_for(lambda: va.plane.vip_of(b.peer_id) == va.vips.get(b.peer_id), 10)
    ping = bytes(icmp_echo(src=va.address.ip.packed, dst=vb.address.ip.packed, payload=b"across the hub"))
    fakes.received(b.peer_id)
    fakes.inject(a.peer_id, ping)
    await network.wait_for(lambda: any(p == ping for p in fakes.received(b.peer_id)), timeout=5)
