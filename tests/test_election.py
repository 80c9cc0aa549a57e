"""Leader election on real ledgers (sqlite files), with gossip and partitions simulated by hand.

The network is replaced by explicit ``replicate(group)`` calls, and time by a controllable clock,
so every interleaving here is deterministic. With ``beats=True`` renewals are heartbeats (signed,
encoded and decoded for real) that ``replicate`` hands to the group instead of ledger rewrites, as
a running node does. Elections between real nodes are in test_node.py.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest

from kairos_core.election import (
    LEADER_BUCKET,
    Election,
    LeasePolicy,
    candidate_rank,
    decode_heartbeat,
    encode_heartbeat,
    lease_key,
    parse_lease,
)
from kairos_core.identity import Identity
from kairos_core.ledger import Ledger, LedgerStore, PolicyRegistry
from kairos_core.membership import Membership


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SimNode:
    def __init__(self, tmp_path, clock: Clock, lease: float = 3.0, eligible: bool = True, beats: bool = False, pull=None) -> None:
        self.identity = Identity.generate()
        self.peer_id = self.identity.peer_id
        self.ledger = Ledger(
            self.identity, LedgerStore(tmp_path / f"{self.peer_id}.db"), policies=PolicyRegistry({LEADER_BUCKET: LeasePolicy()})
        )
        self.membership = Membership(self.peer_id, self._noop, clock=clock)
        self.announced: list[tuple[str, int]] = []
        self.outbox: list[bytes] = []  # heartbeats published, not yet delivered
        self.election = Election(
            self.peer_id,
            self.ledger,
            self.membership,
            self._announce,
            lease_seconds=lease,
            settle=0,
            monotonic=clock,
            eligible=lambda: eligible,
            heartbeat=self._beat if beats else None,
            pull=pull,
        )
        self.ledger.add_listener(self.election.observe)

    async def _beat(self, epoch: int) -> None:
        version = self.ledger.clock.tick()
        self.outbox.append(encode_heartbeat(self.identity, "kairos", epoch, (version[0], version[1])))

    def lease_versions(self) -> dict[str, tuple]:
        """Every lease entry's version in this node's ledger: what renewals that rewrite it move."""
        return {key: tuple(self.ledger.get_entry(LEADER_BUCKET, key).version) for key in self.ledger.items(LEADER_BUCKET)}

    async def _noop(self, event) -> None:
        pass

    async def _announce(self, leader: str, epoch: int) -> None:
        self.announced.append((leader, epoch))


class Sim:
    def __init__(self, tmp_path, count: int, lease: float = 3.0, beats: bool = False) -> None:
        self.clock = Clock()
        self.tmp_path = tmp_path
        self.lease = lease
        self.beats = beats
        self.nodes = [SimNode(tmp_path, self.clock, lease, beats=beats) for _ in range(count)]
        self.groups = [list(self.nodes)]
        self.connect()

    def add(self, **kwargs) -> SimNode:
        node = SimNode(self.tmp_path, self.clock, self.lease, beats=self.beats, **kwargs)
        self.nodes.append(node)
        self.groups[0].append(node)
        self.connect()
        return node

    def connect(self) -> None:
        for group in self.groups:
            for a, b in itertools.permutations(group, 2):
                a.membership.connected(b.peer_id)
                a.membership.entry_changed(b.peer_id, {"hostname": b.peer_id[-4:]})  # its nodes entry
        for a, b in itertools.permutations(self.nodes, 2):
            if not any(a in g and b in g for g in self.groups):
                a.membership.disconnected(b.peer_id)

    def partition(self, *groups) -> None:
        self.groups = [list(g) for g in groups]
        self.connect()

    def replicate(self) -> None:
        for group in self.groups:
            for a, b in itertools.permutations(group, 2):
                b.ledger.apply_remote(list(a.ledger.entries()))
            for a, b in itertools.permutations(group, 2):
                for frame in a.outbox:
                    b.election.observe_heartbeat(decode_heartbeat("kairos", frame))
        for node in self.nodes:
            node.outbox.clear()  # gossip across a partition is lost, not delayed

    async def rounds(self, count: int, advance: float | None = None) -> None:
        for _ in range(count):
            self.clock.now += self.lease / 3 if advance is None else advance
            for node in self.nodes:
                node.membership.expire()
            for node in [n for g in self.groups for n in g]:
                await node.election.step()
            await asyncio.sleep(0)  # heartbeats being published go out
            self.replicate()
            await asyncio.sleep(0)  # let announcement tasks run

    def leaders(self, group=None) -> set:
        return {n.election.leader for n in (group or self.nodes)}


async def test_one_leader_is_elected_and_announced_once_everywhere(tmp_path):
    sim = Sim(tmp_path, 5)
    await sim.rounds(8)
    expected = min(sim.nodes, key=lambda n: candidate_rank(n.peer_id)).peer_id
    assert sim.leaders() == {(expected, 1)}
    for node in sim.nodes:
        assert node.announced == [(expected, 1)]
    assert sum(n.election.is_leader for n in sim.nodes) == 1


@pytest.mark.parametrize("beats", [False, True], ids=["ledger-renewals", "heartbeats"])
async def test_steady_state_and_joining_nodes_cause_no_leader_change(tmp_path, beats):
    sim = Sim(tmp_path, 3, beats=beats)
    await sim.rounds(8)
    (leader,) = sim.leaders()
    for _ in range(3):  # new nodes arrive, some ranked above the sitting leader
        sim.add()
        await sim.rounds(10)
    assert sim.leaders() == {leader}
    assert all(n.election.changes <= 1 for n in sim.nodes)
    assert all(n.announced == [leader] for n in sim.nodes)


@pytest.mark.parametrize("beats", [False, True], ids=["ledger-renewals", "heartbeats"])
async def test_fail_over_after_the_leader_dies(tmp_path, beats):
    sim = Sim(tmp_path, 5, beats=beats)
    await sim.rounds(8)
    ((old, epoch),) = sim.leaders()
    dead = next(n for n in sim.nodes if n.peer_id == old)
    survivors = [n for n in sim.nodes if n is not dead]
    sim.partition(survivors, [dead])
    sim.groups = [survivors]  # the dead node takes no more steps
    await sim.rounds(3)  # fewer rounds than a full lease: departure speeds the fail-over up
    leaders = sim.leaders(survivors)
    assert len(leaders) == 1
    (new, new_epoch) = leaders.pop()
    assert new != old and new_epoch == epoch + 1
    assert all(n.announced[-1] == (new, new_epoch) for n in survivors)


@pytest.mark.parametrize("beats", [False, True], ids=["ledger-renewals", "heartbeats"])
async def test_minority_side_of_a_partition_never_leads_and_heal_converges(tmp_path, beats):
    sim = Sim(tmp_path, 5, beats=beats)
    await sim.rounds(8)
    ((old, epoch),) = sim.leaders()
    leader = next(n for n in sim.nodes if n.peer_id == old)
    others = [n for n in sim.nodes if n is not leader]
    minority, majority = [leader, others[0]], others[1:]
    sim.partition(majority, minority)
    await sim.rounds(12)
    assert {n.election.leader for n in minority} == {None}  # the old leader stepped down
    majority_leaders = sim.leaders(majority)
    assert len(majority_leaders) == 1 and next(iter(majority_leaders))[1] == epoch + 1
    # at most one leader per epoch across everything any node ever announced
    per_epoch = {}
    for node in sim.nodes:
        for peer, ep in node.announced:
            per_epoch.setdefault(ep, set()).add(peer)
    assert all(len(peers) == 1 for peers in per_epoch.values())
    sim.partition(sim.nodes)
    await sim.rounds(6)
    assert sim.leaders() == majority_leaders


async def test_concurrent_claims_confirm_only_the_merge_winner(tmp_path):
    sim = Sim(tmp_path, 2)
    a, b = sim.nodes
    sim.partition([a], [b])  # each sees only itself: both are "the candidate"
    for node in sim.nodes:
        node.election.require_majority = False
        node.election.settle = 0.05
    sim.clock.now += 10

    async def gossip():
        while True:
            await asyncio.sleep(0.01)
            for x, y in itertools.permutations(sim.nodes, 2):
                y.ledger.apply_remote(list(x.ledger.entries()))

    syncer = asyncio.create_task(gossip())
    try:
        await asyncio.gather(a.election.step(), b.election.step())
        await asyncio.sleep(0.05)
    finally:
        syncer.cancel()
    leases = [
        parse_lease("kairos", key, value, a.ledger.get_entry(LEADER_BUCKET, key).owner)
        for key, value in a.ledger.items(LEADER_BUCKET).items()
    ]
    held = [lease for lease in leases if lease and lease.held]
    assert len(held) == 1 and held[0].epoch == 1


def test_lease_policy_and_parsing():
    identity, other = Identity.generate(), Identity.generate()
    from kairos_core.ledger import Entry, HybridLogicalClock

    clock = HybridLogicalClock(identity.peer_id)
    key = lease_key("kairos", 4, identity.peer_id)
    value = {"peer": identity.peer_id, "epoch": 4, "state": "held", "claimed": [5, 0]}
    good = Entry.signed(identity, LEADER_BUCKET, key, value, clock.tick())
    forged = Entry.signed(identity, LEADER_BUCKET, key, {**value, "peer": other.peer_id}, clock.tick())
    squatting = Entry.signed(identity, LEADER_BUCKET, lease_key("kairos", 4, other.peer_id), value, clock.tick())
    policy = LeasePolicy()
    assert policy.allows(good, None, 0)
    assert not policy.allows(forged, None, 0) and not policy.allows(squatting, None, 0)
    lease = parse_lease("kairos", key, good.value, good.owner)
    assert (lease.epoch, lease.claimed, lease.held) == (4, (5, 0), True)
    assert parse_lease("kairos", key, {**value, "epoch": 5}, identity.peer_id) is None
    assert parse_lease("kairos", key, {**value, "claimed": "soon"}, identity.peer_id) is None
    assert parse_lease("other", key, good.value, good.owner) is None
    assert parse_lease("kairos", "kairos:x:" + identity.peer_id, good.value, good.owner) is None
    assert parse_lease("kairos", key, good.value, other.peer_id) is None


def test_earliest_claim_of_the_highest_epoch_wins():
    from kairos_core.election import Lease, winner

    late = Lease("b", 3, "held", (200, 0))
    early = Lease("c", 3, "claim", (100, 5))
    old = Lease("a", 2, "held", (1, 0))
    assert winner([late, old, early]) == early
    assert winner([old]) == old and winner([]) is None


async def test_ineligible_nodes_never_claim(tmp_path):
    sim = Sim(tmp_path, 0)
    sim.add(eligible=False)
    sim.add(eligible=False)
    await sim.rounds(10)
    assert sim.leaders() == {None}


def _vouch(node: SimNode, voucher: SimNode, named: list[SimNode]) -> None:
    """``node`` receives ``voucher``'s nodes entry naming ``named`` as its neighbours."""
    node.membership.entry_changed(voucher.peer_id, {"hostname": voucher.peer_id[-4:], "neighbours": [n.peer_id for n in named]})


async def _leader_with_a_vouching_partner(tmp_path):
    """Five nodes with a leader; the leader holds a partner's entry naming everyone else."""
    sim = Sim(tmp_path, 5)
    await sim.rounds(8)
    ((old, epoch),) = sim.leaders()
    leader = next(n for n in sim.nodes if n.peer_id == old)
    partner, *others = [n for n in sim.nodes if n is not leader]
    _vouch(leader, partner, [n for n in sim.nodes if n is not partner])
    sim.clock.now += 0.2
    return sim, (old, epoch), leader, partner, others


async def test_a_leader_cut_off_with_a_partner_steps_down_before_the_partner_notices(tmp_path):
    # the partner's entry was written before the cut
    sim, _, leader, partner, majority = await _leader_with_a_vouching_partner(tmp_path)
    for node in majority:  # the leader's own connections to the majority close
        leader.membership.disconnected(node.peer_id)
    # Through the partner's entry the majority still looks alive: membership alone would keep
    # the leader leading until the partner's rewritten entry arrives.
    assert {n.peer_id for n in majority} <= set(leader.membership.alive())
    await leader.election.step()
    assert not leader.election.is_leader and leader.election.leader is None
    # The partner rewrites its entry (it lost one link) but has not noticed the rest of the cut:
    # its word that the others are there is still no news from them.
    sim.clock.now += 0.2
    _vouch(leader, partner, [n for n in sim.nodes if n not in (partner, majority[0])])
    await leader.election.step()
    assert not leader.election.is_leader


async def test_a_leader_that_loses_direct_links_keeps_leading_once_the_peers_speak_again(tmp_path):
    sim, (old, epoch), leader, _, others = await _leader_with_a_vouching_partner(tmp_path)
    leader.membership.disconnected(others[0].peer_id)  # one flaky link: still a majority
    await leader.election.step()
    assert leader.election.is_leader
    for node in others[1:]:
        leader.membership.disconnected(node.peer_id)
    await leader.election.step()
    assert not leader.election.is_leader  # three links gone and no news of those peers since
    # Two of them rewrite their own entries (they lost their link to the leader, they are still
    # there): news newer than the loss, so they count again and the leader renews its epoch.
    sim.clock.now += 0.2
    for node in others[:2]:
        _vouch(leader, node, [n for n in sim.nodes if n not in (leader, node)])
    await leader.election.step()
    assert leader.election.leader == (old, epoch) and leader.election.is_leader


async def test_heartbeats_keep_the_lease_without_rewriting_it(tmp_path):
    sim = Sim(tmp_path, 5, beats=True)
    await sim.rounds(8)
    ((leader, epoch),) = sim.leaders()
    stored = [n.lease_versions() for n in sim.nodes]
    for _ in range(10):  # ten leases long: followers would see the lease lapse without heartbeats
        await sim.rounds(3)
        assert sim.leaders() == {(leader, epoch)}
    assert [n.lease_versions() for n in sim.nodes] == stored  # renewed, and never rewritten
    followers = [n for n in sim.nodes if n.peer_id != leader]
    assert all(n.election.counters["heartbeats_accepted"] >= 25 for n in followers)
    assert all(n.announced == [(leader, epoch)] for n in sim.nodes)


async def test_a_hung_leader_s_lease_lapses_whatever_heartbeats_others_send(tmp_path):
    """A leader whose process hangs keeps its connections (the kernel answers keepalives), so only
    the lapse of its lease tells the others: replays of its last heartbeat, heartbeats of its epoch
    signed by another member, of another epoch, or with a broken signature renew nothing."""
    sim = Sim(tmp_path, 5, beats=True)
    await sim.rounds(8)
    ((old, epoch),) = sim.leaders()
    hung = next(n for n in sim.nodes if n.peer_id == old)
    others = [n for n in sim.nodes if n is not hung]
    sim.clock.now += sim.lease / 3
    await hung.election.step()
    await asyncio.sleep(0)
    (last,) = hung.outbox
    hung.outbox.clear()
    forged = encode_heartbeat(others[0].identity, "kairos", epoch, (2**40, 0))
    other_epoch = encode_heartbeat(hung.identity, "kairos", epoch + 1, (2**40, 1))
    broken = bytearray(encode_heartbeat(hung.identity, "kairos", epoch, (2**40, 2)))
    broken[-1] ^= 1
    assert decode_heartbeat("kairos", bytes(broken)) is None
    assert decode_heartbeat("another-network", last) is None  # bound to its network
    assert all(n.election.observe_heartbeat(decode_heartbeat("kairos", last)) for n in others)  # once
    sim.groups = [others]  # the hung leader takes no more steps; everyone stays connected to it
    for _ in range(4):  # a lease and a third
        for node in others:
            for frame in (last, forged, other_epoch):
                assert not node.election.observe_heartbeat(decode_heartbeat("kairos", frame))
        await sim.rounds(1)
    assert (old, epoch) not in sim.leaders(others)  # lapsed
    assert all(hung.peer_id in n.membership.alive() for n in others)  # only the lapse said so
    # ... and the others elect one of themselves, though the hung one still looks alive and ranks
    # first as a candidate (it was elected for it): it is passed over, not waited for
    await sim.rounds(8)
    ((new, new_epoch),) = sim.leaders(others)
    assert new != old and new_epoch > epoch
    assert all(hung.peer_id in n.membership.alive() for n in others)


async def _joiner_with_the_lease_of_a_nobody(tmp_path):
    """A three-node network with a leader, and a joiner whose first sync brought the lease but not
    yet the entries that vouch for its holder."""
    sim = Sim(tmp_path, 3)
    await sim.rounds(8)
    ((leader, epoch),) = sim.leaders()
    holder = next(n for n in sim.nodes if n.peer_id == leader)
    joiner = SimNode(tmp_path, sim.clock, sim.lease)
    joiner.ledger.apply_remote(list(holder.ledger.entries()))
    return sim, (leader, epoch), holder, joiner


def _now_counts(joiner: SimNode, holder: SimNode) -> None:
    """The joiner connects to the holder and has its entry: the holder is a member there now."""
    joiner.membership.connected(holder.peer_id)
    joiner.membership.entry_changed(holder.peer_id, {"hostname": "holder"})


async def test_a_lease_that_arrives_before_its_holder_counts_is_announced_once_it_counts(tmp_path):
    """A joiner's first sync may bring the lease before the entries that vouch for its holder:
    the lease does not count then, and it must be announced when it does, not at its next rewrite
    (with heartbeats, the next rewrite comes only with the next leader)."""
    sim, (leader, epoch), holder, joiner = await _joiner_with_the_lease_of_a_nobody(tmp_path)
    await asyncio.sleep(0)
    assert joiner.election.leader is None and joiner.announced == []  # its holder is nobody yet
    _now_counts(joiner, holder)
    await joiner.election.step()
    await asyncio.sleep(0)
    assert joiner.announced == [(leader, epoch)]
    await joiner.election.step()
    await asyncio.sleep(0)
    assert joiner.announced == [(leader, epoch)]  # once


async def test_a_lease_is_timed_from_when_its_holder_counts_not_from_the_joiner_s_start(tmp_path):
    """The joiner of the test above, its first sync slow: the lease it starts counting late gets a
    whole lease of its own before it lapses (it was timed from the joiner's start, and the
    joiner, its own candidate, deposed a leader that renewed all along)."""
    sim, (leader, epoch), holder, joiner = await _joiner_with_the_lease_of_a_nobody(tmp_path)
    sim.clock.now += 0.9 * sim.lease  # the entries vouching for the holder are still on their way
    _now_counts(joiner, holder)
    await joiner.election.step()
    sim.clock.now += 0.5 * sim.lease  # 1.4 leases after the joiner started, half a lease after it counted
    await joiner.election.step()
    await asyncio.sleep(0)
    assert joiner.election.current().epoch == epoch and joiner.election.leader == (leader, epoch)
    sim.clock.now += 0.6 * sim.lease  # no renewal for a whole lease since it counted: now it lapsed
    await joiner.election.step()
    assert joiner.election.current().epoch == epoch + 1 and joiner.election.current().peer == joiner.peer_id


async def _lapsed_for_the_candidate_alone(tmp_path, answers: list):
    """A holder with a confirmed lease of epoch 1 and a candidate whose gossip brought no
    heartbeat for a whole lease; the candidate's lease pull answers from ``answers``."""

    async def pull(peer: str, epoch: int):
        return answers.pop(0) if answers else None

    clock = Clock()
    holder = SimNode(tmp_path, clock, beats=True)
    candidate = SimNode(tmp_path, clock, beats=True, pull=pull)
    for a, b in ((holder, candidate), (candidate, holder)):
        a.membership.connected(b.peer_id)
        a.membership.entry_changed(b.peer_id, {"hostname": b.peer_id[-4:]})
    holder.election._last_own_renewal = clock.now
    holder.election._write(1, "held")
    candidate.ledger.apply_remote(list(holder.ledger.entries()))
    await candidate.election.step()
    return clock, holder, candidate


def _beat(identity, version: int):
    return decode_heartbeat("kairos", encode_heartbeat(identity, "kairos", 1, (version, 0)))


@pytest.mark.parametrize("answer", ["replay", "forged", "none"])
async def test_a_pulled_heartbeat_keeps_a_lapsed_lease_only_when_fresh_and_signed_by_its_holder(tmp_path, answer):
    """The candidate asks the holder of a lease that lapsed for it alone (node.py's lease pull):
    a fresh heartbeat signed by the holder keeps the lease; a replay of one accepted before, one
    signed by someone else, or no answer, and it claims."""
    answers: list = []
    clock, holder, candidate = await _lapsed_for_the_candidate_alone(tmp_path, answers)
    fresh = _beat(holder.identity, holder.ledger.clock.tick()[0])
    answers.append(fresh)
    clock.now += 1.2 * candidate.election.lease_seconds
    await candidate.election.step()
    assert candidate.election.current().peer == holder.peer_id and candidate.election.counters["heartbeats_pulled"] == 1
    answers.append({"replay": fresh, "forged": _beat(candidate.identity, fresh.version[0] + 1), "none": None}[answer])
    clock.now += 1.2 * candidate.election.lease_seconds
    await candidate.election.step()
    assert candidate.election.current().epoch == 2 and candidate.election.current().peer == candidate.peer_id
    assert candidate.election.counters["heartbeats_pulled"] == 1
