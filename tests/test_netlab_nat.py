"""The NAT lab: routers that masquerade (port-preserving or symmetric) and drop unsolicited inbound.

Everything here is plain sockets between namespaces the test builds: what a node behind each NAT
kind can reach, what the internet sees of it, and what it cannot get through.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kairos_testing.netlab import PORT_PRESERVING, PUBLIC, SYMMETRIC, LabError, NatLab, list_namespaces, unique_prefix

netns = pytest.mark.netns

# Answers each datagram with the address it came from: what the internet sees of the sender.
_UDP_OBSERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(100)
    s.sendto(f"{peer[0]}:{peer[1]}".encode(), peer)
"""

# From one socket bound to a fixed port, asks each observer what it sees; prints them as JSON.
_UDP_ASKER = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(0.5)
seen = {}
for target in sys.argv[2:]:
    host, port = target.rsplit(":", 1)
    for _ in range(6):
        s.sendto(b"?", (host, int(port)))
        try:
            seen[target] = s.recvfrom(100)[0].decode()
            break
        except socket.timeout:
            pass
print(json.dumps(seen), flush=True)
"""

# Tries a TCP connect; prints "connected <what the server saw>" or "failed <reason>".
_TCP_CLIENT = """
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    print("connected", c.recv(100).decode(), flush=True)
except OSError as exc:
    print("failed", type(exc).__name__, flush=True)
"""

_TCP_SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(f"{peer[0]}:{peer[1]}".encode())
    c.close()
"""


def _serve(lab: NatLab, node: int, script: str, port: int) -> None:
    server = lab.popen(
        node, [sys.executable, "-c", script, lab.address(node), str(port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert server.stdout is not None and server.stdout.readline().strip() == b"ready"


def _tcp(lab: NatLab, src: int, host: str, port: int) -> str:
    return lab.run(src, [sys.executable, "-c", _TCP_CLIENT, host, str(port)], timeout=10).stdout.decode().strip()


def _ask(lab: NatLab, src: int, local_port: int, targets: list[str]) -> dict[str, str]:
    out = lab.run(src, [sys.executable, "-c", _UDP_ASKER, str(local_port), *targets], timeout=15).stdout
    return json.loads(out)


# --- no root needed ------------------------------------------------------------------------------
def test_addresses_follow_the_kinds() -> None:
    lab = NatLab([PUBLIC, PORT_PRESERVING, SYMMETRIC], "ktnatnames")
    assert lab.address(1) == lab.public_address(1) == "198.51.100.1"
    assert lab.address(2) == "192.168.2.2" and lab.public_address(2) == "198.51.100.2"
    assert lab.kind(3) == SYMMETRIC and lab.router(3) == "ktnatnames-r3"
    with pytest.raises(KeyError):
        lab.router(1)
    with pytest.raises(ValueError, match="unknown NAT kind"):
        NatLab(["cone"])


# --- real namespaces -----------------------------------------------------------------------------
@netns
@pytest.mark.parametrize("kind", [PORT_PRESERVING, SYMMETRIC])
def test_inside_reaches_out_and_the_internet_sees_the_router(netlab, kind: str) -> None:
    lab = netlab(kinds=[PUBLIC, kind])
    _serve(lab, 1, _TCP_SERVER, 7000)
    answer = _tcp(lab, 2, lab.address(1), 7000)
    assert answer.startswith("connected "), answer
    assert answer.split()[1].split(":")[0] == lab.public_address(2)  # masqueraded, not 192.168.2.2


@netns
@pytest.mark.parametrize("kind", [PORT_PRESERVING, SYMMETRIC])
def test_unsolicited_inbound_is_dropped(netlab, kind: str) -> None:
    lab = netlab(kinds=[PUBLIC, kind])
    _serve(lab, 2, _TCP_SERVER, 7001)
    assert _tcp(lab, 2, lab.address(2), 7001).startswith("connected")  # it listens, from inside
    # from the internet: neither the router's address nor the LAN one gets through
    assert _tcp(lab, 1, lab.public_address(2), 7001).startswith("failed")
    assert _tcp(lab, 1, lab.address(2), 7001).startswith("failed")


@netns
def test_port_preserving_keeps_the_port_and_symmetric_does_not(netlab) -> None:
    lab = netlab(kinds=[PUBLIC, PUBLIC, PORT_PRESERVING, SYMMETRIC])
    for node in (1, 2):
        _serve(lab, node, _UDP_OBSERVER, 7100)
    targets = [f"{lab.address(1)}:7100", f"{lab.address(2)}:7100"]
    cone = _ask(lab, 3, 40000, targets)
    assert set(cone.values()) == {f"{lab.public_address(3)}:40000"}, cone  # one mapping, port kept
    symmetric = _ask(lab, 4, 40000, targets)
    assert len(symmetric) == 2, symmetric
    assert {seen.split(":")[0] for seen in symmetric.values()} == {lab.public_address(4)}
    ports = {int(seen.split(":")[1]) for seen in symmetric.values()}
    assert len(ports) == 2, symmetric  # a new mapping per destination


# Makes a mapping towards an observer, then listens on that same socket for 3 s: prints what the
# observer saw, then every sender that got a datagram through the mapping.
_MAPPED_LISTENER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(0.5)
for _ in range(6):
    s.sendto(b"?", (sys.argv[2], int(sys.argv[3])))
    try:
        print(s.recvfrom(100)[0].decode(), flush=True)
        break
    except socket.timeout:
        pass
s.settimeout(3)
try:
    while True:
        data, peer = s.recvfrom(100)
        print("from", peer[0], flush=True)
except socket.timeout:
    print("done", flush=True)
"""


@netns
def test_a_mapping_only_answers_the_peer_it_was_made_for(netlab) -> None:
    # Filtering is address-dependent even where the port is kept: a third party that learnt the
    # mapping (as a hole puncher would) cannot use it until the inside sends to it too.
    lab = netlab(kinds=[PUBLIC, PUBLIC, PORT_PRESERVING])
    observer = lab.popen(
        1, [sys.executable, "-c", _UDP_OBSERVER, lab.address(1), "7200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert observer.stdout is not None and observer.stdout.readline().strip() == b"ready"
    inside = lab.popen(
        3,
        [sys.executable, "-c", _MAPPED_LISTENER, "40001", lab.address(1), "7200"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert inside.stdout is not None
    assert inside.stdout.readline().decode().strip() == f"{lab.public_address(3)}:40001"
    observer.kill()
    observer.wait()
    sender = (
        "import socket, sys, time; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('', 7200))\n"
        "for _ in range(5): s.sendto(b'in', (sys.argv[1], 40001)); time.sleep(0.1)"
    )
    # the third party sends from the observer's port, so only its address differs
    lab.run(2, [sys.executable, "-c", sender, lab.public_address(3)], check=True)
    # and the observer's own address and port still get in (the control)
    lab.run(1, [sys.executable, "-c", sender, lab.public_address(3)], check=True)
    out, _ = inside.communicate(timeout=10)
    lines = out.decode().split("\n")
    assert f"from {lab.address(2)}" not in lines, lines
    assert f"from {lab.address(1)}" in lines, lines  # the peer the mapping was made for still gets in


@netns
def test_close_removes_routers_too(netns_unavailable) -> None:
    if netns_unavailable:
        pytest.skip(netns_unavailable)
    with NatLab([PUBLIC, SYMMETRIC], unique_prefix()) as lab:
        names = [*lab.namespaces, lab.router(2), lab.bridge_namespace]
        assert set(names) <= set(list_namespaces())
        with pytest.raises(LabError):
            lab.partition([1], [2])
    assert not set(names) & set(list_namespaces())
