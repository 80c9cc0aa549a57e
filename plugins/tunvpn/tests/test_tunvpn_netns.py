"""Two forwarders in two network namespaces: real TUN devices, real UDP over a veth."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from kairos_testing.namespaces import SECRET_HEX, NamespacePair, netns_missing

pytestmark = pytest.mark.netns


@pytest.fixture
def lab():
    reason = netns_missing()
    if reason:
        pytest.skip(reason)
    if shutil.which("ping") is None:
        pytest.skip("needs ping (Debian package iputils-ping)")
    with NamespacePair() as pair:
        pair.start_forwarder("a")
        pair.start_forwarder("b")
        assert pair.wait_ping("a", pair.vip["b"]), "no ping through the VPN"
        yield pair


def test_ping_through_the_vpn(lab):
    result = lab.run("a", "ping", "-c", "5", "-i", "0.05", "-s", "1372", "-M", "do", lab.vip["b"])
    assert " 0% packet loss" in result.stdout
    counters = lab.counters("b")
    assert counters["rx_packets"] >= 5 and counters["drop_spoofed_source"] == 0


@pytest.mark.slow
def test_iperf3_tcp_through_the_vpn(lab):
    if shutil.which("iperf3") is None:
        pytest.skip("needs iperf3 (Debian package iperf3)")
    lab.popen("b", "iperf3", "-s", "-1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    result = lab.run("a", "iperf3", "-c", lab.vip["b"], "-t", "2", "-J", timeout=30)
    report = json.loads(result.stdout)
    received = report["end"]["sum_received"]["bytes"]
    assert received > 10_000_000
    counters = lab.counters("b")
    assert counters["rx_bytes"] >= received
    assert counters["coalesced_packets"] > 0  # TSO split on one side, coalesced on the other
    assert counters["drop_bad_tag"] == counters["drop_replay"] == counters["drop_malformed"] == 0


INJECTOR = r"""
import json, socket, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from kairos_plugin_tunvpn.crypto import SessionKeys
from kairos_plugin_tunvpn.dataplane import WIRE_HEADER
sys.path.insert(0, sys.argv[2])
from tunvpn_packets import icmp_echo
cfg = json.loads(sys.argv[1])
def craft(keys, counter, packet):
    header = WIRE_HEADER.pack(1, 0, 0, 0, keys.send_key_id, counter)
    return header + AESGCM(keys.send_key).encrypt(header[4:], packet, header)
a_keys = SessionKeys.derive(bytes.fromhex(cfg["secret"]), "a", "b")
src, dst = bytes(map(int, cfg["vip_a"].split("."))), bytes(map(int, cfg["vip_b"].split(".")))
target = (cfg["target"], cfg["port"])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((cfg["source"], 0))
if cfg["case"] == "spoof":
    s.sendto(craft(a_keys, 1 << 40, bytes(icmp_echo(src=bytes([10, 9, 9, 9]), dst=dst))), target)
elif cfg["case"] == "replay":
    datagram = craft(a_keys, 1 << 41, bytes(icmp_echo(src=src, dst=dst)))
    s.sendto(datagram, target)
    s.sendto(datagram, target)
elif cfg["case"] == "unknown":
    stranger = SessionKeys.derive(b"not-the-secret-at-all-32-bytes!!", "a", "b")
    s.sendto(craft(stranger, 0, bytes(icmp_echo(src=src, dst=dst))), target)
"""


def inject(lab: NamespacePair, case: str, source: str) -> None:
    config = {
        "case": case,
        "secret": SECRET_HEX,
        "vip_a": lab.vip["a"],
        "vip_b": lab.vip["b"],
        "target": lab.underlay["b"],
        "port": 5555,
        "source": source,
    }
    result = lab.run("a", sys.executable, "-c", INJECTOR, json.dumps(config), os.path.dirname(__file__))
    assert result.returncode == 0, result.stderr


def wait_counter(lab: NamespacePair, name: str, value: int) -> dict:
    deadline = time.monotonic() + 5
    while True:
        counters = lab.counters("b")
        if counters[name] >= value or time.monotonic() > deadline:
            return counters


def test_spoofed_inner_source_is_dropped(lab):
    before = lab.counters("b")
    inject(lab, "spoof", lab.underlay["a"])
    after = wait_counter(lab, "drop_spoofed_source", 1)
    assert after["drop_spoofed_source"] == 1
    assert after["rx_packets"] == before["rx_packets"]


def test_replayed_datagram_is_dropped(lab):
    before = lab.counters("b")
    inject(lab, "replay", lab.underlay["a"])
    after = wait_counter(lab, "drop_replay", 1)
    assert after["drop_replay"] == 1
    assert after["rx_packets"] == before["rx_packets"] + 1


def test_datagram_from_an_unknown_endpoint_is_dropped(lab):
    stranger = lab.underlay["a"].rsplit(".", 1)[0] + ".3"
    lab.ip("-n", lab.ns["a"], "addr", "add", f"{stranger}/24", "dev", "veth-a")
    before = lab.counters("b")
    inject(lab, "unknown", stranger)
    after = wait_counter(lab, "drop_unknown_peer", 1)
    assert after["drop_unknown_peer"] == 1
    assert after["rx_packets"] == before["rx_packets"]
    assert lab.wait_ping("a", lab.vip["b"])  # the real peer is unaffected


def test_tun_device_is_configured_and_removed_on_close():
    reason = netns_missing()
    if reason:
        pytest.skip(reason)
    with NamespacePair() as pair:
        script = (
            "from kairos_plugin_tunvpn.tun import TunDevice; import subprocess;"
            "t = TunDevice.create('ktest0', address='10.55.0.1/24', mtu=1400, routes=['10.56.0.0/16']);"
            "print(subprocess.run(['ip', '-d', 'link', 'show', 'ktest0'], capture_output=True, text=True).stdout);"
            "print(subprocess.run(['ip', 'route'], capture_output=True, text=True).stdout);"
            "t.close();"
            "print('GONE' if subprocess.run(['ip', 'link', 'show', 'ktest0'], capture_output=True).returncode else 'LEFT')"
        )
        result = pair.run("a", sys.executable, "-c", script)
        assert result.returncode == 0, result.stderr
        assert "mtu 1400" in result.stdout and "UP" in result.stdout
        assert "gso_max_size" in result.stdout and "gso_max_size 65536" not in result.stdout
        assert "10.56.0.0/16 dev ktest0" in result.stdout and "10.55.0.0/24 dev ktest0" in result.stdout
        assert result.stdout.strip().endswith("GONE")


def test_moving_the_device_address_leaves_the_new_one_as_the_source_of_vpn_packets():
    """What a node does after losing its VIP in a conflict: the device must end up with the new
    address, and packets into the VPN must leave with it as their source (the peers drop any
    other source as spoofed)."""
    reason = netns_missing()
    if reason:
        pytest.skip(reason)
    with NamespacePair() as pair:
        script = (
            "import ipaddress, subprocess;"
            "from kairos_plugin_tunvpn.tun import TunDevice;"
            "from kairos_plugin_tunvpn.vpn import set_device_address;"
            "net = ipaddress.IPv4Network('10.55.0.0/24');"
            "old, new = ipaddress.IPv4Interface('10.55.0.1/24'), ipaddress.IPv4Interface('10.55.0.8/24');"
            "t = TunDevice.create('ktest0', address=old, mtu=1400, routes=[net]);"
            "show = lambda: print(subprocess.run(['ip', '-4', '-o', 'addr', 'show', 'dev', 'ktest0'],"
            " capture_output=True, text=True).stdout + subprocess.run(['ip', 'route', 'get', '10.55.0.9'],"
            " capture_output=True, text=True).stdout + '---');"
            "set_device_address('ktest0', old, new, net); show();"
            "set_device_address('ktest0', new, new, net); show();"  # the same move again changes nothing
            "t.close()"
        )
        result = pair.run("a", sys.executable, "-c", script)
        assert result.returncode == 0, result.stderr
        moved, again, _ = result.stdout.split("---")
        for output in (moved, again):
            assert "inet 10.55.0.8/24" in output and "10.55.0.1/" not in output
            assert "10.55.0.9 dev ktest0 src 10.55.0.8" in output
