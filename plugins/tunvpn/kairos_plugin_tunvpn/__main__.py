"""A standalone forwarder with static keys, for tests and benchmarks (not the node integration).

Usage: ``python -m kairos_plugin_tunvpn '<json config>'``::

    {"name": "kvpn0", "address": "10.201.0.1/24", "mtu": 1420, "bind": ["10.99.0.1", 5555],
     "secret": "<hex>", "local_id": "a", "offload": true, "udp_gso": true, "udp_gro": true,
     "coalesce": true, "pure_python": false, "peers": [{"id": "b", "vip": "10.201.0.2", "endpoint": ["10.99.0.2", 5555]}]}

Prints ``{"ready": true, ...}`` once forwarding, then answers each ``counters`` line on stdin with
a JSON line of counters; stops and removes the device at end of input.
"""

from __future__ import annotations

import json
import os
import sys

from .crypto import SessionKeys
from .fastpath import FASTPATH_ENV
from .dataplane import DataPlane
from .tun import TunDevice, TunUnavailable


def main(argv: list[str]) -> int:
    """Run the forwarder described by the JSON config in ``argv[0]`` until stdin closes."""
    config = json.loads(argv[0])
    if config.get("pure_python"):  # the bench compares both paths
        os.environ[FASTPATH_ENV] = "1"
    try:
        tun = TunDevice.create(
            config.get("name", "kvpn0"),
            address=config.get("address"),
            mtu=int(config.get("mtu", 1420)),
            offload=bool(config.get("offload", True)),
        )
    except TunUnavailable as error:
        print(json.dumps({"ready": False, "error": str(error)}), flush=True)
        return 1
    secret = bytes.fromhex(config["secret"])
    plane = DataPlane(
        tun,
        tuple(config["bind"]),
        udp_gso=bool(config.get("udp_gso", True)),
        udp_gro=bool(config.get("udp_gro", True)),
        coalesce=bool(config.get("coalesce", True)),
    )
    for peer in config.get("peers", []):
        endpoint = tuple(peer["endpoint"]) if peer.get("endpoint") else None
        plane.add_peer(peer["id"], peer["vip"], endpoint, SessionKeys.derive(secret, config["local_id"], peer["id"]))
    plane.start()
    print(
        json.dumps({"ready": True, "udp": list(plane.local_address), "udp_gro": plane.udp_gro, "fastpath": plane.fastpath}),
        flush=True,
    )
    try:
        for line in sys.stdin:
            if line.strip() == "counters":
                print(json.dumps(plane.counters), flush=True)
    finally:
        plane.stop()
        tun.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
