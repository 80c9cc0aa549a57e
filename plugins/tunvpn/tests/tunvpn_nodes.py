"""In-process VPN nodes for tests: TUNs replaced by socket pairs, and a quick VPN config."""

from __future__ import annotations

import ipaddress
import socket

from kairos_plugin_tunvpn.nodeplane import NodeDataPlane
from kairos_plugin_tunvpn.tun import TunDevice
from kairos_plugin_tunvpn.vnet import GSO_NONE, VNET_HDR, VNET_HDR_LEN
from tunvpn_packets import icmp_echo


class FakeTuns:
    """One socket pair per node in place of its TUN; the test holds the other end."""

    def __init__(self) -> None:
        self.ends: dict[str, socket.socket] = {}
        self.devices: list[TunDevice] = []

    def make_plane(self, vpn) -> NodeDataPlane:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setblocking(False)
        device = TunDevice("fake", [theirs.detach()], vnet_hdr=True, mtu=1420)
        self.devices.append(device)
        self.ends[vpn.peer_id] = ours
        return NodeDataPlane(device, ("127.0.0.1", 0))

    def keepalive(self, vpn, vip: ipaddress.IPv4Address) -> None:
        self.inject(vpn.peer_id, bytes(icmp_echo(src=vpn.address.ip.packed, dst=vip.packed, payload=b"keepalive")))

    def inject(self, peer_id: str, packet: bytes) -> None:
        """Hand ``packet`` to the node's data plane as if the kernel had routed it into the TUN."""
        self.ends[peer_id].send(VNET_HDR.pack(0, GSO_NONE, 0, 0, 0, 0) + packet)

    def received(self, peer_id: str) -> list[bytes]:
        """Packets the node's data plane wrote to its TUN since the last call."""
        out = []
        while True:
            try:
                out.append(self.ends[peer_id].recv(70000)[VNET_HDR_LEN:])
            except BlockingIOError:
                return out

    def close(self) -> None:
        for device in self.devices:
            device.close()
        for end in self.ends.values():
            end.close()


def vpn_config(**options):
    return {"vpn": {"keepalive_interval": 0.2, "udp_timeout": 1.0, **options}}
