"""The hole punch's own checks (issue #15): what a peer's request may hold, and who gets an answer.

The punch itself, through real NAT routers, is tests/test_nat_holepunch.py; here real hosts on
loopback, where a relayed connection can be made (the reserved host told it is private) but no
punch is tried: a loopback address is nothing another machine could connect to.
"""

from __future__ import annotations

import contextlib

import pytest

from kairos_testing.hosts import until

from kairos_core.p2p import P2PError, RelayLimits
from kairos_core.p2p.frames import write_frame
from kairos_core.p2p.holepunch import HOLEPUNCH_PROTOCOL, endpoint, observed_ip


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ({"ip": "198.51.100.7", "port": 4001}, ("198.51.100.7", 4001)),
        ({"ip": "2001:db8::1", "port": 1}, ("2001:db8::1", 1)),
        ({"ip": "127.0.0.1", "port": 4001}, None),  # loopback: the asker's own machine
        ({"ip": "0.0.0.0", "port": 4001}, None),
        ({"ip": "224.0.0.251", "port": 5353}, None),
        ({"ip": "198.51.100.7", "port": 0}, None),
        ({"ip": "198.51.100.7", "port": 65536}, None),
        ({"ip": "198.51.100.7", "port": True}, None),
        ({"ip": "198.51.100.7", "port": "4001"}, None),
        ({"ip": "not an ip", "port": 4001}, None),
        ({"ip": "1" * 100, "port": 4001}, None),
        ({"ip": None}, None),
        (["198.51.100.7", 4001], None),
    ],
)
def test_a_peers_endpoint_must_be_one_another_machine_can_reach(message, expected) -> None:
    assert endpoint(message) == expected


def test_the_observed_ip_is_the_first_usable_one() -> None:
    assert observed_ip(["/ip4/127.0.0.1/tcp/5", "/ip4/198.51.100.2/tcp/44788"]) == "198.51.100.2"
    assert observed_ip(["/ip6/2001:db8::2/tcp/9"]) == "2001:db8::2"
    assert observed_ip(["/ip4/127.0.0.1/tcp/5", "/dns4/example.org/tcp/1", "garbage"]) is None
    assert observed_ip([]) is None


async def _ask(host, peer: str, frame: dict) -> None:
    """Send one request. A refusal resets the stream as soon as the protocol is agreed: the reset
    can reach the asker before the agreement does (the open fails) or meet the write. Either way
    the responder's counters are what the test reads."""
    with contextlib.suppress(P2PError):
        stream = await host.open_stream(peer, HOLEPUNCH_PROTOCOL)
        await write_frame(stream, frame)


async def _reserved_on_a_relay(hosts):
    """A relay, and a host it holds a reservation for (told it is private); and that host's
    relayed address."""
    relay, reserved = await hosts.host(relay=RelayLimits()), await hosts.host()
    await reserved.connect(relay.addresses()[0])
    await until(lambda: reserved.reachability()["reachability"] != "unknown", "the first verdict")
    reserved._reachability.state = "private"
    await until(lambda: reserved.reachability()["relays"] == [relay.peer_id], "a reservation")
    circuit = next(a for a in reserved.addresses() if "/p2p-circuit/" in a)
    return relay, reserved, circuit


async def test_only_a_relayed_peer_is_answered_and_garbage_is_counted(hosts) -> None:
    relay, reserved, circuit = await _reserved_on_a_relay(hosts)

    # the relay is connected directly: no punch for it
    await _ask(relay, reserved.peer_id, {"ip": "198.51.100.7", "port": 4001})
    await until(lambda: reserved.counters["holepunch_refused"] == 1, "the direct peer refused")

    dialler, other = await hosts.host(), await hosts.host()
    for host in (dialler, other):
        assert await host.connect(circuit) == reserved.peer_id
        assert reserved.peer_id in host.reachability()["relayed_peers"]
    # a relayed peer that names its own machine; asking again at once is refused (one answer per
    # ANSWER_INTERVAL); another relayed peer's oversized frame
    stream = await dialler.open_stream(reserved.peer_id, HOLEPUNCH_PROTOCOL)
    await write_frame(stream, {"ip": "127.0.0.1", "port": 4001})
    await until(lambda: reserved.counters["holepunch_bad_requests"] == 1, "the loopback endpoint dropped")
    await _ask(dialler, reserved.peer_id, {"ip": "198.51.100.7", "port": 4001})
    await until(lambda: reserved.counters["holepunch_refused"] == 2, "the second request refused")
    stream = await other.open_stream(reserved.peer_id, HOLEPUNCH_PROTOCOL)
    await stream.write(b"\xff\xff" + b"x" * 64)
    await until(lambda: reserved.counters["holepunch_bad_requests"] == 2, "the oversized frame dropped")
    # nothing was tried, and the relayed connections still carry the pairs
    assert reserved.counters["holepunch_attempts"] == 0
    for host in (dialler, other):
        assert host.counters["holepunch_attempts"] == 0
        assert host.is_admitted(reserved.peer_id) and reserved.peer_id in host.reachability()["relayed_peers"]


async def _relayed_pair(hosts):
    """A relay, a host reserved on it, and a dialler connected to that host through the relay."""
    relay, reserved, circuit = await _reserved_on_a_relay(hosts)
    dialler = await hosts.host()
    assert await dialler.connect(circuit) == reserved.peer_id
    return relay, reserved, dialler


async def test_the_relayed_mark_follows_the_connections(hosts) -> None:
    # a peer marked relayed on a direct connection (a punch's closing exchange lost on one end):
    # the sweep clears the mark, and with no punch behind the connection the link is direct
    a, b = await hosts.host(), await hosts.host()
    await a.connect(b.addresses()[0])
    a._relay.relayed.add(b.peer_id)
    assert a.links()[b.peer_id]["transport"] == "relayed"
    await until(lambda: a.links()[b.peer_id]["transport"] == "direct", "the relayed mark cleared", timeout=15)
    assert a.counters["relayed_marks_cleared"] == 1
    assert a.is_admitted(b.peer_id) and b.is_admitted(a.peer_id)  # nothing was closed

    # a peer on relayed connections only, marked otherwise (a punched connection trimmed):
    # marked relayed again, on both ends the dialler's view is what carries the link
    _, reserved, dialler = await _relayed_pair(hosts)
    dialler._relay.relayed.discard(reserved.peer_id)
    dialler._punched.add(reserved.peer_id)
    assert dialler.links()[reserved.peer_id]["transport"] == "punched"
    await until(lambda: dialler.links()[reserved.peer_id]["transport"] == "relayed", "the relayed mark restored", timeout=15)
    assert dialler.counters["relayed_marks_restored"] == 1
    assert reserved.peer_id in dialler.reachability()["relayed_peers"]
    assert dialler.counters["relayed_marks_cleared"] == 0 and reserved.counters["relayed_marks_restored"] == 0


async def test_no_relayed_connection_is_made_beside_a_direct_one(hosts) -> None:
    relay, reserved, _ = await _reserved_on_a_relay(hosts)
    dialler = await hosts.host()
    await dialler.connect(next(a for a in reserved.addresses() if "/p2p-circuit/" not in a))
    relay_address = relay.addresses()[0]

    async def dial_through_the_relay() -> None:
        await dialler._relay.dial(relay_address, relay.peer_id, reserved.peer_id, dialler._connect_relay)

    # (libp2p's per-peer trim spares the newest connection: a relayed one could replace the direct)
    with pytest.raises(P2PError, match="directly already"):
        await dialler._bridge.call(dial_through_the_relay)
    assert dialler.links()[reserved.peer_id]["transport"] == "direct"
    assert reserved.peer_id not in dialler.reachability()["relayed_peers"]
    assert dialler.peer_id not in reserved.reachability()["relayed_peers"]
