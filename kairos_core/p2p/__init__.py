"""The libp2p adapter: the only package that imports trio or libp2p.

:class:`P2PHost` runs a py-libp2p host (TCP, noise, yamux, gossipsub, Kademlia DHT) in a trio
thread and offers it to the asyncio core; :class:`Stream` is a libp2p stream seen from asyncio.
Every peer must pass admission (``/kairos/admit/1.0.0``, :mod:`.admission`) before its gossip,
DHT requests or streams reach us. Nodes behind NAT learn so (:mod:`.reachability`) and are
reached through relays (:mod:`.relay`).
"""

from .admission import ADMIT_PROTOCOL
from .errors import AdmissionError, P2PError
from .host import P2PHost
from .relay import RelayLimits
from .stream import Stream

__all__ = ["ADMIT_PROTOCOL", "AdmissionError", "P2PError", "P2PHost", "RelayLimits", "Stream"]
