"""The data plane as a node drives it: VIPs that lose a conflict are parked.

:class:`NodeDataPlane` is a :class:`~.dataplane.DataPlane` plus :meth:`NodeDataPlane.park`, which
moves a peer off the VIP space while its VIP lost a conflict and it has no new one yet: nothing
routes to it and nothing it sends passes the source check. Everything else the node needs —
moving a VIP without a key reset (:meth:`~.dataplane.DataPlane.set_vip`), when a peer was last
heard over UDP or by any path (:meth:`~.dataplane.DataPlane.udp_heard`,
:meth:`~.dataplane.DataPlane.last_heard`), stream-carried datagrams
(:meth:`~.dataplane.DataPlane.inject_batch_from_fallback`) — is public on the data plane itself.
"""

from __future__ import annotations

import ipaddress
import itertools

from .dataplane import DataPlane

_parking = itertools.count(1)


def parking_address() -> ipaddress.IPv4Address:
    """A fresh address in 0.0.0.0/8: never a destination on the VPN, never a valid source."""
    return ipaddress.IPv4Address(next(_parking) % (1 << 24) or next(_parking))


class NodeDataPlane(DataPlane):
    """A :class:`DataPlane` whose peers can be parked off the VIP space."""

    def park(self, peer_id: str) -> None:
        """Give ``peer_id`` a unique address in 0.0.0.0/8, which never appears on the VPN."""
        self.set_vip(peer_id, parking_address())
