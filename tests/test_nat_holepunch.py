"""Across NATs (issue #15): a relayed libp2p connection replaced by a direct, hole-punched one.

Real ``kairos run`` processes in a :class:`~kairos_testing.netlab.NatLab`: a public node P, nodes
A and B each behind its own port-preserving NAT, C behind a symmetric one; all bootstrap from P
only (mDNS and the DHT off), so every pair of NATed nodes first meets through P's relay.
"""

from __future__ import annotations

import pytest

from kairos_testing.labnodes import LabNetwork
from kairos_testing.netlab import PORT_PRESERVING, PUBLIC, SYMMETRIC

netns = pytest.mark.netns

P, A, B, C = 1, 2, 3, 4


@pytest.fixture
def nat_network(lab_network):
    return lab_network(kinds=[PUBLIC, PORT_PRESERVING, PORT_PRESERVING, SYMMETRIC])


def _p2p(bootstrap: list[str]) -> dict:
    return {"bootstrap_peers": bootstrap, "disable_mdns": True, "disable_dht": True}


def _transport(node, peer_id: str) -> str | None:
    rows = {row["peer_id"]: row for row in node.client.request("GET", "/api/peers")}
    row = rows.get(peer_id)
    return row["transport"] if row else None


def _counter(node, name: str) -> int:
    status = node.status() or {}
    return int(status.get("counters", {}).get(f"p2p_{name}", 0))


def _tcp_peers(net: LabNetwork, index: int) -> set[str]:
    """The remote IPs of the established TCP connections inside node ``index``'s namespace."""
    shown = net.lab.run(index, ["ss", "-Htn", "state", "established"], check=True)
    return {line.split()[-1].rsplit(":", 1)[0] for line in shown.stdout.decode().splitlines() if line.strip()}


@netns
def test_nated_nodes_replace_the_relayed_connection_with_a_punched_one_where_the_nats_allow(nat_network: LabNetwork) -> None:
    net = nat_network
    p = net.start(P, p2p=_p2p([]))
    p_id = net.wait_up(p)
    bootstrap = [net.multiaddr(P, p_id)]
    nodes = {index: net.start(index, p2p=_p2p(bootstrap)) for index in (A, B, C)}
    ids = {index: net.wait_up(node) for index, node in nodes.items()}
    a, b, c = nodes[A], nodes[B], nodes[C]

    # A and B: port-preserving NATs on both sides — a TCP connection of their own, both ends
    net.wait_until(
        lambda: _transport(a, ids[B]) == "punched" and _transport(b, ids[A]) == "punched",
        90,
        "A and B on a punched connection",
        tolerate=(KeyError, TypeError, AttributeError),
    )
    assert _counter(a, "holepunch_successes") + _counter(b, "holepunch_successes") >= 2  # one per end
    # the kernel agrees: A holds a TCP connection to B's router, and B to A's
    assert net.lab.public_address(B) in _tcp_peers(net, A)
    assert net.lab.public_address(A) in _tcp_peers(net, B)
    # the relayed connection is gone: P carries no circuit between them any more
    net.wait_until(
        lambda: (
            ids[B] not in a.status()["reachability"]["relayed_peers"]
            and ids[A] not in b.status()["reachability"]["relayed_peers"]
        ),
        30,
        "A and B no longer relayed",
    )
    # everything above runs on the new connection: a write on A reaches B, and B's reaches A
    a.client.request("PUT", "/api/ledger/test/from-a", content='"a"')
    b.client.request("PUT", "/api/ledger/test/from-b", content='"b"')
    net.wait_until(
        lambda: (
            {"from-a", "from-b"} <= set(a.client.request("GET", "/api/ledger/test"))
            and {"from-a", "from-b"} <= set(b.client.request("GET", "/api/ledger/test"))
        ),
        30,
        "writes crossing between A and B",
        tolerate=(KeyError, TypeError),
    )
    assert ids[B] in a.alive_peers() and ids[A] in b.alive_peers()

    # C behind a symmetric NAT: the attempt fails, counted, and the relayed connection stays
    net.wait_until(
        lambda: (
            _counter(a, "holepunch_failed") + _counter(c, "holepunch_failed") >= 1
            and _counter(b, "holepunch_failed") + _counter(c, "holepunch_failed") >= 1
        ),
        90,
        "failed hole punches with C counted",
    )
    assert _transport(a, ids[C]) == "relayed" and _transport(c, ids[A]) == "relayed"
    assert net.lab.public_address(C) not in _tcp_peers(net, A)
    assert ids[C] in a.alive_peers() and ids[A] in c.alive_peers()
