"""Duplicate connections to one peer: which to close.

Two nodes that find each other at once (mDNS, the dial manager's first pass) dial each other at
once, and libp2p keeps both connections. Everything then runs on one of them — streams are opened
on the first connection the swarm lists — and the other carries nothing but its TCP keepalives:
four segments per keepalive period, the largest share of an idle node's packets after gossip
(measured with tcpdump at N = 10: 5 of a node's 14 connections). libp2p's own per-peer trim runs
only when a connection is added and spares connections younger than its grace period, which
both of a simultaneous pair are.

Only the end with the lower peer id closes duplicates (closing a connection closes it for both
ends): two ends deciding at once on views a moment apart could close the two different ones of
a pair. It waits until every connection to the peer has been up :data:`GRACE` seconds (a stream
may be on its way onto a new one), then closes those that carry no stream; when none carries
one, it keeps its own first dial.
"""

from __future__ import annotations

from dataclasses import dataclass

#: seconds a connection must have been up before it may be closed as a duplicate
GRACE = 10.0
#: seconds between two sweeps
SWEEP = 5.0


@dataclass(frozen=True)
class ConnectionView:
    """What the choice needs of one connection to the peer."""

    outbound: bool  # this node dialled it
    created_at: float
    streams: int


def duplicates_to_close(self_id: str, peer_id: str, connections: list[ConnectionView], now: float) -> list[int]:
    """Indexes into ``connections`` (this node's connections to ``peer_id``) to close now."""
    if len(connections) < 2 or self_id > peer_id or any(now - c.created_at < GRACE for c in connections):
        return []
    idle = [i for i, c in enumerate(connections) if c.streams == 0]
    if len(idle) == len(connections):
        idle.remove(min(idle, key=lambda i: (not connections[i].outbound, connections[i].created_at)))
    return idle
