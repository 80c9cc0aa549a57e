"""Across NATs (issue #15): reachability verdicts, relay reservations, and admission over a relay.

Real ``kairos run`` processes in a :class:`~kairos_testing.netlab.NatLab`: a public node P and nodes
A and B each behind its own NAT router (port-preserving and symmetric), A and B bootstrapping
from P only, mDNS and the DHT off.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from kairos_testing.labnodes import LabNetwork
from kairos_testing.netlab import PORT_PRESERVING, PUBLIC, SYMMETRIC

netns = pytest.mark.netns


@pytest.fixture
def nat_network(lab_network):
    return lab_network(kinds=[PUBLIC, PORT_PRESERVING, SYMMETRIC])


def _p2p(bootstrap: list[str]) -> dict:
    return {"bootstrap_peers": bootstrap, "disable_mdns": True, "disable_dht": True}


def _nat(node) -> dict:
    status = node.status()
    return status["reachability"] if status else {}


@netns
def test_nated_nodes_are_admitted_to_each_other_through_the_public_relay(nat_network: LabNetwork) -> None:
    net = nat_network
    p = net.start(1, p2p=_p2p([]))
    p_id = net.wait_up(p)
    bootstrap = [net.multiaddr(1, p_id)]
    a, b = net.start(2, p2p=_p2p(bootstrap)), net.start(3, p2p=_p2p(bootstrap))
    a_id, b_id = net.wait_up(a), net.wait_up(b)

    net.wait_until(lambda: _nat(p).get("reachability") == "public", 60, "P public", tolerate=(KeyError,))
    for node in (a, b):
        net.wait_until(
            lambda: _nat(node).get("reachability") == "private",  # noqa: B023 (polled here)
            60,
            f"node {node.index} private",
            tolerate=(KeyError,),
        )
        # where P saw it come from: its router's WAN address, not its own LAN one
        observed = _nat(node)["observed"]
        assert observed and all(f"/ip4/{net.lab.public_address(node.index)}/" in o for o in observed), observed
        net.wait_until(lambda: p_id in _nat(node).get("relays", []), 60, f"node {node.index} reserved on P")  # noqa: B023 (polled here)

    # B's nodes entry, as A reads it: the verdict, and an address through P
    def b_entry_advertises_the_relay() -> bool:
        entry = a.client.request("GET", "/api/ledger/nodes").get(b_id)
        return entry["reachability"] == "private" and any(
            f"/p2p/{p_id}/p2p-circuit/p2p/{b_id}" in address for address in entry["addresses"]
        )

    net.wait_until(
        b_entry_advertises_the_relay,
        60,
        "B's entry advertising its relayed address",
        tolerate=(KeyError, TypeError, AttributeError),
    )
    net.wait_until(lambda: b_id in a.alive_peers() and a_id in b.alive_peers(), 90, "A and B see each other")
    net.wait_until(
        lambda: b_id in _nat(a).get("relayed_peers", []) and a_id in _nat(b).get("relayed_peers", []),
        90,
        "A and B admitted to each other over a relayed connection",
    )
    # and kairos status says so
    shown = subprocess.run(
        [sys.executable, "-m", "kairos_core", "status", "--socket", str(a.root / "api.sock")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"reachability: private (observed as /ip4/{net.lab.public_address(2)}/" in shown.stdout, shown.stdout
    assert f"relay:       {p_id}" in shown.stdout, shown.stdout
    counters = p.status()["counters"]
    assert counters.get("p2p_relay_circuits", 0) >= 1
    assert counters.get("p2p_relay_bytes", 0) > 0
