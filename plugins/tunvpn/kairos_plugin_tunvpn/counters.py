"""The event counters of a data plane (:attr:`.dataplane.DataPlane.counters`)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class Counters:
    """Event counters of a data plane; each is written by one thread, read by anyone."""

    tx_packets: int = 0
    tx_bytes: int = 0
    tx_sends: int = 0
    tun_reads: int = 0
    rekeys: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_batches: int = 0
    tun_writes: int = 0
    drop_malformed: int = 0
    drop_no_route: int = 0
    drop_unsupported: int = 0
    drop_no_endpoint: int = 0
    drop_unknown_peer: int = 0
    drop_stale_epoch: int = 0
    drop_replay: int = 0
    drop_bad_tag: int = 0
    drop_spoofed_source: int = 0
    #: not from the endpoint of its session, and over the budget for opening such datagrams
    drop_roam_limited: int = 0
    #: datagrams from another endpoint than their session's that were opened (within the budget)
    roam_opens: int = 0
    #: sessions moved to a new endpoint by an authentic datagram from it
    roams: int = 0
    #: sealed keepalives sent to try a path that is not in use (UDP trials, hole punching)
    probes_sent: int = 0
    send_errors: int = 0
    recv_errors: int = 0
    tun_errors: int = 0

    def snapshot(self) -> dict[str, int]:
        """The current values by name."""
        return {name: getattr(self, name) for name in COUNTER_NAMES}


#: every counter of :class:`Counters`, in order
COUNTER_NAMES = tuple(f.name for f in fields(Counters))
