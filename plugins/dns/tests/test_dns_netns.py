"""Acceptance: three real ``kairos run`` nodes in namespaces with the VPN (tunvpn) and the DNS
plugin (``p2p.dns: true``, listening on 127.0.0.1:53 of each namespace). ``dig node2.kairos.`` on
node 1 answers node 2's VIP, the system resolver (the namespace's /etc/resolv.conf names
127.0.0.1) resolves it for ``ping``, which reaches node 2 over the VPN, and a name outside the
network is forwarded to a DNS server the test runs in node 3's namespace (the second nameserver
of that resolv.conf: the first, the node itself, is refused as a loop)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from dnstools import DIG, NEEDS_DIG

from kairos_testing.labnodes import LabNetwork
from kairos_testing.netlab import Lab, require_netns, unique_prefix

pytestmark = [pytest.mark.slow, pytest.mark.netns]

TOOLS = Path(__file__).with_name("dnstools.py")


@pytest.fixture(scope="module")
def dnslab(tmp_path_factory):
    reason = require_netns()
    if reason:
        pytest.skip(reason)
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    if DIG is None or shutil.which("ping") is None:
        pytest.skip(f"{NEEDS_DIG}, and ping (iputils-ping)")
    if not {"tunvpn", "dns"} <= {ep.name for ep in entry_points(group="kairos")}:
        pytest.skip("needs kairos-plugin-tunvpn installed")
    lab = Lab(unique_prefix("kd"), 3)
    etc_dirs: list[Path] = []
    network = None
    try:
        lab.start()
        for index in (1, 2, 3):
            # `ip netns exec` bind-mounts /etc/netns/<namespace>/resolv.conf over /etc/resolv.conf
            etc = Path("/etc/netns") / lab.namespace(index)
            etc.mkdir(parents=True, exist_ok=True)
            etc_dirs.append(etc)
            # node 2 points its resolver at itself (dns.configure_resolver): its file names only the upstream
            first = "" if index == 2 else "nameserver 127.0.0.1\n"
            (etc / "resolv.conf").write_text(f"{first}nameserver {lab.address(3)}\noptions timeout:2 attempts:1\n")
        upstream = lab.popen(3, [sys.executable, str(TOOLS), lab.address(3), "53"], stdout=subprocess.PIPE, text=True)
        assert upstream.stdout is not None and upstream.stdout.readline().strip() == "ready"
        network = LabNetwork(lab, tmp_path_factory.mktemp("dns"), autoload_plugins=True)
        disabled = sorted({ep.name for ep in entry_points(group="kairos")} - {"tunvpn", "dns"})
        extra = {
            "vpn": {"keepalive_interval": 0.5, "udp_timeout": 2.0},
            "plugins": {"disabled": disabled},
            "dns": {"listen": "127.0.0.1:53"},
        }
        nodes = [
            network.start(
                i, p2p={"disable_dht": True, "dns": True}, extra={**extra, "dns": {**extra["dns"], "configure_resolver": i == 2}}
            )
            for i in (1, 2, 3)
        ]
        for node in nodes:
            network.wait_up(node, timeout=120)
        yield lab, network, etc_dirs
    finally:
        if network is not None:
            network.close()
        lab.close()
        for etc in etc_dirs:
            shutil.rmtree(etc, ignore_errors=True)


def dig(lab: Lab, index: int, *args: str) -> str:
    done = lab.run(index, [DIG or "dig", "@127.0.0.1", "+tries=1", "+time=3", *args], timeout=30, text=True)
    return done.stdout


def vip_of(network: LabNetwork, index: int) -> str | None:
    node = network.nodes[index]
    try:
        bucket = node.client.request("GET", "/api/ledger/vpn")
        return bucket[node.peer_id]["vip"]
    except Exception:
        return None


def test_dig_and_the_system_resolver_give_a_member_s_vip_and_ping_reaches_it(dnslab):
    lab, network, _etc = dnslab
    network.wait_until(lambda: vip_of(network, 2) is not None, 90, "node 2's VIP claim")
    vip = vip_of(network, 2)
    for index, name in ((1, "lab2.kairos."), (3, "LAB2.kairos.")):
        network.wait_until(
            lambda: dig(lab, index, "+short", name).split() == [vip],  # noqa: B023 (polled here)
            60,
            f"node {index} answering {name} with {vip}",
        )
    # ping resolves through the system resolver (glibc, the namespace's resolv.conf) and crosses the VPN
    network.wait_until(
        lambda: lab.run(1, ["ping", "-c1", "-W2", "lab2.kairos."], timeout=30).returncode == 0,
        60,
        "ping lab2.kairos. from node 1",
    )
    done = lab.run(1, ["ping", "-c1", "-W2", "lab2.kairos."], timeout=30, text=True)
    assert f"({vip})" in done.stdout and " 0% packet loss" in done.stdout, done.stdout
    # getent: the system resolver gives the VIP too
    assert lab.run(1, ["getent", "hosts", "lab2.kairos."], timeout=30, text=True).stdout.split()[0] == vip


def test_a_forwarded_name_reaches_the_upstream_in_another_namespace(dnslab):
    lab, network, _etc = dnslab
    answer = dig(lab, 1, "+short", "www.up.example.").split()
    assert len(answer) == 1 and answer[0].startswith("192.0.2."), answer
    listing = network.nodes[1].client.request("GET", "/api/plugins/dns")
    assert listing["server"]["upstreams"] == [f"{lab.address(3)}:53"]
    assert listing["server"]["refused_upstreams"] == ["127.0.0.1:53"]
    status = network.nodes[1].status() or {}
    assert status["counters"]["dns_forwarded"] >= 1


def test_configure_resolver_points_the_host_at_the_node_and_restores_it_at_shutdown(dnslab):
    """Last in this module: it stops node 2."""
    lab, network, etc_dirs = dnslab
    resolv = etc_dirs[1] / "resolv.conf"  # node 2's /etc/resolv.conf (bind-mounted by ip netns exec)
    original = f"nameserver {lab.address(3)}\noptions timeout:2 attempts:1\n"
    text = resolv.read_text()
    assert "nameserver 127.0.0.1\n" in text and f"nameserver {lab.address(3)}" not in text
    assert "options timeout:2 attempts:1" in text
    listing = network.nodes[2].client.request("GET", "/api/plugins/dns")
    assert listing["server"]["upstreams"] == [f"{lab.address(3)}:53"]  # read before the file was rewritten
    # the system resolver of node 2's namespace now asks the node: a member's name and a forwarded one
    vip = vip_of(network, 1)
    assert lab.run(2, ["getent", "hosts", "lab1.kairos."], timeout=30, text=True).stdout.split()[:1] == [vip]
    forwarded = lab.run(2, ["getent", "hosts", "www.up.example."], timeout=30, text=True).stdout.split()
    assert forwarded and forwarded[0].startswith("192.0.2.")
    network.kill(2, signal.SIGTERM)
    network.nodes[2].process.wait(30)
    assert resolv.read_text() == original
