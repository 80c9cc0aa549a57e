"""The data plane as a node drives it: VIPs that move, and proof that UDP gets through.

:class:`NodeDataPlane` adds to :class:`~.dataplane.DataPlane` what the node integration needs
and the standalone forwarder does not:

- :meth:`set_vip` changes a peer's VIP *without* resetting its keys. Re-adding a peer with the
  same keys would restart its packet counter and so reuse AES-GCM nonces; keys only ever change
  through a new exchange.
- :meth:`park` moves a peer off the VIP space (its VIP lost a conflict and it has no new one yet):
  nothing routes to it and nothing it sends passes the source check.
- :meth:`udp_heard` says when the last *authentic* datagram of a peer arrived over UDP (the
  replay windows only move for authentic datagrams, so forged ones cannot fake it), and
  :meth:`rx_mark` changes whenever anything authentic arrived, by UDP or by the fallback.
"""

from __future__ import annotations

import ipaddress
import itertools
import time

from .dataplane import HEADER_BYTES, WIRE_HEADER, DataPlane, Peer

_parking = itertools.count(1)


def parking_address() -> ipaddress.IPv4Address:
    """A fresh address in 0.0.0.0/8: never a destination on the VPN, never a valid source."""
    return ipaddress.IPv4Address(next(_parking) % (1 << 24) or next(_parking))


def _mark(peer: Peer) -> tuple[int, int, int]:
    receive = peer.receive
    previous = receive.previous
    return (receive.current.number, receive.current.window.highest, previous.window.highest if previous else -1)


class NodeDataPlane(DataPlane):
    """A :class:`DataPlane` with movable VIPs and per-peer UDP liveness."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._udp_heard: dict[str, float] = {}

    def has_peer(self, peer_id: str) -> bool:
        """True if ``peer_id`` has a session in the data plane."""
        return peer_id in self._peers

    def vip_of(self, peer_id: str) -> ipaddress.IPv4Address | None:
        """The VIP the data plane routes to ``peer_id`` (a parked address while it has none)."""
        peer = self._peers.get(peer_id)
        return peer.vip if peer else None

    def endpoint_of(self, peer_id: str) -> tuple[str, int] | None:
        """The UDP address datagrams to ``peer_id`` go to now (None: the fallback)."""
        peer = self._peers.get(peer_id)
        return peer.endpoint if peer else None

    def set_vip(self, peer_id: str, vip: ipaddress.IPv4Address | str) -> None:
        """Route ``vip`` to ``peer_id`` from now on, keeping its session.

        :raises ValueError: if another peer holds ``vip`` in the data plane.
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

    def park(self, peer_id: str) -> None:
        """Give ``peer_id`` a unique address in 0.0.0.0/8, which never appears on the VPN."""
        self.set_vip(peer_id, parking_address())

    def rx_mark(self, peer_id: str) -> tuple[int, int, int] | None:
        """A value that changes whenever an authentic datagram of ``peer_id`` arrived."""
        peer = self._peers.get(peer_id)
        return _mark(peer) if peer else None

    def udp_heard(self, peer_id: str) -> float | None:
        """``time.monotonic()`` of the last authentic datagram from ``peer_id`` over UDP."""
        return self._udp_heard.get(peer_id)

    def _open_train(self, view: memoryview, n: int, size: int, address: tuple[str, int]) -> None:
        # Only UDP arrivals come through here (fallback injections do not): note which peer's
        # replay window moved, i.e. which peer proved itself over UDP.
        peer = None
        if n >= HEADER_BYTES:
            peer = self._by_key_id.get(WIRE_HEADER.unpack_from(view)[4])
        before = _mark(peer) if peer is not None else None
        super()._open_train(view, n, size, address)
        if peer is not None and _mark(peer) != before:
            self._udp_heard[peer.peer_id] = time.monotonic()
