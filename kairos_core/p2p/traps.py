"""py-libp2p 0.8.1 defaults we override, in one place (see reference/py-libp2p-0.8.md).

Each function here changes something libp2p does not let us pass in: process-wide module globals
(pubsub queue sizes, the signed-record check) or options of the kernel socket under a connection.
"""

from __future__ import annotations

import socket
from typing import Any

from libp2p.pubsub import pubsub as pubsub_module
from libp2p.pubsub.rpc_queue import RpcQueue

# Dead-connection detection (see enable_keepalive): probe after 4 s idle, every 1 s, 3 times.
KEEPALIVE_IDLE = 4
KEEPALIVE_INTERVAL = 1
KEEPALIVE_COUNT = 3
KEEPALIVE_DEAD = KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT

# Room for the pubsub envelope (ids, signature, key, seqno) around the payload.
PUBSUB_OVERHEAD = 64 * 1024
OUTBOUND_QUEUE = 4096
SUBSCRIPTION_QUEUE = 4096


class RoomyRpcQueue(RpcQueue):
    """gossipsub's per-peer outbound queue, sized for a busy ledger rather than 32 RPCs (trap 3)."""

    max_message_bytes = 1 << 20

    def __init__(self, max_size: int = OUTBOUND_QUEUE, max_message_size: int | None = None) -> None:
        super().__init__(max_size=max_size, max_message_size=max_message_size or self.max_message_bytes)


def size_pubsub_queues(max_message_size: int) -> None:
    """Process-wide: libp2p builds these queues with module defaults we cannot pass in."""
    RoomyRpcQueue.max_message_bytes = max(RoomyRpcQueue.max_message_bytes, max_message_size + PUBSUB_OVERHEAD)
    pubsub_module.RpcQueue = RoomyRpcQueue
    pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = max(pubsub_module.SUBSCRIPTION_CHANNEL_SIZE, SUBSCRIPTION_QUEUE)


SIGNED_RECORDS_REMEMBERED = 4096


def verify_signed_records_once() -> None:
    """Process-wide: check each peer's signed peer record once, not on every pubsub RPC.

    py-libp2p attaches the sender's signed record to every RPC and verifies it (an ed25519
    signature) on every receipt — ~5% of a node's CPU under ledger load, for bytes that rarely
    change. A record byte-identical to one that already verified for that host and peer is
    accepted without checking again; anything else goes through libp2p's own check.
    """
    from libp2p.pubsub import gossipsub as gossipsub_module
    from libp2p.pubsub import utils as pubsub_utils

    original = pubsub_utils.maybe_consume_signed_record
    if getattr(pubsub_module.maybe_consume_signed_record, "kairos_cached", False):
        return
    verified: dict[tuple[int, Any], bytes] = {}

    def consume_once(msg: Any, host: Any, peer_id: Any) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        key = (id(host), peer_id)
        if verified.get(key) == msg.senderRecord:
            return True
        accepted = original(msg, host, peer_id)
        if accepted:
            if len(verified) >= SIGNED_RECORDS_REMEMBERED:
                verified.clear()
            verified[key] = msg.senderRecord
        return accepted

    consume_once.kairos_cached = True  # type: ignore[attr-defined]
    pubsub_module.maybe_consume_signed_record = consume_once
    gossipsub_module.maybe_consume_signed_record = consume_once


def enable_keepalive(conn: Any) -> bool:
    """Make the kernel notice a dead peer within ~KEEPALIVE_DEAD seconds; False if no socket was found.

    A partition (or a peer whose machine vanished) sends no FIN or RST: without this a connection
    looks alive for the ~15 minutes TCP retransmits for, and so would the peer in our membership.
    Keepalive probes cost ~40 bytes/s per idle connection; TCP_USER_TIMEOUT covers a connection
    with unacknowledged data.
    """
    node = conn
    for _ in range(10):  # SwarmConn → Yamux → SecureSession → … → trio SocketStream → socket
        if hasattr(node, "setsockopt") and hasattr(node, "family"):
            try:
                node.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                node.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
                node.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
                node.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
                node.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, KEEPALIVE_DEAD * 1000)
            except OSError:
                return False
            return True
        node = next((getattr(node, name) for name in ("muxed_conn", "secured_conn", "conn", "stream", "socket")
                     if getattr(node, name, None) is not None), None)
        if node is None:
            return False
    return False
