"""A lease that lapsed for the candidate alone: the holder, asked directly, keeps it (issue #14).

Heartbeats are gossip. On a loaded network one node's copies can all be late for a whole lease
while the rest of the network gets them; that node, when it is the candidate, deposed a leader that
renewed all along (twice in one 100-node formation on 2 cores). Before it claims it now asks the
holder for a fresh signed heartbeat. Real in-process nodes on loopback, with a lease of 3 s; the
holder's gossip heartbeats are switched off, as if every copy to the candidate were lost.
"""

from __future__ import annotations

import asyncio

from kairos_core.node import LEASE_PULL_PROTOCOL

LEASE = 3.0  # seconds


async def _no_gossip(epoch: int) -> None:
    return None


async def test_a_holder_that_renews_keeps_its_lease_when_only_a_pull_reaches_the_candidate(kairos_network) -> None:
    net = await kairos_network(2, overrides={"election": {"lease_seconds": LEASE}})
    await net.wait_for(lambda: all(n.election.leader is not None for n in net.nodes), timeout=30)
    ((holder_id, epoch),) = {n.election.leader for n in net.nodes}
    holder = next(n for n in net.nodes if n.peer_id == holder_id)
    candidate = next(n for n in net.nodes if n is not holder)
    holder.election._heartbeat = _no_gossip  # its renewals reach nobody by gossip from now on
    await asyncio.sleep(4 * LEASE)
    assert candidate.election.leader == (holder_id, epoch)  # it lapsed there, and was kept
    assert candidate.election.counters["heartbeats_pulled"] >= 2
    assert holder.counters["heartbeat_pulls_served"] >= 2

    # a holder that does not answer (hung, or no longer leading) is passed over as before
    async def silent(stream) -> None:
        await stream.close()

    holder.host.set_stream_handler(LEASE_PULL_PROTOCOL, silent)
    await net.wait_for(lambda: candidate.election.leader == (candidate.peer_id, epoch + 1), timeout=6 * LEASE)
    assert candidate.counters["heartbeat_pulls_unanswered"] >= 1
