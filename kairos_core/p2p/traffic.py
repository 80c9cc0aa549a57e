"""What a host sends and receives, by libp2p protocol and by gossip topic and control message.

A node's idle cost is the sum of many small periodic things (gossip heartbeats, identify, sync
digests, DHT rounds, keepalives); the interface counters say how much, these counters say what.
They are the host's ``counters`` (``kairos status --json`` shows them prefixed ``p2p_``):

- ``out_bytes:<protocol>`` / ``in_bytes:<protocol>``: payload bytes written to / read from the
  streams of each protocol (what yamux carries; noise, yamux and TCP/IP headers and TCP
  keepalive probes come on top and only the interface counters see them);
- ``out_writes:<protocol>``: stream writes (roughly frames) per protocol;
- ``streams:<protocol>``: streams negotiated per protocol, both directions;
- ``gossip_out_rpcs``, ``gossip_out_messages``, ``gossip_out_message_bytes``,
  ``gossip_out_ihave_ids``, ``gossip_out_iwant_ids``, ``gossip_out_graft``, ``gossip_out_prune``,
  ``gossip_out_idontwant_ids``, ``gossip_out_subscriptions``, ``gossip_out_sender_record_bytes``:
  what the gossipsub RPCs this host writes contain.

Counting costs a dict update per stream read or write. libp2p gives no per-stream hook, so the
stream class is patched once per process and finds the counters of the host a stream belongs to
through its swarm (each host registers its own).
"""

from __future__ import annotations

import weakref
from typing import Any, MutableMapping

_counters_of_swarm: "weakref.WeakKeyDictionary[Any, MutableMapping[str, int]]" = weakref.WeakKeyDictionary()


def _counters(stream: Any) -> MutableMapping[str, int] | None:
    swarm = getattr(getattr(stream, "muxed_conn", None), "swarm", None)
    if swarm is None:
        return None
    try:
        return _counters_of_swarm.get(swarm)
    except TypeError:
        return None


def _patch_net_stream() -> None:
    from libp2p.network.stream.net_stream import NetStream

    if getattr(NetStream, "kairos_counted", False):
        return
    original_read, original_write, original_set_protocol = NetStream.read, NetStream.write, NetStream.set_protocol

    async def read(self: Any, n: int | None = None) -> bytes:
        data = await original_read(self, n)
        counters = _counters(self)
        if counters is not None and data:
            counters[f"in_bytes:{self.protocol_id}"] += len(data)
        return data

    async def write(self: Any, data: bytes) -> None:
        await original_write(self, data)
        counters = _counters(self)
        if counters is not None:
            counters[f"out_bytes:{self.protocol_id}"] += len(data)
            counters[f"out_writes:{self.protocol_id}"] += 1

    def set_protocol(self: Any, protocol_id: Any) -> None:
        original_set_protocol(self, protocol_id)
        counters = _counters(self)
        if counters is not None:
            counters[f"streams:{protocol_id}"] += 1

    NetStream.read, NetStream.write, NetStream.set_protocol = read, write, set_protocol
    NetStream.kairos_counted = True


def count_traffic(network: Any, counters: MutableMapping[str, int]) -> None:
    """Count the stream traffic of the swarm ``network`` into ``counters`` (a defaultdict(int))."""
    _patch_net_stream()
    _counters_of_swarm[network] = counters


def count_gossip(pubsub: Any, counters: MutableMapping[str, int]) -> None:
    """Count what the gossipsub RPCs ``pubsub`` writes contain (messages, control, records)."""
    original = pubsub.write_msg

    async def write_msg(stream: Any, rpc: Any) -> bool:
        counters["gossip_out_rpcs"] += 1
        if rpc.publish:
            counters["gossip_out_messages"] += len(rpc.publish)
            counters["gossip_out_message_bytes"] += sum(len(msg.data) for msg in rpc.publish)
        if rpc.subscriptions:
            counters["gossip_out_subscriptions"] += len(rpc.subscriptions)
        if rpc.HasField("control"):
            control = rpc.control
            counters["gossip_out_ihave_ids"] += sum(len(i.messageIDs) for i in control.ihave)
            counters["gossip_out_iwant_ids"] += sum(len(i.messageIDs) for i in control.iwant)
            counters["gossip_out_graft"] += len(control.graft)
            counters["gossip_out_prune"] += len(control.prune)
            counters["gossip_out_idontwant_ids"] += sum(len(i.messageIDs) for i in control.idontwant)
        if rpc.HasField("senderRecord"):
            counters["gossip_out_sender_record_bytes"] += len(rpc.senderRecord)
        return await original(stream, rpc)

    pubsub.write_msg = write_msg
