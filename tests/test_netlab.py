"""The namespace lab: reachability over the bridge, partitions, and cleanup in every case."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from kairos_testing.netlab import NEIGHBOUR_SYSCTL, Lab, cleanup_stale, fit_neighbour_table, list_namespaces, unique_prefix

netns = pytest.mark.netns


def _ping(lab: Lab, src: int, dst: int) -> bool:
    # Three tries: right after a heal the neighbour entry may still be FAILED and the first
    # echo is lost to address resolution; ping exits 0 when any reply came back.
    argv = ["ping", "-c", "3", "-i", "0.2", "-W", "1", lab.address(dst)]
    return lab.run(src, argv, timeout=10).returncode == 0


@pytest.fixture
def need_ping() -> None:
    if shutil.which("ping") is None:
        pytest.skip("the 'ping' command is missing (apt-get install iputils-ping)")


# --- no root needed ------------------------------------------------------------------------------
def test_names_and_addresses_follow_the_prefix() -> None:
    lab = Lab("ktnames1", nodes=3, subnet_octet=77)
    assert lab.namespaces == ["ktnames1-1", "ktnames1-2", "ktnames1-3"]
    assert lab.address(2) == "10.77.0.2"
    assert lab.address("ktnames1-3") == "10.77.0.3"
    assert lab.command(1, ["true"]) == ["ip", "netns", "exec", "ktnames1-1", "true"]
    with pytest.raises(IndexError):
        lab.namespace(4)
    with pytest.raises(KeyError):
        lab.namespace("other-1")


def test_unique_prefixes_embed_the_pid_and_differ() -> None:
    a, b = unique_prefix("kt"), unique_prefix("kt")
    assert a != b
    assert a.startswith(f"kt{os.getpid()}x")


@pytest.mark.parametrize("prefix", ["", "has space", "semi;colon", "x" * 25])
def test_unsafe_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError):
        Lab(prefix)


# --- real namespaces -----------------------------------------------------------------------------
@netns
def test_nodes_reach_each_other_across_the_bridge(netlab, need_ping) -> None:
    lab = netlab(3)
    assert _ping(lab, 1, 2)
    assert _ping(lab, 3, 1)
    # Each node sees only its own interface and loopback: the host's network is not in the lab.
    links = lab.run(1, ["ip", "-o", "link"]).stdout.decode()
    assert {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()} == {"lo", "eth0"}


def test_a_lab_makes_room_in_the_neighbour_table_for_every_pair_of_its_nodes(netlab) -> None:
    # One table for every namespace: 100 nodes overflowed the default 1,024 entries, and the last
    # to start could resolve nobody's address.
    lab = netlab(12)
    hard = int((NEIGHBOUR_SYSCTL / "gc_thresh3").read_text())
    assert hard >= lab.size * (lab.size - 1) + 1024
    assert int((NEIGHBOUR_SYSCTL / "gc_thresh2").read_text()) >= hard // 2
    fit_neighbour_table(10)  # a smaller lab never lowers it
    assert int((NEIGHBOUR_SYSCTL / "gc_thresh3").read_text()) == hard


def test_lab_interfaces_do_not_solicit_routers(netlab) -> None:
    """No router on a lab's links: their solicitations would be multicast noise on every node's
    interface counters, which the scale bench reads."""
    lab = netlab(2)
    for node in (1, 2):
        value = lab.run(node, ["sysctl", "-n", "net.ipv6.conf.eth0.router_solicitations"]).stdout.decode().strip()
        assert value == "0"


@netns
def test_multicast_crosses_the_bridge(netlab) -> None:
    lab = netlab(2)
    group, port = "224.0.0.251", 5399
    receiver = lab.popen(
        2, [sys.executable, "-c", _MCAST_RECEIVER, group, str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert receiver.stdout is not None
    assert receiver.stdout.readline().strip() == b"listening"
    sender = [sys.executable, "-c", _MCAST_SENDER, group, str(port)]
    for _ in range(20):  # datagrams may be sent before the bridge port forwards: resend
        lab.run(1, sender, check=True)
        try:
            out, _ = receiver.communicate(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            continue
    else:
        out = b""
    assert out.strip() == f"hello from {lab.address(1)}".encode()


@netns
def test_partition_blocks_and_heal_restores(netlab, need_ping) -> None:
    lab = netlab(3)
    assert _ping(lab, 1, 2)
    lab.partition([1], [2, 3])
    assert not _ping(lab, 1, 2)
    assert not _ping(lab, 3, 1)
    assert _ping(lab, 2, 3)  # inside one side, traffic still flows
    lab.heal()
    assert _ping(lab, 1, 2)
    assert _ping(lab, 3, 1)


@netns
def test_partition_rejects_overlapping_groups(netlab) -> None:
    lab = netlab(2)
    with pytest.raises(ValueError):
        lab.partition([1, 2], [2])


@netns
def test_exit_removes_namespaces_and_kills_processes(netns_unavailable) -> None:
    if netns_unavailable:
        pytest.skip(netns_unavailable)
    with Lab(unique_prefix(), nodes=2) as lab:
        names = [*lab.namespaces, lab.bridge_namespace]
        assert set(names) <= set(list_namespaces())
        sleeper = lab.popen(1, ["sleep", "600"])
        lab.partition([1], [2])
    assert sleeper.poll() is not None
    assert not set(names) & set(list_namespaces())


@netns
def test_exit_cleans_up_after_an_exception(netns_unavailable) -> None:
    if netns_unavailable:
        pytest.skip(netns_unavailable)
    names: list[str] = []
    with pytest.raises(RuntimeError, match="boom"):
        with Lab(unique_prefix(), nodes=2) as lab:
            names = [*lab.namespaces, lab.bridge_namespace]
            lab.popen(2, ["sleep", "600"])
            raise RuntimeError("boom")
    assert names
    assert not set(names) & set(list_namespaces())


@netns
async def test_async_context_and_spawn(netns_unavailable) -> None:
    if netns_unavailable:
        pytest.skip(netns_unavailable)
    import asyncio

    async with Lab(unique_prefix(), nodes=2) as lab:
        proc = await lab.spawn(2, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"], stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        assert lab.address(2) in out.decode()
        names = lab.namespaces
    assert not set(names) & set(list_namespaces())


@netns
def test_cleanup_stale_removes_only_dead_runs(netns_unavailable) -> None:
    if netns_unavailable:
        pytest.skip(netns_unavailable)
    dead = subprocess.Popen(["true"])
    dead.wait()
    base = f"ktstale{os.getpid() % 1000}q"
    stale, alive = f"{base}{dead.pid}x1-1", f"{base}{os.getpid()}x1-1"
    try:
        for name in (stale, alive):
            subprocess.run(["ip", "netns", "add", name], check=True)
        assert cleanup_stale(base) == [stale]
        present = set(list_namespaces())
        assert stale not in present and alive in present
        assert cleanup_stale(base, force=True) == [alive]
    finally:
        for name in (stale, alive):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


_MCAST_RECEIVER = """
import socket, struct, sys
group, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("", port))
s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton("0.0.0.0")))
print("listening", flush=True)
data, addr = s.recvfrom(100)
print(data.decode(), "from", addr[0], flush=True)
"""

_MCAST_SENDER = """
import socket, sys
group, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"hello", (group, port))
"""
