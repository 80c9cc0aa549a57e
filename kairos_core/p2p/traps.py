"""py-libp2p 0.8.1 defaults and flaws we override, in one place.

Each function here changes something libp2p does not let us pass in: process-wide module globals
(pubsub queue sizes, the signed-record check), per-swarm state the constructor does not expose
(its dial retries and negative cache, its inbound-connection slots), per-router state that ignores
the message ids we chose (gossipsub's message cache and equivocation check). The options of the
kernel socket under a connection are in :mod:`.keepalive`.
"""

from __future__ import annotations

import hashlib
import time
import weakref
from typing import Any, Callable

import trio
from libp2p.network.config import RetryConfig
from libp2p.network.exceptions import SwarmException
from libp2p.pubsub import pubsub as pubsub_module
from libp2p.pubsub.mcache import CacheEntry, MessageCache
from libp2p.pubsub.rpc_queue import RpcQueue

from .keepalive import connection_layers

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


# --- gossip message ids ---------------------------------------------------------------------------
# Without libp2p signatures (see host.py) a message's ``from_id`` and ``seqno`` are whatever the
# forwarder wrote, and seqnos are a visible counter: libp2p's default id, ``from_id + seqno``, let an
# insider publish first under a victim's next ids, so that everyone dropped the victim's real
# messages as seen (issue #12, Medium 6). Our ids hash the payload too: a sealed frame carries a
# random nonce, so an id can only be taken by publishing the very same bytes.
# The first byte is not ASCII, so libp2p's IHAVE/IWANT parser never mistakes an id for hex text.
MESSAGE_ID_PREFIX = b"\xc3"
MESSAGE_ID_DIGEST = 20


def content_message_id(msg: Any) -> bytes:
    """A gossip message's id: a hash over its ``from_id``, ``seqno`` and data.

    ``from_id`` and ``seqno`` stay in so that one publisher sending the same bytes twice sends two
    messages; each field is length-prefixed, so no two messages share the hashed string.
    """
    digest = hashlib.sha256()
    for field in (msg.from_id, msg.seqno, msg.data):
        digest.update(len(field).to_bytes(8, "big"))
        digest.update(field)
    return MESSAGE_ID_PREFIX + digest.digest()[:MESSAGE_ID_DIGEST]


class ContentAddressedCache(MessageCache):
    """gossipsub's message cache (IHAVE gossip, IWANT answers) under :func:`content_message_id`.

    libp2p's cache keys messages by ``from_id + seqno`` whatever id pubsub uses: a claimed id would
    keep the victim's message out of it, and the ids it gossips would match nothing peers saw.
    """

    def put(self, msg: Any) -> None:
        """Remember ``msg`` for the gossip window under its content id."""
        mid = content_message_id(msg)
        if mid in self.msgs:
            return
        self.msgs[mid] = msg
        self.history[0].append(CacheEntry(mid, msg.topicIDs))


def ids_over_content(gossipsub: Any) -> None:
    """Per router: its message cache and equivocation check follow :func:`content_message_id`.

    gossipsub refuses to forward a message whose ``from_id + seqno`` came before with other data
    ("equivocation") and blames that ``from_id``. Unsigned, that is only a way for an insider to
    stop a victim's messages one hop out and to lower the victim's score; it is switched off.
    """
    old = gossipsub.mcache
    gossipsub.mcache = ContentAddressedCache(old.window_size, old.history_size)
    gossipsub._check_equivocation = lambda msg: True


def validate_each_message_once(pubsub: Any, counters: Any, *, event: Callable[[], Any] = trio.Event) -> None:
    """Per pubsub: a message arriving from several mesh peers at once is validated, delivered and
    forwarded once.

    libp2p's ``push_msg`` checks the seen-cache, awaits the validators, and only then marks the
    message seen: every copy that arrives meanwhile — one from each mesh peer, within a millisecond
    of each other — passes the check too, is delivered again and forwarded again to the whole mesh.
    At N = 10 an idle node received each lease renewal five times and sent 4x the gossip it needed,
    growing with the mesh. Now a copy whose id is in flight waits for that validation to end
    (``gossip_duplicates_in_flight``), then meets the seen-cache; if the first copy was refused (its
    forwarder, say, not admitted yet), the waiting copy is validated on its own, as before.
    """
    original = pubsub.push_msg
    in_flight: dict[bytes, Any] = {}

    async def push_msg(forwarder: Any, msg: Any) -> None:
        msg_id = pubsub._msg_id_constructor(msg)
        if msg_id in in_flight:
            counters["gossip_duplicates_in_flight"] += 1
            while msg_id in in_flight:
                await in_flight[msg_id].wait()
        done = in_flight[msg_id] = event()
        try:
            await original(forwarder, msg)
        finally:
            del in_flight[msg_id]
            done.set()

    pubsub.push_msg = push_msg


def drop_sender_records(pubsub: Any) -> None:
    """Per pubsub: no signed peer record on the RPCs it writes.

    py-libp2p attaches the sender's signed peer record (~210 bytes) to every gossip RPC, a third of
    an idle node's gossip bytes. Receivers use it only to learn the sender's addresses, which our
    peers learn from identify and from the ledger, and for peer exchange, which is off.
    """
    original = pubsub.write_msg

    async def write_msg(stream: Any, rpc: Any) -> bool:
        if rpc.HasField("senderRecord"):
            rpc.ClearField("senderRecord")
        return await original(stream, rpc)

    pubsub.write_msg = write_msg


SENDER_RECORD_REUSE = 10.0  # seconds a built sender record is handed out again as it is


def build_sender_records_rarely() -> None:
    """Process-wide: pubsub builds its signed peer record at most every SENDER_RECORD_REUSE
    seconds per host, not for every RPC.

    py-libp2p builds the record for every RPC it publishes or forwards: it parses and compares the
    host's listen addresses against the cached record each time (``env_to_send_in_RPC``) —
    6-9 % of a busy node's libp2p thread at N = 50. Most of those RPCs then lose the record
    (:func:`drop_sender_records`); the subscription RPCs keep it, and a receiver that cannot
    parse one drops the whole RPC, so the record handed out is always a real one, at most a few
    seconds old. Identify keeps libp2p's own function.
    """
    from libp2p.pubsub import gossipsub as gossipsub_module

    original = getattr(pubsub_module.env_to_send_in_RPC, "kairos_original", pubsub_module.env_to_send_in_RPC)
    # per host object (weakly: a test process makes many hosts, and a record handed to another
    # host's RPCs would make every receiver drop them)
    built: weakref.WeakKeyDictionary[Any, tuple[float, bytes]] = weakref.WeakKeyDictionary()

    def reuse_record(host: Any) -> tuple[bytes, bool]:
        now = time.monotonic()
        cached = built.get(host)
        if cached is not None and now - cached[0] < SENDER_RECORD_REUSE:
            return cached[1], False
        record, fresh = original(host)
        built[host] = (now, record)
        return record, fresh

    reuse_record.kairos_original = original  # type: ignore[attr-defined]
    pubsub_module.env_to_send_in_RPC = reuse_record
    gossipsub_module.env_to_send_in_RPC = reuse_record


def batch_window_updates() -> None:
    """Process-wide: yamux gives back receive window once half of it is consumed, as go-yamux does.

    py-libp2p's yamux sends a WINDOW_UPDATE frame after every read of a stream whose window is not
    yet half consumed ("partial slack"); pubsub reads each message's length one byte at a time and
    then its body, so every gossip message received cost two or three extra TCP segments back (and
    their ACKs) — at idle a third of a node's packets. The sender can still always send half a
    window (128 KiB by default) before it waits, and the window grows when it is used up.
    """
    from libp2p.stream_muxer.yamux import yamux as yamux_module

    stream_class = yamux_module.YamuxStream
    if getattr(stream_class, "kairos_batched_window", False):
        return

    async def window_update_when_half_consumed(self: Any, *, bytes_read: int = 0) -> None:
        total = 0
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            consumed = self.target_recv_window - (self.recv_window + buffered)
            if consumed > 0 and consumed >= self._grow_threshold():
                total = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
                self._pending_recv_release = 0
        if total > 0:
            await self.send_window_update(total, skip_lock=True)

    stream_class._auto_tune_and_send_window_update = window_update_when_half_consumed
    stream_class.kairos_batched_window = True


# --- dialling ------------------------------------------------------------------------------------
# A TCP connect to a host behind a partition gets no answer: without a bound the kernel retries the
# SYN for ~2 minutes at doubling intervals, every later dial of that peer waits for it (libp2p
# joins dials in flight), and after a heal the next SYN may not leave for another minute.
DIAL_TIMEOUT = 5.0


def own_dial_retries(swarm: Any) -> None:
    """Per swarm: one attempt per dial; the node's dialler owns retries and back-off.

    libp2p retries a failed address three more times (logging each), then puts the peer in a
    negative cache that fails every dial of it for 60 s without sending a packet — across a
    partition that outlives the heal. :func:`forget_dial_failures` lifts it before each dial.
    """
    swarm.retry_config = RetryConfig(max_retries=0)


def forget_dial_failures(swarm: Any, peer_id: Any) -> None:
    """Before a deliberate dial: drop ``peer_id`` from libp2p's negative cache."""
    unblock = getattr(swarm, "unblock_peer", None)
    if callable(unblock):
        unblock(peer_id)


def refuse_implicit_dials(host: Any, counters: Any, *, may_dial: frozenset[str] = frozenset()) -> None:
    """Per host: a stream to a peer with no connection fails instead of dialling it.

    libp2p's ``new_stream`` dials a peer it has no connection to, from whatever addresses its
    peerstore holds — so every component that opens a stream (pubsub registering a peer, the
    DHT's table pings, a sync session or a reachability probe racing a trim, the admission's own
    stream on a connection that just closed) could reopen a connection the connection manager had
    just closed, behind its back. At N = 50 the network admitted 5.7 connections a second while
    the dialler made 0.4; the rest were these, each admitted, pushed over ``high`` and trimmed
    again. Deliberate dials go through :meth:`kairos_core.p2p.P2PHost.connect` (the dialler,
    ``open_stream`` of a member that is not a neighbour), which does not come here; the
    protocols in ``may_dial`` (Kademlia: its walks must reach peers beyond the neighbours) still
    dial. Refusals are counted (``implicit_dials_refused``).
    """
    new_stream = host.new_stream
    network = host.get_network()

    async def new_stream_on_a_connection(peer_id: Any, protocol_ids: Any) -> Any:
        if not network.get_connections(peer_id) and not may_dial.intersection(str(p) for p in protocol_ids):
            counters["implicit_dials_refused"] += 1
            raise SwarmException(f"not connected to {peer_id}: streams do not dial")
        return await new_stream(peer_id, protocol_ids)

    host.new_stream = new_stream_on_a_connection


def no_auto_connector(swarm: Any) -> None:
    """Per swarm, before it runs: libp2p's auto-connector dials nobody.

    Every 30 s it dials up to 16 peers of the peerstore (whoever identify, the DHT or a dial ever
    put there) while the swarm holds fewer connections than the middle of its watermarks — 150
    with ``low_watermark=0`` and the default high of 300, so always. At N = 50 those dials were
    the network's connections: 7 admissions a second against 0.6 dials of our dialler, each
    one over ``high``, trimmed, and dialled again by the next round. The dial manager owns the
    degree (:mod:`kairos_core.connections`).
    """
    connector = getattr(swarm, "auto_connector", None)
    if connector is None:
        return

    async def connect_nobody() -> None:
        return None

    connector.maybe_connect = connect_nobody


# An accepted connection that the swarm does not track this long after it arrived is an orphan
# (see InboundSlots.sweep); an upgrade in progress is done well within it.
ORPHAN_GRACE = 15.0
SWEEP_INTERVAL = 5.0


class InboundSlots:
    """Frees libp2p's inbound-connection slot when that connection ends.

    py-libp2p 0.8.1 takes a slot of ``Swarm._inbound_limiter`` (capacity ``max_connections -
    min_connections``) for each accepted connection and its handler then waits for the *swarm* to
    finish, so the slot — and the handler's task with its buffers — is only given back when the
    host stops: after 300 accepted connections, ordinary churn or an outsider's handshakes, every
    inbound connection is refused until restart. This wraps the swarm's handler in a cancel scope
    per connection; ending the handler releases the slot and closes the socket (trio closes a
    listener's stream when its handler returns). Handlers end

    - when the connection closes (:meth:`closed`, from the disconnect notification, matched
      through the connection's layers, :func:`connection_layers`);
    - or when the swarm has stopped tracking the connection without telling anyone — its races
      between a dial and an accept of the same peer drop connections from its records and leave
      their sockets open (:meth:`sweep`, every ``SWEEP_INTERVAL`` seconds).
    """

    def __init__(self, swarm: Any) -> None:
        self._swarm = swarm
        self._handlers: dict[int, tuple[trio.CancelScope, float]] = {}
        self.orphans_closed = 0
        handle_inbound = swarm._handle_inbound_connection

        async def handle_until_closed(read_write_closer: Any, maddr: Any) -> None:
            key = id(read_write_closer)
            with trio.CancelScope() as scope:
                self._handlers[key] = (scope, trio.current_time())
                try:
                    await handle_inbound(read_write_closer, maddr)
                finally:
                    self._handlers.pop(key, None)

        swarm._handle_inbound_connection = handle_until_closed

    def __len__(self) -> int:
        """Inbound connections whose handler still runs."""
        return len(self._handlers)

    def closed(self, conn: Any) -> None:
        """Trio side: ``conn`` is gone; end its inbound handler if it has one."""
        for layer in connection_layers(conn):
            handler = self._handlers.get(id(layer))
            if handler is not None:
                handler[0].cancel()
                return

    def sweep(self) -> int:
        """Trio side: end the handlers of accepted connections the swarm no longer tracks."""
        tracked = {id(layer) for conn in self._swarm.get_connections() for layer in connection_layers(conn)}
        now, ended = trio.current_time(), 0
        for key, (scope, started) in list(self._handlers.items()):
            if key not in tracked and now - started > ORPHAN_GRACE:
                scope.cancel()
                ended += 1
        self.orphans_closed += ended
        return ended

    async def sweep_forever(self) -> None:
        """Trio side: :meth:`sweep` every ``SWEEP_INTERVAL`` seconds until cancelled."""
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            self.sweep()
