"""The TUN device: create it, give it offloads, an address, an MTU and routes; remove it on close.

The device is opened with ``IFF_TUN | IFF_NO_PI`` and, by default, ``IFF_VNET_HDR`` with
``CSUM|TSO4|TSO6`` offloads: the kernel then hands us TCP super-frames of up to ``gso_max_size``
bytes (one read per ~45 packets) and accepts super-frames on write. The device is not persistent:
closing its last queue removes it.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import struct
from collections.abc import Iterable

from kairos_core.plugin import KairosError

from .vnet import VNET_HDR_LEN

TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
DEFAULT_NAME = "edgevpn0"
DEFAULT_MTU = 1420


class TunUnavailable(KairosError):
    """No TUN device can be made here (no /dev/net/tun, or no CAP_NET_ADMIN)."""


class TunDevice:
    """An open TUN device with one or more queues (file descriptors).

    Build it with :meth:`create`. ``vnet_hdr`` says whether reads and writes carry a
    virtio-net header; ``queues`` are the fds (more than one only with ``multi_queue``).
    """

    def __init__(self, name: str, queues: list[int], vnet_hdr: bool, mtu: int) -> None:
        self.name = name
        self.queues = queues
        self.vnet_hdr = vnet_hdr
        self.mtu = mtu
        self.closed = False

    @property
    def fd(self) -> int:
        """The first queue's file descriptor."""
        return self.queues[0]

    @classmethod
    def create(
        cls,
        name: str = DEFAULT_NAME,
        *,
        address: str | ipaddress.IPv4Interface | None = None,
        mtu: int = DEFAULT_MTU,
        routes: Iterable[str | ipaddress.IPv4Network] = (),
        offload: bool = True,
        queues: int = 1,
        gso_max_size: int | None = None,
    ) -> "TunDevice":
        """Create the device ``name``, configure it and bring it up.

        :param address: the node's virtual IP with prefix (``"10.1.0.5/24"``) — its subnet route
            comes with it.
        :param routes: extra networks routed into the device.
        :param offload: open with ``IFF_VNET_HDR`` and CSUM/TSO offloads (super-frame reads).
        :param queues: number of queues; more than one opens the device ``IFF_MULTI_QUEUE``.
        :param gso_max_size: largest super-frame the kernel may hand us; by default
            :func:`default_gso_max_size` of ``mtu``.
        :raises TunUnavailable: without ``/dev/net/tun`` or ``CAP_NET_ADMIN``.
        """
        if len(name.encode()) > 15:
            raise ValueError(f"interface name {name!r} is longer than 15 bytes")
        flags = IFF_TUN | IFF_NO_PI
        if offload:
            flags |= IFF_VNET_HDR
        if queues > 1:
            flags |= IFF_MULTI_QUEUE
        fds: list[int] = []
        try:
            for _ in range(queues):
                fds.append(_open_queue(name, flags, offload))
            device = cls(name, fds, offload, mtu)
            device._configure(address, mtu, routes, gso_max_size if gso_max_size else default_gso_max_size(mtu))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return device

    def _configure(
        self,
        address: str | ipaddress.IPv4Interface | None,
        mtu: int,
        routes: Iterable[str | ipaddress.IPv4Network],
        gso_max_size: int,
    ) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=self.name)[0]
            ipr.link("set", index=index, mtu=mtu)
            if self.vnet_hdr:
                try:
                    ipr.link("set", index=index, gso_max_size=gso_max_size)
                except Exception:  # older kernels: the default 64 KB still works, sends are split
                    pass
            if address is not None:
                interface = ipaddress.IPv4Interface(address)
                ipr.addr("add", index=index, address=str(interface.ip), prefixlen=interface.network.prefixlen)
            ipr.link("set", index=index, state="up")
            for network in routes:
                net = ipaddress.ip_network(network)
                ipr.route("replace", dst=str(net.network_address), dst_len=net.prefixlen, oif=index)

    def close(self) -> None:
        """Close every queue; the kernel removes the (non-persistent) device with the last one."""
        if self.closed:
            return
        self.closed = True
        for fd in self.queues:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "TunDevice":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_gso_max_size(mtu: int, overhead: int = 32) -> int:
    """The super-frame size whose segments, each sealed, fit one UDP GSO send (65,507 bytes)."""
    segments = 65507 // (mtu + overhead)
    return max(mtu, min(65536, segments * (mtu - 40)))


def _open_queue(name: str, flags: int, offload: bool) -> int:
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunUnavailable(f"TUN unavailable: {TUN_PATH} does not exist (load the tun module)") from None
    except PermissionError:
        raise TunUnavailable(f"TUN unavailable: no permission to open {TUN_PATH}") from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        if offload:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
    except OSError as error:
        os.close(fd)
        if error.errno == errno.EPERM:
            raise TunUnavailable(f"TUN unavailable: creating {name} needs CAP_NET_ADMIN") from None
        if error.errno == errno.EBUSY:
            raise TunUnavailable(f"TUN unavailable: {name} exists and is busy") from None
        raise TunUnavailable(f"TUN unavailable: {name}: {error.strerror}") from None
    return fd
