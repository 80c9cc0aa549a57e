"""The data plane's peer table: who is at which VIP, key id and UDP endpoint.

Changed by the control side (the VPN's asyncio loop: :meth:`PeerTable.add_peer`,
:meth:`~PeerTable.set_vip` …) under a lock, read without one by the forwarding threads: every
change of who holds a VIP or a key id builds new lookup maps and publishes them whole, so a
thread sees the old table or the new one, never half of each. A peer's endpoint and fallback are
single attribute writes.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Callable, Iterable

from .crypto import REKEY_AFTER_PACKETS, REKEY_AFTER_SECONDS, ReceiveState, SendState, SessionKeys


class Peer:
    """One remote node: its virtual IP (and extra networks), UDP endpoint, session state."""

    __slots__ = (
        "peer_id",
        "vip",
        "vip_bytes",
        "networks",
        "endpoint",
        "source",
        "send",
        "receive",
        "fallback",
        "heard",
        "udp_heard",
        "relayed_from",
        "relay_heard",
    )

    def __init__(
        self,
        peer_id: str,
        vip: ipaddress.IPv4Address,
        endpoint: tuple[str, int] | None,
        send: SendState,
        receive: ReceiveState,
        networks: tuple[ipaddress.IPv4Network, ...],
    ) -> None:
        self.peer_id = peer_id
        self.vip = vip
        self.vip_bytes = vip.packed
        self.networks = networks
        self.endpoint = endpoint
        # the UDP endpoint whose datagrams are opened without a roaming token (besides
        # ``relayed_from``): where the last authentic datagram not through its relay came from
        # (until there is one, where the peer was said to be)
        self.source = endpoint
        self.send = send
        self.receive = receive
        self.fallback: Callable[[bytes], object] | None = None
        # time.monotonic() of the last authentic datagram, by any path / over UDP (None: never);
        # only authentic datagrams move them, so forged ones cannot fake liveness
        self.heard: float | None = None
        self.udp_heard: float | None = None
        # the relay's UDP address while this peer's datagrams come through a relay: authentic
        # ones from there move relay_heard, not udp_heard (:mod:`.relaydgram`)
        self.relayed_from: tuple[str, int] | None = None
        self.relay_heard: float | None = None

    def expects(self, address: tuple[str, int]) -> bool:
        """True if datagrams from ``address`` need no roaming token: the session's own endpoint,
        or its relay's."""
        return address == self.source or address == self.relayed_from

    def owns_source(self, source: bytes) -> bool:
        """True if an inner packet from ``source`` may come from this peer."""
        if source == self.vip_bytes:
            return True
        address = ipaddress.IPv4Address(source)
        return any(address in network for network in self.networks)


class PeerTable:
    """The peers of one data plane, by peer id, by VIP, by receive key id and by routed network.

    :param rekey_after_packets: the send sessions' rekey limits (see :class:`~.crypto.SendState`).
    :param rekey_after_seconds: the same in seconds.
    """

    def __init__(self, rekey_after_packets: int = REKEY_AFTER_PACKETS, rekey_after_seconds: float = REKEY_AFTER_SECONDS) -> None:
        self.rekey_after_packets = rekey_after_packets
        self.rekey_after_seconds = rekey_after_seconds
        self._peers: dict[str, Peer] = {}
        self._by_vip: dict[bytes, Peer] = {}
        self._by_key_id: dict[int, Peer] = {}
        self._routed: list[tuple[ipaddress.IPv4Network, Peer]] = []
        self._control = threading.Lock()

    def add_peer(
        self,
        peer_id: str,
        vip: ipaddress.IPv4Address | str,
        endpoint: tuple[str, int] | None,
        keys: SessionKeys,
        *,
        networks: Iterable[ipaddress.IPv4Network | str] = (),
    ) -> None:
        """Add a peer, or replace it (new keys, endpoint or VIP) if ``peer_id`` is known.

        :param vip: the peer's virtual IP; packets to it go to the peer, packets from the peer
            must come from it (or from one of ``networks``).
        :param endpoint: the peer's UDP address, or None to use its fallback (and learn the
            address from its first authentic datagram).
        :raises ValueError: if the VIP or the receive key id is already another peer's.
        """
        vip = ipaddress.IPv4Address(vip)
        nets = tuple(ipaddress.IPv4Network(n) for n in networks)
        with self._control:
            old = self._peers.get(peer_id)
            for other in self._peers.values():
                if other is old:
                    continue
                if other.vip == vip:
                    raise ValueError(f"VIP {vip} already belongs to peer {other.peer_id}")
                if other.receive.key_id == keys.receive_key_id:
                    raise ValueError(f"receive key id of {peer_id} collides with {other.peer_id}'s")
            peer = Peer(
                peer_id,
                vip,
                endpoint,
                SendState(keys, self.rekey_after_packets, self.rekey_after_seconds),
                ReceiveState(keys),
                nets,
            )
            if old is not None:
                peer.fallback = old.fallback
                peer.relayed_from = old.relayed_from
                if old.source is not None:
                    peer.source = old.source  # new keys, same peer: it sends from where it did
            peers = dict(self._peers)
            peers[peer_id] = peer
            self._publish(peers)

    def remove_peer(self, peer_id: str) -> None:
        """Forget a peer: its packets are dropped from now on. Unknown ids are ignored."""
        with self._control:
            peers = dict(self._peers)
            if peers.pop(peer_id, None) is not None:
                self._publish(peers)

    def set_vip(self, peer_id: str, vip: ipaddress.IPv4Address | str) -> None:
        """Route ``vip`` to ``peer_id`` from now on, keeping its session (keys, counters).

        Re-adding a peer with the same keys would restart its packet counter and so reuse
        AES-GCM nonces: a VIP that moves must move through here.

        :raises ValueError: if another peer holds ``vip``.
        :raises KeyError: for an unknown peer.
        """
        vip = ipaddress.IPv4Address(vip)
        with self._control:
            peer = self._peers[peer_id]
            for other in self._peers.values():
                if other is not peer and other.vip == vip:
                    raise ValueError(f"VIP {vip} already belongs to peer {other.peer_id}")
            peer.vip = vip
            peer.vip_bytes = vip.packed
            self._publish(dict(self._peers))

    def set_endpoint(self, peer_id: str, endpoint: tuple[str, int] | None) -> None:
        """Point a peer's datagrams at a new UDP address (None: use the fallback)."""
        self._peers[peer_id].endpoint = endpoint

    def has_peer(self, peer_id: str) -> bool:
        """True if ``peer_id`` has a session in the data plane."""
        return peer_id in self._peers

    def peer_ids(self) -> list[str]:
        """The ids of every peer with a session."""
        return list(self._peers)

    def vip_of(self, peer_id: str) -> ipaddress.IPv4Address | None:
        """The VIP routed to ``peer_id`` (None for an unknown peer)."""
        peer = self._peers.get(peer_id)
        return peer.vip if peer else None

    def endpoint_of(self, peer_id: str) -> tuple[str, int] | None:
        """The UDP address datagrams to ``peer_id`` go to now (None: the fallback, or unknown)."""
        peer = self._peers.get(peer_id)
        return peer.endpoint if peer else None

    def source_of(self, peer_id: str) -> tuple[str, int] | None:
        """The UDP endpoint whose datagrams under ``peer_id``'s key id are opened without a
        roaming token: where its last authentic datagram came from, not counting those through
        its relay (:meth:`set_relayed_from`) (None: unknown peer, or none yet and no endpoint
        given)."""
        peer = self._peers.get(peer_id)
        return peer.source if peer else None

    def send_key_id(self, peer_id: str) -> int | None:
        """The key id ``peer_id``'s datagrams from us are sealed under (its receive key id)."""
        peer = self._peers.get(peer_id)
        return peer.send.key_id if peer else None

    def receive_key_id(self, peer_id: str) -> int | None:
        """The key id ``peer_id`` seals its datagrams to us under."""
        peer = self._peers.get(peer_id)
        return peer.receive.key_id if peer else None

    def last_heard(self, peer_id: str) -> float | None:
        """``time.monotonic()`` of the last authentic datagram from ``peer_id``, by UDP or stream."""
        peer = self._peers.get(peer_id)
        return peer.heard if peer else None

    def udp_heard(self, peer_id: str) -> float | None:
        """``time.monotonic()`` of the last authentic datagram from ``peer_id`` over UDP."""
        peer = self._peers.get(peer_id)
        return peer.udp_heard if peer else None

    def set_relayed_from(self, peer_id: str, address: tuple[str, int] | None) -> None:
        """Count ``peer_id``'s authentic datagrams from ``address`` (a relay's) as relayed, not as
        UDP of our own (None: no relay)."""
        peer = self._peers.get(peer_id)
        if peer is not None:
            peer.relayed_from = address

    def relay_heard(self, peer_id: str) -> float | None:
        """``time.monotonic()`` of the last authentic datagram from ``peer_id`` through its relay."""
        peer = self._peers.get(peer_id)
        return peer.relay_heard if peer else None

    def set_fallback(self, peer_id: str, send: Callable[[bytes], object] | None) -> None:
        """Send a peer's datagrams through ``send`` while it has no UDP endpoint.

        ``send`` is called from a forwarding thread with one sealed datagram at a time; it must not
        block for long (queue the bytes to a stream writer).
        """
        self._peers[peer_id].fallback = send

    def _publish(self, peers: dict[str, Peer]) -> None:
        # the threads only read these maps; replacing them whole keeps every read consistent
        self._by_vip = {p.vip_bytes: p for p in peers.values()}
        self._by_key_id = {p.receive.key_id: p for p in peers.values()}
        self._routed = [(net, p) for p in peers.values() for net in p.networks]
        self._peers = peers

    def _route(self, destination: bytes) -> Peer | None:
        """The peer a packet to ``destination`` (4 bytes) goes to: its VIP's holder, else the first
        peer with a routed network holding it; None if nobody."""
        peer = self._by_vip.get(destination)
        if peer is None and self._routed:
            address = ipaddress.IPv4Address(destination)
            for network, candidate in self._routed:
                if address in network:
                    return candidate
        return peer
