"""Finding peers: mDNS on the LAN (:mod:`.mdns`); DHT rendezvous and static bootstrap peers elsewhere.

Discovery only reports ``(peer_id, multiaddrs)``; the caller dials and admits.
"""

from .mdns import SERVICE_TYPE, MDNSCounters, MDNSDiscovery

__all__ = ["SERVICE_TYPE", "MDNSCounters", "MDNSDiscovery"]
