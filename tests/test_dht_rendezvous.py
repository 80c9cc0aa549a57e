"""DHT rendezvous with three real hosts on loopback and a private bootstrap node only."""

from __future__ import annotations

import asyncio


from kairos_core.discovery.dht import DHTRendezvous, RoundPacing
from kairos_core.keys import KeySchedule
from kairos_testing.hosts import HostFactory
from kairos_testing import wait_until
from kairos_core.token import generate_token


async def test_two_peers_find_each_other_through_a_bootstrap_node(hosts: HostFactory) -> None:
    bootstrap = await hosts.host()
    b = await hosts.host()
    c = await hosts.host()
    found: dict[str, dict[str, list[str]]] = {b.peer_id: {}, c.peer_id: {}}
    rendezvous = []
    for host in (b, c):
        seen = found[host.peer_id]

        def record(peer: str, addrs: list[str], seen: dict[str, list[str]] = seen) -> None:
            seen[peer] = addrs

        rendezvous.append(DHTRendezvous(host, KeySchedule(hosts.token), record, [bootstrap.addresses()[0]], first_interval=0.2))
    try:
        for r in rendezvous:
            await r.start()
        await wait_until(lambda: c.peer_id in found[b.peer_id] and b.peer_id in found[c.peer_id], timeout=20)
    finally:
        for r in rendezvous:
            await r.stop()
    assert b.peer_id not in found[b.peer_id] and c.peer_id not in found[c.peer_id]
    # B and C knew only the bootstrap node; the addresses the DHT gave are dialable (the DHT
    # lookups themselves may already have connected them, through admission like any dial)
    assert await b.connect(found[b.peer_id][c.peer_id]) == c.peer_id
    assert all(addr.endswith(f"/p2p/{c.peer_id}") for addr in found[b.peer_id][c.peer_id])


async def test_another_network_is_not_found(hosts: HostFactory) -> None:
    bootstrap = await hosts.host()
    member = await hosts.host()
    outsider_token = generate_token()
    outsider = await hosts.host(token=outsider_token)
    found: list[str] = []
    mine = DHTRendezvous(
        member, KeySchedule(hosts.token), lambda p, a: found.append(p), [bootstrap.addresses()[0]], first_interval=0.2
    )
    theirs = DHTRendezvous(
        outsider, KeySchedule(outsider_token), lambda p, a: found.append(p), [bootstrap.addresses()[0]], first_interval=0.2
    )
    try:
        await mine.start()
        await theirs.start()
        await wait_until(lambda: mine.counters["rounds"] >= 3)
        await asyncio.sleep(0.5)
    finally:
        await mine.stop()
        await theirs.stop()
    # the outsider was refused by the bootstrap node, so it can neither announce nor look up
    assert found == []
    assert outsider.peer_id not in bootstrap.admitted_peers()
    assert bootstrap.counters["admission_failed"] >= 1


def test_pacing_backs_off_and_restarts_fast_on_a_new_window() -> None:
    pacing = RoundPacing(0.5, 30.0)
    delays = [pacing.next_delay(7) for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert pacing.next_delay(8) == 0.5
    assert pacing.next_delay(8) == 1.0


async def test_rounds_keep_running_after_a_failing_lookup(hosts: HostFactory) -> None:
    host = await hosts.host()
    rendezvous = DHTRendezvous(
        host, KeySchedule(hosts.token), lambda p, a: None, ["/ip4/127.0.0.1/tcp/1/p2p/" + host.peer_id], first_interval=0.05
    )
    await rendezvous.start()
    try:
        await host.stop()  # every provide and lookup now fails
        await wait_until(lambda: rendezvous.counters["rounds"] >= 3 and rendezvous.counters["errors"] >= 2)
    finally:
        await rendezvous.stop()
