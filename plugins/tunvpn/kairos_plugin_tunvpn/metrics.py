"""What each counter of the VPN means, declared to the node's metrics (``GET /metrics``).

The counters are published as ``vpn_<name>`` through ``NodeView.set_counters`` (``kairos status``
shows them); declaring them here gives each its HELP text and, for ``fastpath``, its kind (a
gauge). ``vpn_peers_udp`` / ``vpn_peers_stream`` are the core's ``kairos_vpn_peers{path}``.
"""

from __future__ import annotations

from kairos_core.plugin import KairosError, NodeView

#: ``name`` (without ``vpn_``) → HELP text, for the counters of the data plane and the plugin.
COUNTER_HELP: dict[str, str] = {
    "tx_packets": "Packets read from the TUN device and sent to a peer.",
    "tx_bytes": "Bytes of the packets sent to peers.",
    "tx_sends": "UDP send calls (one may carry several packets, GSO).",
    "tun_reads": "Reads from the TUN device.",
    "rekeys": "Session keys replaced.",
    "rx_packets": "Packets received from peers and written to the TUN device.",
    "rx_bytes": "Bytes of the packets received from peers.",
    "rx_batches": "Receive batches (recvmmsg / GRO).",
    "tun_writes": "Writes to the TUN device.",
    "drop_malformed": "Datagrams dropped: malformed.",
    "drop_no_route": "Packets dropped: no peer holds their destination address.",
    "drop_unsupported": "Packets dropped: not IPv4 or IPv6.",
    "drop_no_endpoint": "Packets dropped: their peer has no UDP endpoint yet.",
    "drop_unknown_peer": "Datagrams dropped: no session for their sender.",
    "drop_stale_epoch": "Datagrams dropped: sealed under replaced keys.",
    "drop_replay": "Datagrams dropped: replayed.",
    "drop_bad_tag": "Datagrams dropped: authentication failed.",
    "drop_spoofed_source": "Packets dropped: their source is not the sending peer's address.",
    "drop_roam_limited": "Datagrams from a new endpoint dropped over the budget for opening them.",
    "roam_opens": "Datagrams from another endpoint than their session's that were opened.",
    "roams": "Sessions moved to a new endpoint by an authentic datagram from it.",
    "send_errors": "UDP sends that failed.",
    "recv_errors": "UDP receives that failed.",
    "tun_errors": "TUN device reads or writes that failed.",
    "coalesced_frames": "Frames the receive path merged TCP segments into before the TUN write (GRO).",
    "coalesced_packets": "TCP segments merged into those frames.",
    "claim_lapses": "Times this node's VPN address claim lapsed.",
    "address_moves": "Times this node moved to another VPN address.",
    "path_switches": "Changes of a peer's path (direct or punched UDP, relay, libp2p stream).",
    "path_source_errors": "Path sources that failed when asked for their paths.",
    "probes_sent": "Sealed keepalives sent to try a path not in use (UDP trials, hole punching).",
    "punch_attempts": "Hole-punching attempts (this node's and answered ones).",
    "punch_successes": "Hole-punching attempts after which UDP from the peer worked.",
    "punch_failures": "Hole-punching attempts that opened nothing (symmetric NAT, no answer).",
    "punch_bad_messages": "Malformed hole-punching messages received.",
    "punch_refused": "Hole-punching requests refused (no session, one already running, too soon).",
    "keepalive_errors": "Keepalives that could not be sent.",
    "key_exchanges": "Key exchanges with peers.",
    "key_exchange_errors": "Key exchanges that failed.",
    "fallback_datagrams_sent": "Datagrams sent over the libp2p stream fallback.",
    "fallback_datagrams_received": "Datagrams received over the stream fallback.",
    "fallback_datagrams_delivered": "Datagrams from the stream fallback delivered to the TUN device.",
    "fallback_frames_sent": "Frames sent on the stream fallback.",
    "fallback_frames_received": "Frames received on the stream fallback.",
    "fallback_dropped": "Datagrams the stream fallback dropped (its queue was full).",
    "fallback_malformed": "Malformed frames received on the stream fallback.",
    "fallback_send_errors": "Sends on the stream fallback that failed.",
    "relay_forwarded_bytes": "Bytes of sealed datagrams this node relayed between two peers.",
    "relay_forwarded_sends": "Send calls that relayed datagrams (one may carry a GSO train).",
    "relay_drop_unrouted": "Relayed datagrams dropped: in a train, under no relay session.",
    "relay_drop_ended": "Relayed datagrams dropped: their relay session had ended.",
    "relay_ended_bytes": "Relay sessions ended at their byte limit (vpn.relay_max_bytes).",
    "relay_send_errors": "Relayed datagrams that could not be sent on.",
}
#: values, not counts
GAUGE_HELP: dict[str, str] = {
    "fastpath": "1 when the C fast path of the data plane runs, else 0.",
    "relay_sessions": "Pairs of peers whose sealed datagrams this node relays now.",
}


def declare(node: NodeView) -> None:
    """Declare every VPN counter and gauge to the node (again is harmless)."""
    try:
        for name, text in COUNTER_HELP.items():
            node.counter(f"vpn_{name}", text)
        for name, text in GAUGE_HELP.items():
            node.gauge(f"vpn_{name}", text)
    except KairosError as exc:  # a metric name taken by another plugin: the VPN works without HELP texts
        import logging

        logging.getLogger(__name__).warning("vpn: metrics not declared: %s", exc)
