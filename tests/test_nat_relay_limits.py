"""Relay and dial-back limits (issue #15), with real hosts on loopback: refusals are counted, the relay stays up.

On loopback every host is publicly reachable; the reserved host is told it is private so that it
takes a reservation (what the dial-back decides in a NAT lab: tests/test_nat_relay.py).
"""

from __future__ import annotations

import asyncio

import pytest

from kairos_testing.hosts import until

from kairos_core.p2p import P2PError, RelayLimits
from kairos_core.p2p.relay import HOP_PROTOCOL


async def _relay_and_reserved(hosts, limits: RelayLimits):
    relay, reserved = await hosts.host(relay=limits), await hosts.host()
    await reserved.connect(relay.addresses()[0])
    await until(lambda: relay.reachability()["reachability"] == "public", "the relay public")
    await until(lambda: reserved.reachability()["reachability"] != "unknown", "the first verdict")
    reserved._reachability.state = "private"
    await until(lambda: reserved.reachability()["relays"] == [relay.peer_id], "a reservation")
    circuit = next(a for a in reserved.addresses() if "/p2p-circuit/" in a)
    return relay, reserved, circuit


async def test_circuits_per_peer_are_bounded_and_refusals_counted(hosts) -> None:
    relay, reserved, circuit = await _relay_and_reserved(hosts, RelayLimits(max_circuits=1))
    first, second = await hosts.host(), await hosts.host()
    assert await first.connect(circuit) == reserved.peer_id
    with pytest.raises(P2PError, match="too many circuits"):
        await second.connect(circuit)
    assert relay.counters["relay_refused"] == 1
    assert relay.counters["relay_circuits"] == 1
    assert first.is_admitted(reserved.peer_id) and not second.is_admitted(reserved.peer_id)


async def test_no_reservation_and_garbage_are_refused(hosts) -> None:
    relay, reserved, circuit = await _relay_and_reserved(hosts, RelayLimits())
    stranger_target = await hosts.host()
    dialler = await hosts.host()
    unreserved = circuit.rsplit("/p2p/", 1)[0] + f"/p2p/{stranger_target.peer_id}"
    with pytest.raises(P2PError, match="no reservation"):
        await dialler.connect(unreserved)
    assert relay.counters["relay_refused"] == 1
    stream = await dialler.open_stream(relay.peer_id, HOP_PROTOCOL)
    await stream.write(b"\xff\xff" + b"x" * 64)  # a frame longer than the cap
    await until(lambda: relay.counters["relay_bad_requests"] == 1, "the garbage counted")
    # the relay still serves
    assert await dialler.connect(circuit) == reserved.peer_id


async def test_a_circuit_is_cut_at_its_byte_budget(hosts) -> None:
    relay, reserved, circuit = await _relay_and_reserved(hosts, RelayLimits(max_bytes=64 * 1024))

    async def sink(stream) -> None:
        while await stream.read(65536):
            pass

    reserved.set_stream_handler("/test/sink", sink)
    dialler = await hosts.host()
    assert await dialler.connect(circuit) == reserved.peer_id
    stream = await dialler.open_stream(reserved.peer_id, "/test/sink")
    # the relay resets the circuit: which error a write then raises is the stream layer's business
    with pytest.raises(Exception):  # noqa: B017
        for _ in range(64):
            await stream.write(b"x" * 8192)
            await asyncio.sleep(0.01)
    await until(lambda: relay.counters["relay_circuits_over_bytes"] == 1, "the cut counted")
    await until(lambda: not dialler.is_admitted(reserved.peer_id), "the relayed connection closed")
    assert relay.reachability()["relay"]["circuits"] == 0


async def test_a_circuit_is_cut_at_its_duration(hosts) -> None:
    relay, reserved, circuit = await _relay_and_reserved(hosts, RelayLimits(max_duration=1.0))
    dialler = await hosts.host()
    assert await dialler.connect(circuit) == reserved.peer_id
    await until(lambda: relay.counters["relay_circuits_over_time"] == 1, "the cut counted")
    await until(lambda: not dialler.is_admitted(reserved.peer_id), "the relayed connection closed")


async def test_an_outsider_gets_no_relay_and_a_bad_dial_back_request_is_counted(hosts) -> None:
    from kairos_core.p2p import AdmissionError
    from kairos_core.p2p.reachability import REACH_PROTOCOL
    from kairos_core.token import generate_token

    relay, reserved, circuit = await _relay_and_reserved(hosts, RelayLimits())
    outsider = await hosts.host(token=generate_token())
    with pytest.raises((AdmissionError, P2PError)):
        await outsider.connect(circuit)  # it is not admitted by the relay: no hop stream for it
    assert relay.counters["relay_circuits"] == 0
    asker = await hosts.host()
    await asker.connect(relay.addresses()[0])
    stream = await asker.open_stream(relay.peer_id, REACH_PROTOCOL)
    await stream.write(b'\x00\x0c{"port": -1}')  # a port out of range
    await until(lambda: relay.counters["reach_bad_requests"] == 1, "the bad request counted")
    # and the relay still answers a good request of another peer
    other = await hosts.host()
    await other.connect(relay.addresses()[0])
    good = await other.open_stream(relay.peer_id, REACH_PROTOCOL)
    port = int(other.addresses()[0].split("/tcp/")[1].split("/")[0])
    body = ('{"port": %d}' % port).encode()
    await good.write(len(body).to_bytes(2, "big") + body)
    answer = await good.read(1024)
    assert b'"reachable":true' in answer, answer


async def test_a_relay_that_names_someone_else_gets_its_connection_closed(hosts, monkeypatch) -> None:
    # found in review: the reserved side trusted the relay's name for the peer it brought, before
    # noise proved who it was: the named peer was then treated as relayed, the real one as direct
    from kairos_core.p2p import relay as relay_module

    relay, reserved, circuit = await _relay_and_reserved(hosts, RelayLimits())
    dialler, bystander = await hosts.host(), await hosts.host()
    real_write = relay_module.write_frame

    async def lying_write(stream, message):
        if set(message) == {"peer"} and message["peer"] == dialler.peer_id:
            message = {"peer": bystander.peer_id}  # what the relay tells the reserved host
        await real_write(stream, message)

    monkeypatch.setattr(relay_module, "write_frame", lying_write)
    with pytest.raises(P2PError):
        await dialler.connect(circuit)
    await until(lambda: reserved._relay.counters["relay_source_mismatch"] == 1, "the mismatch counted")
    assert bystander.peer_id not in reserved._relay.relayed
    assert not reserved.is_admitted(dialler.peer_id)
