"""kairos tunvpn plugin: a TUN device per node and a sealed, loss-robust UDP data plane.

Modules: :mod:`.tun` (the device), :mod:`.vnet` (virtio-net headers, TSO splitting and
receive coalescing), :mod:`.crypto` (per-pair session keys, counter nonces, replay window,
rekeying), :mod:`.dataplane` (the forwarder threads), :mod:`.plugin` (kairos hooks).
"""

from .crypto import ReplayWindow, SessionKeys
from .dataplane import DataPlane
from .tun import TunDevice, TunUnavailable

__all__ = ["DataPlane", "ReplayWindow", "SessionKeys", "TunDevice", "TunUnavailable"]
