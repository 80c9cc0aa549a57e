"""Multiaddr text read with py-multiaddr (kairos_core.multiaddrs), and the readers built on it.

Addresses come from peers: garbage gives None, never an exception, and a relayed address names
its target last.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_core import multiaddrs
from kairos_core.discovery.txt import usable_multiaddr
from kairos_core.identity import Identity
from kairos_core.p2p.addresses import expand_wildcard, port_in_use
from kairos_core.plugin import multiaddr_ip
from kairos_plugin_k3s.addresses import own_address
from kairos_plugin_tunvpn.vpn import udp_host

PEER = Identity.generate().peer_id
RELAY = Identity.generate().peer_id


def test_components_of_a_multiaddr():
    assert multiaddrs.components(f"/ip4/10.0.0.5/udp/4001/quic-v1/p2p/{PEER}") == [
        ("ip4", "10.0.0.5"),
        ("udp", "4001"),
        ("quic-v1", None),
        ("p2p", PEER),
    ]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ip4/1.2.3.4",
        "/ip4/999.1.1.1/tcp/1",
        "/ip4/1.2.3.4/tcp/x",
        "/ip4/1.2.3.4/tcp/70000",
        "/ip4/::1/tcp/1",
        "/ip4/1.2.3.4/tcp",
        "/nosuchprotocol/1",
        "/ip4/1.2.3.4/tcp/1/p2p/notapeer",
        "/" + "a" * 5000,
        None,
        42,
        b"/ip4/1.2.3.4",
    ],
)
def test_what_is_not_a_multiaddr_reads_as_nothing(text):
    assert multiaddrs.components(text) is None
    assert multiaddrs.peer_id(text) is None and multiaddrs.host_ip(text) is None and multiaddrs.tcp_port(text) is None
    assert not multiaddrs.is_concrete(text) and multiaddr_ip(text) is None


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="/ip46tcudqw0123456789.:abcdefp2-", max_size=60))
def test_random_text_never_raises(text):
    parts = multiaddrs.components(text)
    assert parts is None or all(isinstance(name, str) for name, _ in parts)
    multiaddrs.peer_id(text), multiaddrs.host_ip(text), multiaddrs.tcp_port(text), multiaddrs.is_concrete(text)


def test_a_relayed_address_reaches_its_last_peer():
    assert multiaddrs.peer_id(f"/ip4/1.2.3.4/tcp/1/p2p/{RELAY}/p2p-circuit/p2p/{PEER}") == PEER
    assert multiaddrs.peer_id(f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}") == PEER
    assert multiaddrs.peer_id("/ip4/1.2.3.4/tcp/1") is None


def test_host_ip_and_port():
    assert multiaddrs.host_ip("/ip6/fd00::1/tcp/9") == ipaddress.IPv6Address("fd00::1")
    assert multiaddrs.host_ip("/dns4/node.lan/tcp/9") is None
    assert multiaddrs.tcp_port("/ip4/1.2.3.4/tcp/4001/ws") == 4001 and multiaddrs.tcp_port("/ip4/1.2.3.4/udp/1") is None


@pytest.mark.parametrize(
    ("text", "concrete"),
    [
        ("/ip4/0.0.0.0/tcp/1", False),
        ("/ip6/::/tcp/1", False),
        ("/ip6/0:0:0:0:0:0:0:0/tcp/1", False),
        ("/ip4/10.0.0.1/tcp/1", True),
        ("/dns4/a.b/tcp/1/ws", True),
    ],
)
def test_wildcards_are_not_concrete(text, concrete):
    assert multiaddrs.is_concrete(text) is concrete


def test_with_host_keeps_the_rest():
    assert multiaddrs.with_host(f"/ip4/0.0.0.0/tcp/1/p2p/{PEER}", "10.0.0.5") == f"/ip4/10.0.0.5/tcp/1/p2p/{PEER}"
    assert multiaddrs.with_host("/ip6/::/udp/2/quic-v1", "fd00::2") == "/ip6/fd00::2/udp/2/quic-v1"
    with pytest.raises(ValueError):
        multiaddrs.with_host("/dns4/a.b/tcp/1", "10.0.0.5")


def test_expand_wildcard_gives_concrete_addresses_and_leaves_others_alone():
    expanded = expand_wildcard("/ip4/0.0.0.0/tcp/4001")
    assert expanded and all(multiaddrs.is_concrete(a) and multiaddrs.tcp_port(a) == 4001 for a in expanded)
    assert "/ip4/127.0.0.1/tcp/4001" in expanded
    assert expand_wildcard("/ip4/10.9.9.9/tcp/1") == ["/ip4/10.9.9.9/tcp/1"]
    assert expand_wildcard("garbage") == ["garbage"]


def test_port_in_use_sees_a_bound_port():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert port_in_use(f"/ip4/127.0.0.1/tcp/{port}")
    assert not port_in_use("/ip4/127.0.0.1/tcp/0") and not port_in_use("/ip4/127.0.0.1/udp/5") and not port_in_use("x")


def test_the_plugins_read_member_addresses_through_the_api():
    entry = {
        "addresses": [
            "junk",
            "/ip4/0.0.0.0/tcp/1",
            "/ip4/127.0.0.1/tcp/1",
            "/ip6/fd00::7/tcp/1",
            "/ip4/10.1.0.9/tcp/1",
            "/ip4/192.0.2.7/tcp/1",
            "/ip4/999.0.0.1/tcp/1",
        ]
    }
    # tunvpn: an IPv4 address outside the VPN itself, loopback last
    assert udp_host(entry, ipaddress.IPv4Network("10.1.0.0/24")) == "192.0.2.7"
    assert udp_host({"addresses": ["/ip4/127.0.0.1/tcp/1"]}, ipaddress.IPv4Network("10.1.0.0/24")) == "127.0.0.1"
    assert udp_host({"addresses": ["nonsense", 5]}, ipaddress.IPv4Network("10.1.0.0/24")) is None
    # k3s: a routable IPv4 address first
    assert own_address(entry["addresses"]) == "10.1.0.9"
    assert own_address(["/ip6/fd00::7/tcp/1", "/ip4/127.0.0.1/tcp/1"]) == "fd00::7"
    assert own_address(["junk"]) is None


def test_the_mdns_codec_takes_only_addresses_that_parse():
    assert usable_multiaddr(f"/ip4/10.0.0.1/tcp/1/p2p/{PEER}", PEER)
    assert not usable_multiaddr(f"/ip4/10.0.0.1/tcp/1/p2p/{RELAY}", PEER)  # names another peer
    assert not usable_multiaddr("/nosuchprotocol/1") and not usable_multiaddr("/ip4/999.1.1.1/tcp/1")
