"""The dialler against made-up peers (issue #12, Medium 9c), with a fake dial and a fake clock."""

from __future__ import annotations

import asyncio
import random

from kairos_core.dialer import STRANGER_DIAL_BURST, STRANGER_DIAL_RATE, Dialer
from kairos_core.identity import Identity

THIRD_PARTY = "/ip4/192.0.2.7/tcp/4001"  # somebody else's server, advertised by every fake


class FakeNetwork:
    """A fake clock, and a dial function that records each dial and reaches only ``reachable``."""

    def __init__(self) -> None:
        self.now = 0.0
        self.dials: list[tuple[float, str, str]] = []
        self.reachable: set[str] = set()
        self.connected: set[str] = set()

    def clock(self) -> float:
        return self.now

    async def dial(self, addrs: list[str]) -> str:
        peer = addrs[0].rsplit("/p2p/", 1)[1]
        self.dials.append((self.now, peer, addrs[0].rsplit("/p2p/", 1)[0]))
        if peer not in self.reachable:
            raise OSError("connection refused")
        self.connected.add(peer)
        return peer


def _peers(n: int) -> list[str]:
    return [Identity.generate().peer_id for _ in range(n)]


async def _run(dialer: Dialer, net: FakeNetwork, seconds: float, step: float = 0.1, each_step=None) -> None:
    """Advance the fake clock in ``step``s, as the node does: a dialler round each step."""
    for _ in range(round(seconds / step)):
        net.now += step
        if each_step is not None:
            each_step()
        dialer.round({})
        for _ in range(3):  # let the dials of this step run to their end
            await asyncio.sleep(0)


async def test_fifty_made_up_peers_advertising_one_address_get_a_bounded_number_of_dials() -> None:
    """50 fake nodes advertising a third party's address made victims dial it 600 times in 30 s."""
    random.seed(12)
    net = FakeNetwork()
    dialer = Dialer(Identity.generate().peer_id, net.dial, net.connected.__contains__, clock=net.clock)
    fakes = _peers(50)

    def announce() -> None:  # discovery repeats its announcements, the fakes all the time
        for peer in fakes:
            dialer.discovered(peer, [THIRD_PARTY])

    announce()
    await _run(dialer, net, 30.0, each_step=announce)
    bound = STRANGER_DIAL_BURST + STRANGER_DIAL_RATE * 30.0
    assert len(net.dials) <= bound, len(net.dials)
    assert {address for _, _, address in net.dials} == {THIRD_PARTY}
    assert dialer.counters["dials_deferred"] > 0
    # per second too, not only on average: after the burst, no second holds more than the rate
    for second in range(5, 30):
        assert sum(1 for at, _, _ in net.dials if second <= at < second + 1) <= STRANGER_DIAL_RATE + 1


async def test_a_real_stranger_among_fakes_is_still_dialled_and_known_peers_are_never_held_back() -> None:
    random.seed(7)
    net = FakeNetwork()
    dialer = Dialer(Identity.generate().peer_id, net.dial, net.connected.__contains__, clock=net.clock)
    fakes = _peers(50)
    real, member = _peers(2)
    net.reachable |= {real, member}
    for peer in fakes:
        dialer.discovered(peer, [THIRD_PARTY])
    dialer.discovered(real, ["/ip4/127.0.0.1/tcp/4002"])
    await _run(dialer, net, 30.0)
    assert real in net.connected  # the strangers take turns at the bounded dials

    # a peer we were admitted to once is redialled at once, however many strangers wait
    dialer.admitted(member)
    await _run(dialer, net, 0.5)
    before = len(net.dials)
    for _ in range(STRANGER_DIAL_BURST):
        dialer.want(_peers(1)[0], [THIRD_PARTY])  # use up whatever the bucket holds
    assert dialer.want(member, ["/ip4/127.0.0.1/tcp/4003"])
    await _run(dialer, net, 0.1)
    assert member in net.connected and len(net.dials) > before


# --- the dial manager: the node's pass over connections, members and addresses -----------------


class FakeHost:
    """Admits whoever is dialled (if ``reachable``), records disconnects; addresses can change."""

    def __init__(self) -> None:
        self.peers: set[str] = set()
        self.reachable: set[str] = set()
        self.listen = ["/ip4/10.0.0.1/tcp/4001"]
        self.dialled: list[str] = []
        self.closed: list[str] = []
        self.address_reads = 0

    def addresses(self) -> list[str]:
        self.address_reads += 1
        return list(self.listen)

    def admitted_peers(self) -> set[str]:
        return set(self.peers)

    def is_admitted(self, peer_id: str) -> bool:
        return peer_id in self.peers

    async def connect(self, addrs: list[str]) -> str:
        peer = addrs[0].rsplit("/p2p/", 1)[1]
        self.dialled.append(peer)
        if peer not in self.reachable:
            raise OSError("unreachable")
        self.peers.add(peer)
        return peer

    async def disconnect(self, peer_id: str) -> None:
        self.closed.append(peer_id)
        self.peers.discard(peer_id)


def _dial_manager(members: list[str], **kwargs):
    from kairos_core.dial_manager import DialManager

    host, asked = FakeHost(), []
    host.reachable = set(members)

    def worth_dialling():
        asked.append(1)
        return members

    manager = DialManager(
        Identity.generate().peer_id,
        host,
        worth_dialling,
        lambda peer: [f"/ip4/10.0.0.{members.index(peer) + 2}/tcp/4001"],
        **kwargs,
    )
    return manager, host, asked


async def _passes(manager, n: int) -> None:
    for _ in range(n):
        manager.round()
        for _ in range(5):
            await asyncio.sleep(0)


async def test_below_low_the_manager_dials_members_and_once_at_low_it_stops_listing_them() -> None:
    members = _peers(30)
    manager, host, asked = _dial_manager(members, low=4, high=8)
    await _passes(manager, 1)
    assert len(host.peers) == 4 and set(host.peers) <= set(members)
    for peer in host.peers:
        manager.admitted(peer)
    asked.clear()
    await _passes(manager, 20)
    # with its degree, a pass costs nothing in the size of the network: no member list, no dial
    assert asked == [] and manager.counters["member_scans"] == 1 and len(host.dialled) == 4
    lost = sorted(host.peers)[0]
    host.peers.discard(lost)
    manager.disconnected(lost)
    await _passes(manager, 1)
    assert asked and len(host.peers) == 4  # below low again: members are candidates at once


async def test_the_manager_trims_above_high_and_never_a_pinned_peer() -> None:
    members = _peers(12)
    manager, host, asked = _dial_manager(members, low=3, high=5, grace=0.0)
    pinned = members[0]
    manager.pin(pinned, ["/ip4/10.0.0.2/tcp/4001"])
    host.peers = set(members[:9])
    for peer in host.peers:
        manager.admitted(peer)
    await _passes(manager, 1)
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(host.peers) == 4 and pinned in host.peers  # down to the middle of low and high
    assert manager.counters["connections_trimmed"] == 5 and pinned not in host.closed


async def test_addresses_are_scanned_every_few_passes_and_a_change_is_announced() -> None:
    members = _peers(3)
    changes = []
    manager, host, asked = _dial_manager(
        members, low=1, high=4, address_scan_interval=5.0, addresses_changed=lambda: changes.append(1)
    )
    reads = host.address_reads
    await _passes(manager, 10)
    assert host.address_reads - reads == 2 and changes == []  # every 5th pass, not every pass
    host.listen = ["/ip4/10.0.0.9/tcp/4001"]
    await _passes(manager, 5)
    assert changes == [1] and manager.counters["address_changes"] == 1


async def test_connections_carrying_relay_reservations_are_never_trimmed() -> None:
    members = _peers(12)
    manager, host, _ = _dial_manager(members, low=2, high=3, grace=0.0)
    relay, reserving = members[0], members[1]
    host.reachability = lambda: {"relays": [relay], "reserving_peers": [reserving]}
    for peer in members[:8]:  # far above high
        host.peers.add(peer)
        manager.admitted(peer)
    await _passes(manager, 1)
    # trimmed to low, but the link to our relay and the one a peer holds its reservation on stay
    assert relay in host.peers and reserving in host.peers and relay not in host.closed
    assert manager.connections.is_protected(relay) and manager.connections.is_protected(reserving)
    host.reachability = lambda: {"relays": [], "reserving_peers": []}
    await _passes(manager, 1)
    assert not manager.connections.is_protected(relay) and not manager.connections.is_protected(reserving)


async def test_an_address_learned_while_a_dial_hangs_is_dialled_at_once_beside_it() -> None:
    """A private peer's own address times out (5 s); its relayed one, learned a moment after the
    dial began, must not wait for that (issue #15: 6 of the 11 s to a punched path)."""
    net = FakeNetwork()
    peer = Identity.generate().peer_id
    own, relayed = "/ip4/192.168.3.2/tcp/4001", f"/ip4/198.51.100.1/tcp/4001/p2p/{peer[:-1]}R/p2p-circuit"
    hung = asyncio.Event()

    async def dial(addrs: list[str]) -> str:
        net.dials.append((net.now, peer, addrs[0].rsplit(f"/p2p/{peer}", 1)[0]))
        if any("p2p-circuit" in a for a in addrs):
            net.connected.add(peer)
            return peer
        await hung.wait()  # the SYNs go unanswered
        raise OSError("timed out")

    dialer = Dialer(Identity.generate().peer_id, dial, net.connected.__contains__, clock=net.clock)
    assert dialer.want(peer, [own])
    await asyncio.sleep(0)
    assert not dialer.want(peer, [own])  # the same addresses: the running dial is enough
    assert dialer.want(peer, [own, relayed])
    for _ in range(3):
        await asyncio.sleep(0)
    assert peer in net.connected and [a for _, _, a in net.dials] == [own, relayed]
    assert dialer.counters["dials_new_addresses"] == 1 and dialer.counters["dials_ok"] == 1
    hung.set()  # the first dial fails now: no back-off for a peer another attempt reached
    for _ in range(3):
        await asyncio.sleep(0)
    assert dialer.counters["dials_failed"] == 1 and dialer.waiting() == {}


async def test_at_most_two_attempts_per_peer_however_its_addresses_churn() -> None:
    net = FakeNetwork()
    peer = Identity.generate().peer_id
    never = asyncio.Event()

    async def dial(addrs: list[str]) -> str:
        net.dials.append((net.now, peer, addrs[0]))
        await never.wait()
        return peer

    dialer = Dialer(Identity.generate().peer_id, dial, net.connected.__contains__, clock=net.clock)
    for port in range(4001, 4011):
        dialer.want(peer, [f"/ip4/192.0.2.9/tcp/{port}"])
        await asyncio.sleep(0)
    assert len(net.dials) == 2
    await dialer.aclose()


async def test_at_its_degree_the_manager_still_dials_a_lost_member_now_and_then() -> None:
    members = _peers(10)
    far_side: set[str] = set()

    def lost() -> set[str]:  # reached through nobody, until one of them is connected again
        return set() if far_side & host.peers else far_side

    manager, host, asked = _dial_manager(members, low=3, high=6, lost=lost, repair_interval=2.0)
    host.peers = set(members[:3])
    for peer in host.peers:
        manager.admitted(peer)
    await _passes(manager, 10)
    assert host.dialled == [] and manager.counters["repair_dials"] == 0  # at low, nothing lost: no dial
    far_side |= set(members[5:8])  # the overlay split: these are reached through nobody now
    await _passes(manager, 4)  # the next repair comes within 2..4 passes
    assert len(host.dialled) == 1 and host.dialled[0] in far_side and manager.counters["repair_dials"] == 1
    await _passes(manager, 10)  # the dial healed it
    assert len(host.dialled) == 1


async def test_a_repair_dial_of_a_crashed_member_backs_off_like_any_dial() -> None:
    members = _peers(5)
    manager, host, asked = _dial_manager(members, low=2, high=4, lost=lambda: {members[4]}, repair_interval=1.0)
    host.reachable.discard(members[4])  # it crashed: every dial fails
    host.peers = set(members[:2])
    for peer in host.peers:
        manager.admitted(peer)
    await _passes(manager, 20)
    assert host.dialled == [members[4]]  # tried every pass or two, but it waits out its back-off


async def test_a_peer_that_trimmed_us_is_held_off_whatever_resets_the_back_offs_and_pinned_peers_never_are() -> None:
    net = FakeNetwork()
    trimmer, other, pinned = _peers(3)
    net.reachable = {trimmer, other, pinned}
    dialer = Dialer(Identity.generate().peer_id, net.dial, net.connected.__contains__, clock=net.clock)
    dialer.pin(pinned, ["/ip4/10.0.0.4/tcp/4001"])
    dialer.hold_off(trimmer, 120.0)
    dialer.hold_off(pinned, 120.0)  # a configured bootstrap peer is always dialled
    known = {trimmer: ["/ip4/10.0.0.2/tcp/4001"], other: ["/ip4/10.0.0.3/tcp/4001"]}
    assert set(dialer.candidates(known)) == {other, pinned}  # the connection manager picks elsewhere
    assert dialer.want(trimmer, known[trimmer]) is False
    dialer.admitted(other)  # an admission resets every back-off: not the hold
    dialer.network_changed()
    await _run(dialer, net, 5.0)
    assert trimmer not in {peer for _, peer, _ in net.dials} and pinned in net.connected
    net.now += 120.0
    assert trimmer in dialer.candidates(known) and dialer.want(trimmer, known[trimmer]) is True
    await asyncio.sleep(0)
    assert trimmer in net.connected


async def test_held_off_peers_are_bounded_however_many_ask() -> None:
    net = FakeNetwork()
    dialer = Dialer(Identity.generate().peer_id, net.dial, net.connected.__contains__, clock=net.clock, max_strangers=4)
    for peer in _peers(40):
        dialer.hold_off(peer, 120.0)
    assert len(dialer._held) == 16 and dialer.counters["dials_held_off"] == 16
    net.now += 121.0  # expired holds make room again
    dialer.hold_off(_peers(1)[0], 120.0)
    assert len(dialer._held) == 1
