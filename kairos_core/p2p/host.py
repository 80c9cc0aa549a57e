"""P2PHost: the one place where the asyncio core meets py-libp2p 0.8.1.

A host is a libp2p node (TCP, noise, yamux), gossipsub and a Kademlia DHT, running in its own
trio thread (see :mod:`.bridge`), with the admission gate (:mod:`.gate`, running the handshake of
:mod:`.admission`) in front of everything: gossip, the DHT and application streams are served to
admitted peers only. This module only builds and wires the host; who is admitted is the gate's.

The traps of py-libp2p 0.8.1 (``docs/architecture.md`` lists them) and where they are defused:

1. noise is the only security transport (x25519 static key) — :meth:`P2PHost._build`;
2. ``ConnectionConfig(max_connections_per_peer=1)`` — no fixed 250 ms wait per dial;
3. gossipsub spam limit and eclipse guard off (every peer is admitted), queues sized, heartbeat
   1 s — :meth:`P2PHost._build`, :func:`_size_pubsub_queues`;
4. both end-of-stream forms read as ``b""``; a raising stream handler is logged and its stream
   reset — :mod:`.stream`, :meth:`P2PHost._run_stream_handler`;
5. stop closes the host (listeners, connections), the services, and ``seen_messages``'s thread,
   then ends the trio run, which ends every task libp2p spawned — :meth:`P2PHost._serve`;
6. libp2p's mDNS is never enabled; wildcard listen addresses are expanded — :meth:`addresses`;
7. the DHT routing table is filled with every admitted peer and :meth:`add_dht_peer`;
8. libp2p logging propagates again, routine warnings demoted — :mod:`.logs`;
9. inbound-connection slots held until the host stops — :class:`.traps.InboundSlots`;
10. dials retried inside libp2p, then refused for 60 s by its negative cache, and TCP connects
    left to the kernel's two-minute SYN retries — one bounded attempt per deliberate dial, our
    dialler owns back-off (:func:`.traps.own_dial_retries`, :meth:`P2PHost._trio_connect`);
11. unsigned gossip ids are ``from_id + seqno``, which an insider can claim first — ids hash the
    content (:func:`.traps.content_message_id`, :func:`.traps.ids_over_content`), and the topic
    validator checks the forwarder is admitted and the payload is sealed before anything is
    forwarded (:meth:`P2PHost._gossip_validator`);
12. identify, identify-push and ping are served to anyone connected — every handler libp2p
    registers goes behind the gate (:meth:`P2PHost._guard_libp2p_handlers`);
13. pubsub marks a message seen only after its validators ran, so the copies of one message that
    mesh peers forward at once are all delivered and forwarded again — an id in flight counts as
    seen (:func:`.traps.validate_each_message_once`);
14. a signed peer record on every gossip RPC (~210 bytes), built again for each — built every 10 s,
    and dropped (:func:`.traps.build_sender_records_rarely`, :func:`.traps.drop_sender_records`);
15. yamux sends a window update after nearly every read (two or three per gossip message) — only
    once half the window is consumed, as go-yamux does (:func:`.traps.batch_window_updates`);
16. gossipsub's "adaptive gossip" sets the heartbeat to 30-60 s and widens the mesh when its health
    score drops — off (:meth:`P2PHost._build`);
17. a stream to a peer with no connection dials it, whoever opens it — only Kademlia's do
    (:func:`.traps.refuse_implicit_dials`); gossipsub dials the peers a PRUNE names — none
    (``px_peers_count=0``); deliberate dials are :meth:`P2PHost.connect`'s;
18. the swarm's auto-connector dials peerstore peers every 30 s up to the middle of its watermarks
    (150) — dials nobody (:func:`.traps.no_auto_connector`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import defaultdict
from typing import Any, Awaitable, Callable, Sequence

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto import ed25519, x25519
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.pubsub.pubsub_notifee import PubsubNotifee
from libp2p.pubsub.score import ScoreParams, TopicScoreParams
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from .. import multiaddrs
from ..identity import Identity
from ..keys import KeySchedule
from .addresses import expand_wildcard, port_in_use
from .admission import ADMIT_PROTOCOL
from .bridge import TrioThread
from .duplicates import SWEEP as DUPLICATE_SWEEP
from .duplicates import ConnectionView, duplicates_to_close
from .errors import P2PError
from .gate import ADMISSION_TIMEOUT, AdmissionGate, ConnectionWatch, dialled_by_us, peer_of, quiet_reset
from .holepunch import HOLEPUNCH_PROTOCOL, HolePunch
from .keepalive import SILENCE_SAMPLE, SilenceWatch, enable_keepalive, probing_end
from .logs import tame_libp2p_logging
from .reachability import REACH_PROTOCOL, Reachability
from .relay import HOP_PROTOCOL, STOP_PROTOCOL, Relay, RelayLimits, is_relayed, split_circuit
from .rtt import RttTable
from .stream import Stream
from .traffic import count_gossip, count_traffic
from .traps import (
    DIAL_TIMEOUT,
    PUBSUB_OVERHEAD,
    InboundSlots,
    batch_window_updates,
    build_sender_records_rarely,
    content_message_id,
    drop_sender_records,
    forget_dial_failures,
    ids_over_content,
    no_auto_connector,
    own_dial_retries,
    refuse_implicit_dials,
    size_pubsub_queues,
    validate_each_message_once,
    verify_signed_records_once,
)

log = logging.getLogger(__name__)

PeerCallback = Callable[[str], "Awaitable[None] | None"]
GossipHandler = Callable[[str, bytes], "Awaitable[None] | None"]
PayloadCheck = Callable[[bytes], bool]
StreamHandler = Callable[[Stream], Awaitable[None]]

# A peer that advertises relayed addresses gets this long on its own addresses first.
RELAYED_DIRECT_TIMEOUT = 2.0
# A dial through a relay: the relay's answer and the noise upgrade through it (admission comes
# after, under the gate's own timeout).
RELAYED_DIAL_TIMEOUT = 15.0
GOSSIP_HEARTBEAT = 1  # seconds; libp2p's default of 120 s grafts a mesh far too late (trap 3)
# Gossip scoring counts only invalid messages: each costs its forwarder a point, the count halves
# every heartbeat, and past this many (a flood, never an honest peer: it validates what it
# forwards) the forwarder's messages are refused unread and it gets none, until the count decays.
INVALID_GOSSIP_TOLERANCE = 100


def _gossip_score_params() -> ScoreParams:
    return ScoreParams(
        p4_invalid_messages=TopicScoreParams(weight=1.0, cap=10.0 * INVALID_GOSSIP_TOLERANCE, decay=0.5),
        publish_threshold=-float(INVALID_GOSSIP_TOLERANCE),
    )


async def _close_connection(conn: Any, what: str) -> None:
    """Close a connection we chose to end (trio side), giving it 5 s; one already closing is fine."""
    try:
        with trio.move_on_after(5):
            await conn.close()
    except Exception:  # already closing: what we wanted
        log.debug("closing a %s connection failed", what, exc_info=True)


def _with_peer_suffix(address: str, peer_id: str) -> str:
    return address if "/p2p/" in address else f"{address}/p2p/{peer_id}"


class P2PHost:
    """A libp2p node whose gossip, DHT and streams are open to admitted token holders only."""

    def __init__(
        self,
        identity: Identity,
        schedule: KeySchedule,
        listen: list[str],
        *,
        max_message_size: int,
        on_peer_admitted: PeerCallback | None = None,
        on_peer_disconnected: PeerCallback | None = None,
        admission_timeout: float = ADMISSION_TIMEOUT,
        relay: RelayLimits | None = None,
    ) -> None:
        self.identity = identity
        self.schedule = schedule
        self.listen = list(listen)
        self.max_message_size = max_message_size
        self.on_peer_admitted = on_peer_admitted
        self.on_peer_disconnected = on_peer_disconnected
        #: called (asyncio side) when this host's addresses or reachability change on their own: a
        #: relay reservation made or lost, a new reachability verdict — others should learn at once
        #: (a private peer's relayed address is how they reach it; issue #15)
        self.on_addresses_changed: Callable[[], Any] | None = None
        #: called with the error if the libp2p thread dies while the host runs (see TrioThread.on_died)
        self.on_died: Callable[[BaseException], None] | None = None
        self.admission_timeout = admission_timeout
        #: our libp2p peer id, ``12D3KooW…``
        self.peer_id: str = identity.peer_id
        #: event counts: admissions, refusals, dropped frames, handler failures
        self.counters: dict[str, int] = defaultdict(int)
        self._bridge: TrioThread | None = None
        self._host: Any = None
        self._pubsub: Any = None
        self._dht: Any = None
        self._gossipsub: Any = None  # read by gossip_mesh_size (a len, from the asyncio thread)
        self._pubsub_peers_in: Any = None
        self._pubsub_peers_gone: Any = None
        self._stop_event: trio.Event | None = None
        self._gate = AdmissionGate(
            self.peer_id,
            schedule,
            timeout=admission_timeout,
            counters=self.counters,
            on_admitted=self._peer_admitted,
            on_gone=self._peer_gone,
        )
        self._subscriptions: dict[str, list[GossipHandler]] = {}
        self._payload_checks: dict[str, list[PayloadCheck]] = {}
        self._stream_handlers: dict[str, StreamHandler] = {}
        self._bound: list[str] = []
        self._inbound: InboundSlots | None = None
        self._asyncio_tasks: set[asyncio.Task] = set()
        # NAT traversal (issue #15): where others see us, and circuits through public peers
        self._reachability = Reachability(self.counters, self._listen_port, on_change=self._addresses_changed)
        self._relay = Relay(
            self.peer_id,
            relay or RelayLimits(),
            self.counters,
            is_public=lambda: self._reachability.state == "public",
            on_reservations_changed=self._addresses_changed,
        )
        # ... and direct connections between NATed peers, in place of relayed ones
        self._holepunch = HolePunch(
            self.counters,
            observed=lambda: self._reachability.observed,
            relayed=lambda peer: peer in self._relay.relayed,
            on_direct=self._holepunched,
        )
        #: peers whose relayed connection was replaced by a hole-punched one
        self._punched: set[str] = set()
        # peers whose connections this node is closing (a trim): when they go, it is not news
        # that a peer or the network ended them (peers_closed_here vs peers_lost)
        self._closing: set[str] = set()
        # issue #17: RTT per peer, read from the pings yamux sends anyway (see .rtt)
        self._rtt = RttTable(self.counters)
        self._silence = SilenceWatch()  # the connections whose other end probes

    # --- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen, start gossip and the DHT; returns once the host is serving."""
        if self._bridge is not None and self._bridge.running:
            raise P2PError("host already started")
        busy = [address for address in self.listen if port_in_use(address)]
        if busy:
            raise P2PError(f"listen address already in use: {', '.join(busy)}")
        tame_libp2p_logging()
        size_pubsub_queues(self.max_message_size)
        batch_window_updates()  # trap 15
        verify_signed_records_once()
        build_sender_records_rarely()  # trap 14
        self._bridge = TrioThread(self.peer_id[-8:])
        self._bridge.on_died = self._died
        self._gate.reset()
        try:
            await self._bridge.start(self._serve)
        except BaseException:
            await self._bridge.join()
            self._bridge = None
            raise

    def _died(self, error: BaseException) -> None:
        self.counters["host_died"] += 1
        log.error("the libp2p host died: %r", error, exc_info=error)
        if self.on_died is not None:
            self.on_died(error)

    async def stop(self) -> None:
        """Close every connection and the listener, end all trio tasks and the thread."""
        bridge = self._bridge
        if bridge is None:
            return
        bridge.on_died = None  # what it raises from here on is the stop's doing
        event = self._stop_event
        if event is not None:
            bridge.run_sync_soon(event.set)
        try:
            await bridge.join()
        finally:
            self._bridge = None
            self._gate.reset()
            for task in list(self._asyncio_tasks):
                task.cancel()

    async def _serve(self, nursery: trio.Nursery, ready: Callable[[], None]) -> None:
        self._stop_event = trio.Event()
        self._nursery = nursery
        host, pubsub, gossipsub, dht = self._build()
        self._gossipsub = gossipsub
        try:
            async with host.run(listen_addrs=[multiaddr.Multiaddr(a) for a in self.listen]):
                if not host.get_transport_addrs():
                    raise P2PError(f"could not listen on {self.listen}")
                async with background_trio_service(pubsub), background_trio_service(gossipsub):
                    async with background_trio_service(dht):
                        self._bound = [str(a) for a in host.get_transport_addrs()]
                        await self._install_handlers()
                        nursery.start_soon(self._inbound.sweep_forever)
                        nursery.start_soon(self._reachability.probe_forever, self._direct_peers)
                        nursery.start_soon(self._rtt.sample_forever, self._admitted_connections)
                        nursery.start_soon(self._close_duplicates_forever)
                        nursery.start_soon(self._close_silent_forever)
                        nursery.start_soon(
                            self._relay.keep_reservations, lambda: self._reachability.state == "private", self._relay_candidates
                        )
                        ready()
                        await self._stop_event.wait()
                # Closing here, inside host.run, releases the listener and the connections
                # before libp2p's own teardown (trap 5).
                with trio.CancelScope(shield=True):
                    await host.close()
        finally:
            pubsub.seen_messages.stop()  # its sweeper thread outlives the service otherwise
            self._gossipsub = None
            self._gate.detach()
            self._relay.detach()
            self._reachability.detach()
            self._holepunch.detach()
            self._punched.clear()
            self._rtt.clear()
            self._host = self._pubsub = self._dht = None
            self._bound = []

    def _build(self) -> tuple[Any, Any, Any, Any]:
        key_pair = ed25519.create_new_key_pair(self.identity.seed)
        noise_key = x25519.create_new_key_pair()
        host = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=noise_key.private_key)},
            muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
            listen_addrs=[multiaddr.Multiaddr(a) for a in self.listen],
            enable_mDNS=False,
            # One connection per peer: no fixed 250 ms wait per dial (trap 2). No auto-connector:
            # we dial whom discovery finds, and each dial goes through admission.
            connection_config=ConnectionConfig(max_connections_per_peer=1, min_connections=0, low_watermark=0),
        )
        if str(host.get_id()) != self.peer_id:
            raise P2PError("libp2p derived another peer id from our identity")
        gossipsub = GossipSub(
            protocols=[PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=6,
            degree_low=4,
            # D_hi 8, not libp2p's 12: a node prunes its mesh back to D once it holds more than 8,
            # so none receives (and forwards) every message up to 12 times. At N = 50 on 2 cores
            # the busiest nodes fell tens of seconds behind the network's gossip (docs/scaling.md).
            degree_high=8,
            heartbeat_interval=GOSSIP_HEARTBEAT,
            heartbeat_initial_delay=0.1,
            spam_protection_enabled=False,
            eclipse_protection_enabled=False,
            # "Adaptive gossip" (trap 16) turns the 1 s heartbeat into 30-60 s and widens the mesh
            # up to D_hi + 4 whenever its health score drops — under load, when grafting matters
            # most, and with every extra mesh peer a copy of every message: fixed D and heartbeat.
            adaptive_gossip_enabled=False,
            score_params=_gossip_score_params(),
            # Peer exchange: a PRUNE may name peers, and gossipsub dials them (BasicHost.connect,
            # past our dialler): any admitted insider could make every node dial whatever
            # addresses it listed, and a trim's PRUNE would open connections nobody chose.
            # Dialling none of them (trap 17); candidates come from membership and discovery.
            px_peers_count=0,
        )
        # No libp2p message signatures: every payload is sealed with the network key and every ledger
        # entry inside is signed by its owner, so they would only cost CPU and ~100 bytes a message.
        # Unsigned, from_id and seqno prove nothing: message ids hash the content (trap 11).
        pubsub = Pubsub(
            host,
            gossipsub,
            max_inbound_rpc_size=self.max_message_size + PUBSUB_OVERHEAD,
            strict_signing=False,
            msg_id_constructor=content_message_id,
        )
        ids_over_content(gossipsub)
        dht = KadDHT(host, DHTMode.SERVER, max_peers_per_subnet=0)
        network = host.get_network()
        validate_each_message_once(pubsub, self.counters)  # trap 13
        count_gossip(pubsub, self.counters)  # what the RPCs hold, once the records are dropped:
        drop_sender_records(pubsub)  # trap 14
        count_traffic(network, self.counters)  # bytes and streams per protocol (see .traffic)
        own_dial_retries(network)
        no_auto_connector(network)  # trap 18
        refuse_implicit_dials(host, self.counters, may_dial=frozenset({str(KAD_PROTOCOL)}))  # trap 17
        self._inbound = InboundSlots(network)
        # Pubsub learns about a peer from us, once it is admitted, not from the raw connection.
        for notifee in list(network.notifees):
            if isinstance(notifee, PubsubNotifee):
                network.remove_notifee(notifee)
                self._pubsub_peers_in = notifee.initiator_peers_queue
                self._pubsub_peers_gone = notifee.dead_peers_queue
        network.register_notifee(ConnectionWatch(self._on_connected, self._on_disconnected))
        self._guard_libp2p_handlers(host)
        host.set_stream_handler(ADMIT_PROTOCOL, self._gate.admit_listener)
        host.set_stream_handler(HOP_PROTOCOL, self._gate.guard(self._relay.serve_hop))
        host.set_stream_handler(STOP_PROTOCOL, self._gate.guard(self._relay.serve_stop))
        host.set_stream_handler(REACH_PROTOCOL, self._gate.guard(self._reachability.serve))
        host.set_stream_handler(HOLEPUNCH_PROTOCOL, self._gate.guard(self._holepunch.serve))
        self._host, self._pubsub, self._dht = host, pubsub, dht
        self._gate.attach(host, self._nursery)
        self._relay.attach(host, self._nursery)
        self._reachability.attach(host)
        self._holepunch.attach(host)
        tame_libp2p_logging()  # libp2p modules imported while building have fresh loggers
        return host, pubsub, gossipsub, dht

    def _guard_libp2p_handlers(self, host: Any) -> None:
        """Put every stream handler libp2p registered behind the admission gate (trap 12).

        Gossip and the DHT carry our data; identify, identify-push and ping tell a stranger our
        addresses and protocols, and identify-push logged an ERROR line per malformed message —
        an outsider must get none of them. Idempotent: a guarded handler is not wrapped again.
        """
        for protocol, handler in list(host.get_mux().handlers.items()):
            if handler is None or protocol == ADMIT_PROTOCOL or self._gate.guards(handler):
                continue
            host.set_stream_handler(protocol, self._gate.guard(handler))

    async def _install_handlers(self) -> None:
        # anything libp2p's services registered while starting goes behind the gate too
        self._guard_libp2p_handlers(self._host)
        for topic in list(self._subscriptions):
            await self._trio_subscribe(topic)
        for protocol in list(self._stream_handlers):
            self._trio_set_stream_handler(protocol)

    # --- identity and addresses -----------------------------------------------------------------
    def addresses(self) -> list[str]:
        """Concrete multiaddrs ending ``/p2p/<id>``; wildcards expanded to interface addresses."""
        out: list[str] = []
        for bound in self._bound:
            for concrete in expand_wildcard(bound):
                full = _with_peer_suffix(concrete, self.peer_id)
                if full not in out:
                    out.append(full)
        return out + self._relay.addresses()

    def reachability(self) -> dict[str, Any]:
        """What this node knows of its reachability (issue #15): ``reachability`` (public, private
        or unknown), ``observed`` (where admitted peers see it), ``relays`` (holding a reservation
        for it), ``reserving_peers`` (holding one on it), ``relayed_peers`` (connected through a relay) and ``relay`` (the load it serves)."""
        return {
            "reachability": self._reachability.state,
            "observed": list(self._reachability.observed),
            "relays": self._relay.relays(),
            "reserving_peers": self._relay.reserved_peers(),
            "relayed_peers": sorted(self._relay.relayed),
            "relay": {"enabled": self._relay.limits.enable, **self._relay.serving()},
        }

    def _listen_port(self) -> int | None:
        for bound in self._bound:
            port = multiaddrs.tcp_port(bound)
            if port is not None:
                return port
        return None

    def _direct_peers(self) -> list[Any]:
        """Admitted peers connected to us directly, not through a relay (trio side)."""
        return [ID.from_base58(peer) for peer in self._gate.admitted_peers() if peer not in self._relay.relayed]

    def _admitted_connections(self) -> list[tuple[str, Any]]:
        """``(peer id, connection)`` of every admitted peer's connections (trio side)."""
        if self._host is None:
            return []
        network = self._host.get_network()
        return [(peer, conn) for peer in self._gate.admitted_peers() for conn in network.get_connections(ID.from_base58(peer))]

    async def _close_duplicates_forever(self) -> None:
        """Every few seconds, close the idle duplicates among each admitted peer's direct
        connections (:mod:`.duplicates`), and make the relayed/punched marks say what carries
        each peer now (trio side)."""
        while True:
            await trio.sleep(DUPLICATE_SWEEP)
            await self._settle_relayed_marks()
            for conn in self._duplicate_connections(time.time()):
                self.counters["connections_duplicate_closed"] += 1
                await _close_connection(conn, "duplicate")

    async def _close_silent_forever(self) -> None:
        """Close the connections whose probing end went silent (trio side; see :mod:`.keepalive`)."""
        while True:
            await trio.sleep(SILENCE_SAMPLE)
            for conn in self._silence.silent():
                self.counters["keepalive_silence_closed"] += 1
                log.info("no probe from %s for %.0f s: closing the connection", conn.muxed_conn.peer_id, self._silence.limit)
                await _close_connection(conn, "silent")

    async def _settle_relayed_marks(self) -> None:
        """Make the relayed and punched marks follow the connections (trio side).

        The marks are set by events: a relayed dial, a punch's closing exchange. When an event
        goes wrong, the mark lies: a punch whose closing exchange failed on one end leaves that
        end holding a direct and a relayed connection with the peer marked relayed (one CI run
        saw a link reported relayed for 60 s after both ends logged the punched connection); a
        relayed connection that arrives after a punch can make libp2p's per-peer trim close the
        punched one and leave the peer marked punched on the relay. So, for each peer with no
        punch running:

        - marked relayed but holding a direct connection: it is punched (direct, when no punch
          made the connection), and the higher id, a punch's responder, closes the relayed one;
        - left with relayed connections only: it is relayed again, and the lower id, a punch's
          initiator, tries to punch anew."""
        if self._host is None:
            return
        network = self._host.get_network()
        for peer in self._gate.admitted_peers():
            conns = network.get_connections(ID.from_base58(peer))
            if not conns or self._holepunch.running(peer):
                continue
            relayed = sum(map(is_relayed, conns))
            if peer in self._relay.relayed and relayed < len(conns):
                self.counters["relayed_marks_cleared"] += 1
                punched = peer in self._holepunch.met
                await self._off_the_relay(peer, punched=punched, close_relayed=self.peer_id > peer)
            elif peer not in self._relay.relayed and relayed == len(conns):
                self.counters["relayed_marks_restored"] += 1
                self._punched.discard(peer)
                self._relay.relayed.add(peer)
                if self.peer_id < peer:
                    self._nursery.start_soon(self._holepunch.upgrade, peer)

    def _duplicate_connections(self, now: float) -> list[Any]:
        if self._host is None:
            return []
        network = self._host.get_network()
        found = []
        for peer in self._gate.admitted_peers():
            if peer in self._relay.relayed:
                continue  # a relayed connection beside a direct one is the relay's to end, not ours
            conns = network.get_connections(ID.from_base58(peer))
            if len(conns) < 2:
                continue
            views = []
            for conn in conns:
                try:
                    streams = len(conn.get_streams())
                except Exception:  # cannot tell: count it as busy
                    streams = 1
                views.append(ConnectionView(dialled_by_us(conn), float(getattr(conn, "_created_at", now)), streams))
            found += [conns[i] for i in duplicates_to_close(self.peer_id, peer, views, now)]
        return found

    def links(self) -> dict[str, dict[str, Any]]:
        """Each admitted peer's connection: ``transport`` (``direct``: a TCP connection of its own,
        ``relayed``: a circuit through a relay, ``punched``: a TCP connection of its own that
        replaced a relayed one through both NATs, :mod:`.holepunch`) and ``rtt_s``, the smoothed round-trip time in
        seconds the connection's muxer measured (None until its first ping, ~0.5 s after the
        connection is up; then one ping every 30 s — see :mod:`.rtt`) and ``floor_s``, the lowest
        of those values in the last two to four minutes (the path's latency without the hiccups)."""
        rtts, floors = self._rtt.snapshot, self._rtt.floors
        relayed, punched = self._relay.relayed, self._punched

        def transport(peer: str) -> str:
            return "relayed" if peer in relayed else "punched" if peer in punched else "direct"

        return {
            peer: {"transport": transport(peer), "rtt_s": rtts.get(peer), "floor_s": floors.get(peer)}
            for peer in sorted(self._gate.admitted_peers())
        }

    def rtt(self, peer_id: str) -> float | None:
        """The smoothed round-trip time to ``peer_id`` in seconds, or None (not connected, not measured yet)."""
        return self._rtt.rtt(peer_id) if self._gate.is_admitted(peer_id) else None

    def _relay_candidates(self) -> list[tuple[str, str]]:
        """Admitted peers we dialled directly, with the address we reached them at (trio side)."""
        out = []
        for peer_id in self._direct_peers():
            for conn in self._host.get_network().get_connections(peer_id) if self._host else []:
                if not dialled_by_us(conn):
                    continue
                try:
                    ip, port = conn.muxed_conn.get_remote_address()
                except Exception:  # no socket address known: not a candidate
                    continue
                family = "ip6" if ":" in str(ip) else "ip4"
                out.append((str(peer_id), f"/{family}/{ip}/tcp/{port}/p2p/{peer_id}"))
                break
        return out

    # --- admission ------------------------------------------------------------------------------
    def refusal_reason(self, peer_id: str) -> str | None:
        """Why ``peer_id`` was last refused admission (either side's verdict), or None."""
        return self._gate.refusal_reason(peer_id)

    def gossip_mesh_size(self, topic: str) -> int:
        """How many peers are in our gossip mesh of ``topic`` now: each gets a copy of every
        message of it we publish or forward, and sends us one (0 when not running)."""
        gossipsub = self._gossipsub
        mesh = gossipsub.mesh.get(topic) if gossipsub is not None else None
        return len(mesh) if mesh else 0

    def admitted_peers(self) -> set[str]:
        """Peers connected now that proved the token."""
        return self._gate.admitted_peers()

    def is_admitted(self, peer_id: str) -> bool:
        """Whether ``peer_id`` is connected now and proved the token."""
        return self._gate.is_admitted(peer_id)

    async def connected_peers(self) -> set[str]:
        """Peers with an open connection now, admitted or not (diagnostics and tests)."""
        bridge = self._require_running()

        async def peers() -> set[str]:
            return {str(p) for p in self._host.get_connected_peers()}

        return await bridge.call(peers)

    def _on_connected(self, conn: Any) -> None:
        # Dead-peer detection belongs to every connection (silent partitions), admitted or not
        # yet: one end probes, the other watches for the probes (.keepalive).
        probe = probing_end(self.peer_id, str(conn.muxed_conn.peer_id)) == self.peer_id
        if not enable_keepalive(conn, probe=probe) or not (probe or self._silence.watch(conn)):
            self.counters["keepalive_unavailable"] += 1
        self._gate.connected(conn)

    def _on_disconnected(self, conn: Any) -> None:
        self._silence.forget(conn)
        peer_id = conn.muxed_conn.peer_id
        peer = str(peer_id)
        was_admitted = self._gate.is_admitted(peer)
        self._gate.disconnected(conn)
        if self._host is not None and not self._host.get_network().get_connections(peer_id):
            if was_admitted:
                # why connections churn: ours (trims) or the peer's and the network's
                self.counters["peers_closed_here" if peer in self._closing else "peers_lost"] += 1
            self._closing.discard(peer)
            self._relay.disconnected(peer)
            self._punched.discard(peer)
            self._holepunch.met.discard(peer)
            self._rtt.forget(peer)
        elif self._host is not None and self._gate.is_admitted(peer):
            if peer in self._relay.relayed and not any(map(is_relayed, self._host.get_network().get_connections(peer_id))):
                # the relayed connection went and a direct one stays (a punch whose last answer was
                # lost with it): say what carries the peer now
                self._relay.relayed.discard(peer)
                self._punched.add(peer)
            self._nursery.start_soon(self._keep_in_pubsub, peer_id)
        if self._inbound is not None:
            self._inbound.closed(conn)

    def inbound_handlers(self) -> int:
        """Accepted connections whose libp2p handler still runs (each holds an inbound slot)."""
        return len(self._inbound) if self._inbound is not None else 0

    async def _peer_admitted(self, peer: str) -> None:
        """The gate admitted ``peer`` (trio side): tell asyncio, gossip and the DHT."""
        # Notify before any await: a disconnect during the awaits below must reach asyncio after
        # the admission, or the peer would stay "connected" there forever.
        self._notify_asyncio(self.on_peer_admitted, peer)
        peer_id = ID.from_base58(peer)
        await self._tell_pubsub(self._pubsub_peers_in, peer_id)
        self._nursery.start_soon(self._dht_add_once_identified, peer_id)
        if peer in self._relay.relayed and self.peer_id < peer:
            # a relayed connection: the lower id tries to replace it with a direct one
            self._nursery.start_soon(self._holepunch.upgrade, peer)

    async def _holepunched(self, peer: str, close_relayed: bool) -> None:
        """A hole-punched connection to ``peer`` is up on both ends (trio side): the peer is no
        longer relayed, and the responder closes the relayed connection."""
        await self._off_the_relay(peer, punched=True, close_relayed=close_relayed)

    async def _off_the_relay(self, peer: str, *, punched: bool, close_relayed: bool) -> None:
        """A direct connection carries ``peer`` now (trio side): marked ``punched`` or direct,
        and with ``close_relayed`` its relayed connections are closed."""
        self._relay.relayed.discard(peer)
        if punched:
            self._punched.add(peer)
        if not close_relayed or self._host is None:
            return
        for conn in list(self._host.get_network().get_connections(ID.from_base58(peer))):
            if is_relayed(conn):
                await _close_connection(conn, "relayed")

    async def _keep_in_pubsub(self, peer_id: ID) -> None:
        """One of an admitted peer's connections closed, others remain (trio side).

        Gossipsub kept its stream with the peer on one connection; when that was the closed one,
        it drops the peer as dead although the peer stays admitted on the others (a replaced
        relayed connection, a duplicate closed under a stream). Tell it about the peer again once
        it dropped it; a stream on a surviving connection leaves it in, and this is a no-op."""
        with trio.move_on_after(3):
            while self._pubsub is not None and self._gate.is_admitted(str(peer_id)):
                if peer_id not in self._pubsub.peers:
                    self.counters["pubsub_peers_readded"] += 1
                    await self._tell_pubsub(self._pubsub_peers_in, peer_id)
                    return
                await trio.sleep(0.1)

    async def _dht_add_once_identified(self, peer_id: ID) -> None:
        """Put an admitted peer into the DHT routing table once we know its addresses.

        A peer that dialled us tells its listen addresses through identify, which it serves only
        once it admitted us too (trap 12): shortly after our verdict, not before it.
        """
        with trio.move_on_after(self.admission_timeout + 5):
            while self._host is not None and self._gate.is_admitted(str(peer_id)):
                try:
                    addrs = self._host.get_peerstore().addrs(peer_id)
                except Exception:  # PeerStoreError: nothing known of it yet
                    addrs = []
                if addrs:
                    await self._dht_add(PeerInfo(peer_id, addrs))
                    return
                await trio.sleep(0.1)

    def _peer_gone(self, peer: str) -> None:
        """An admitted peer lost its last connection (trio side): tell gossip and asyncio."""
        self._nursery.start_soon(self._tell_pubsub, self._pubsub_peers_gone, ID.from_base58(peer))
        self._notify_asyncio(self.on_peer_disconnected, peer)

    async def _tell_pubsub(self, channel: Any, peer_id: ID) -> None:
        if channel is None:
            return
        try:
            with trio.move_on_after(5):
                await channel.send(peer_id)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # --- connect / disconnect ---------------------------------------------------------------------
    async def connect(self, addrs: str | list[str]) -> str:
        """Dial a peer (multiaddrs ending ``/p2p/<id>``), run admission, return its peer id.

        Raises :class:`AdmissionError` when the peer does not hold our token (or refuses ours),
        :class:`P2PError` when it cannot be reached.
        """
        bridge = self._require_running()
        texts = [addrs] if isinstance(addrs, str) else list(addrs)
        if not texts:
            raise P2PError("no address to dial")
        infos = []
        for text in texts:
            try:
                infos.append(info_from_p2p_addr(multiaddr.Multiaddr(text)))
            except Exception as exc:
                raise P2PError(f"not a dialable multiaddr with /p2p/<id>: {text!r} ({exc})") from None
        peer_id = infos[0].peer_id
        if any(info.peer_id != peer_id for info in infos):
            raise P2PError("addresses name different peers")
        if str(peer_id) == self.peer_id:
            raise P2PError("refusing to dial ourselves")
        circuits = [(text, circuit) for text in texts if (circuit := split_circuit(text)) is not None]
        direct = [a for text, i in zip(texts, infos) if split_circuit(text) is None for a in i.addrs]
        info = PeerInfo(peer_id, direct)
        return await bridge.call(self._trio_connect, info, [c for _, c in circuits])

    async def _trio_connect(self, info: PeerInfo, circuits: list[tuple[str, str, str]] = ()) -> str:
        """Dial ``info`` directly, else through the relays of ``circuits``, then run admission."""
        peer = str(info.peer_id)

        async def dial() -> None:
            failure: Exception | None = None
            if info.addrs:
                # A deliberate dial is tried for real, once, and bounded (see traps: DIAL_TIMEOUT);
                # shorter when a relay can take over: a NATed peer's own addresses just time out.
                forget_dial_failures(self._host.get_network(), info.peer_id)
                try:
                    with trio.fail_after(RELAYED_DIRECT_TIMEOUT if circuits else DIAL_TIMEOUT):
                        await self._host.connect(info)
                    return
                except Exception as exc:
                    failure = exc
            for relay_address, relay, _ in circuits:
                if relay == self.peer_id:
                    continue
                try:
                    with trio.fail_after(RELAYED_DIAL_TIMEOUT):
                        await self._relay.dial(relay_address, relay, peer, self._connect_relay)
                    self.counters["relayed_dials"] += 1
                    return
                except Exception as exc:
                    failure = exc
            raise failure if failure is not None else P2PError("no address to dial")

        await self._gate.connect(peer, dial)
        return peer

    async def _connect_relay(self, address: str) -> None:
        """Trio side: be admitted by the relay at ``address`` (directly: no circuit to a relay)."""
        info = info_from_p2p_addr(multiaddr.Multiaddr(address))
        await self._trio_connect(PeerInfo(info.peer_id, info.addrs))

    async def disconnect(self, peer_id: str) -> None:
        """Close every connection to ``peer_id``."""
        bridge = self._require_running()

        async def close() -> None:
            peer = ID.from_base58(peer_id)
            if self._host.get_network().get_connections(peer):
                self._closing.add(peer_id)  # _on_disconnected forgets it with the last connection
            await self._host.disconnect(peer)

        await bridge.call(close)

    async def revoke(self, peers: frozenset[str] | set[str]) -> None:
        """Refuse ``peers`` at admission from now on (across restarts of this host too) and close
        their connections at once (see :meth:`AdmissionGate.revoke`)."""
        peers = frozenset(peers)
        self._gate.revoked = self._gate.revoked | peers
        bridge = self._bridge
        if bridge is not None and bridge.running and self._host is not None:
            await bridge.call(self._gate.revoke, peers)

    # --- gossip ---------------------------------------------------------------------------------
    def subscribe(self, topic: str, handler: GossipHandler, *, validate: PayloadCheck | None = None) -> None:
        """Deliver ``handler(origin_peer_id, data)`` for each message on ``topic``.

        Only messages forwarded by admitted peers get through; our own messages are not echoed.
        ``validate(data)`` — whether a payload is sealed for this network — is asked before a
        message received is delivered or forwarded to anyone; refused ones are counted
        (``gossip_refused_unsealed``) and count against their forwarder's gossip score. It runs on
        the host's trio thread, for every message, so it must be cheap, thread-safe and must not
        block (pure cryptography is fine). Messages we publish are not checked. ``origin_peer_id``
        is what the message claims, not proven. May be called before :meth:`start`.
        """
        first = topic not in self._subscriptions
        self._subscriptions.setdefault(topic, []).append(handler)
        if validate is not None:
            self._payload_checks.setdefault(topic, []).append(validate)
        if first and self._bridge is not None and self._bridge.running:

            async def join() -> None:
                await self._trio_subscribe(topic)

            self._bridge.run_sync_soon(lambda: self._nursery.start_soon(join))

    async def _trio_subscribe(self, topic: str) -> None:
        pubsub = self._pubsub
        if pubsub is None or topic in pubsub.topic_ids:
            return
        pubsub.set_topic_validator(topic, self._gossip_validator(topic), False)
        subscription = await pubsub.subscribe(topic)
        self._nursery.start_soon(self._pump_topic, topic, subscription)

    def _gossip_validator(self, topic: str) -> Callable[[ID, Any], bool]:
        """Pubsub's validator for ``topic`` (trio side): what fails here is neither delivered nor
        forwarded, and pubsub counts it against the forwarder's score (see INVALID_GOSSIP_TOLERANCE)."""

        def validate(forwarder: ID, msg: Any) -> bool:
            if not self._gate.forwarded_by_admitted(forwarder, msg):
                return False
            if str(forwarder) == self.peer_id:
                return True  # our own publication: we sealed it
            try:
                ID(msg.from_id)
            except Exception:
                self.counters["gossip_dropped"] += 1
                return False
            data = bytes(msg.data)
            if len(data) > self.max_message_size:
                self.counters["gossip_dropped"] += 1
                return False
            for check in list(self._payload_checks.get(topic, ())):
                try:
                    accepted = check(data)
                except Exception as exc:  # a failing check refuses, it must not break pubsub
                    log.debug("gossip payload check %r raised %r", check, exc)
                    accepted = False
                if not accepted:
                    self.counters["gossip_refused_unsealed"] += 1
                    return False
            return True

        return validate

    async def _pump_topic(self, topic: str, subscription: Any) -> None:
        try:
            while True:
                msg = await subscription.get()
                try:
                    origin = str(ID(msg.from_id))
                except Exception:
                    self.counters["gossip_dropped"] += 1
                    continue
                if origin == self.peer_id:
                    continue
                data = bytes(msg.data)
                if len(data) > self.max_message_size:
                    self.counters["gossip_dropped"] += 1
                    continue
                for handler in list(self._subscriptions.get(topic, ())):
                    self._notify_asyncio(handler, origin, data)
        except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError):
            return

    async def publish(self, topic: str, data: bytes) -> None:
        """Send ``data`` to every peer subscribed to ``topic``."""
        bridge = self._require_running()
        if len(data) > self.max_message_size:
            raise P2PError(f"message of {len(data)} bytes exceeds the limit of {self.max_message_size}")

        async def send() -> None:
            await self._pubsub.publish(topic, bytes(data))

        await bridge.call(send)

    # --- streams --------------------------------------------------------------------------------
    def set_stream_handler(self, protocol: str, handler: StreamHandler) -> None:
        """Serve ``protocol``: ``handler(stream)`` runs on the asyncio loop for admitted peers.

        If the handler raises, the error is logged and the stream reset, so the opener sees it.
        May be called before :meth:`start`.
        """
        self._stream_handlers[protocol] = handler
        if self._bridge is not None and self._bridge.running:
            self._bridge.run_sync_soon(lambda: self._trio_set_stream_handler(protocol))

    def _trio_set_stream_handler(self, protocol: str) -> None:
        if self._host is None:
            return

        async def hand_over(net_stream: Any) -> None:
            handler = self._stream_handlers.get(protocol)
            if handler is None:
                await quiet_reset(net_stream)
                return
            stream = Stream(self._bridge, net_stream, peer_of(net_stream), protocol, self.counters)
            self._bridge.to_asyncio(lambda: self._spawn(self._run_stream_handler(handler, stream)))

        self._host.set_stream_handler(protocol, self._gate.guard(hand_over))

    async def _run_stream_handler(self, handler: StreamHandler, stream: Stream) -> None:
        try:
            await handler(stream)
        except asyncio.CancelledError:
            await self._reset_quietly(stream)
            raise
        except Exception:
            self.counters["stream_handler_errors"] += 1
            log.exception("stream handler for %s from %s failed; resetting the stream", stream.protocol, stream.peer_id)
            await self._reset_quietly(stream)

    @staticmethod
    async def _reset_quietly(stream: Stream) -> None:
        try:
            await stream.reset()
        except Exception:
            pass

    async def open_stream(self, peer_id: str, protocol: str | Sequence[str]) -> Stream:
        """Open a stream to an admitted peer: ``protocol``, or the first of several (in order of
        preference) that the peer serves; the stream's ``protocol`` says which."""
        bridge = self._require_running()
        if not self._gate.is_admitted(peer_id):
            raise P2PError(f"{peer_id} is not an admitted peer")
        offered = [protocol] if isinstance(protocol, str) else list(protocol)

        async def open_() -> Any:
            return await self._host.new_stream(ID.from_base58(peer_id), offered)

        try:
            net_stream = await bridge.call(open_)
        except P2PError:
            raise
        except Exception as exc:
            raise P2PError(f"cannot open {' or '.join(offered)} to {peer_id}: {type(exc).__name__}: {exc}") from None
        negotiated = net_stream.get_protocol()
        return Stream(bridge, net_stream, peer_id, negotiated if negotiated in offered else offered[0], self.counters)

    # --- DHT ------------------------------------------------------------------------------------
    async def provide(self, key: str) -> None:
        """Announce that we provide ``key`` (a hex string, e.g. a rendezvous name)."""
        bridge = self._require_running()

        async def announce() -> bool:
            return await self._dht.provide(key)

        if not await bridge.call(announce):
            self.counters["dht_provide_failed"] += 1

    async def find_providers(self, key: str, limit: int = 20) -> list[tuple[str, list[str]]]:
        """Providers of ``key``: ``(peer_id, multiaddrs ending /p2p/<id>)``, deduplicated, without us."""
        bridge = self._require_running()

        async def look_up() -> list[Any]:
            return await self._dht.find_providers(key, limit)

        found: dict[str, list[str]] = {}
        for info in await bridge.call(look_up):
            peer = str(info.peer_id)
            if peer == self.peer_id:
                continue
            addrs = found.setdefault(peer, [])
            for addr in info.addrs:
                text = _with_peer_suffix(str(addr), peer)
                if text not in addrs:
                    addrs.append(text)
        return list(found.items())

    def add_dht_peer(self, peer_id: str, addrs: list[str]) -> None:
        """Put a peer into the DHT routing table (libp2p does not do it from connections)."""
        bridge = self._require_running()
        maddrs = []
        for text in addrs:
            maddr = multiaddr.Multiaddr(text)
            if "/p2p/" in text:
                maddr = maddr.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer_id}"))
            maddrs.append(maddr)
        info = PeerInfo(ID.from_base58(peer_id), maddrs)
        bridge.run_sync_soon(lambda: self._nursery.start_soon(self._dht_add, info))

    async def _dht_add(self, info: PeerInfo) -> None:
        if self._host is None or self._dht is None:
            return
        try:
            self._host.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
            await self._dht.add_peer(info, skip_server_mode_check=True)
        except Exception as exc:
            log.debug("adding %s to the DHT routing table failed: %r", info.peer_id, exc)

    # --- plumbing -------------------------------------------------------------------------------
    def _require_running(self) -> TrioThread:
        bridge = self._bridge
        if bridge is None or not bridge.running:
            raise P2PError("host is not running")
        return bridge

    def _addresses_changed(self) -> None:
        """Trio side: what :meth:`addresses` or :meth:`reachability` say changed (a relay
        reservation made or lost, a new verdict): tell asyncio's ``on_addresses_changed``."""
        self._notify_asyncio(self.on_addresses_changed)

    def _notify_asyncio(self, callback: Callable[..., Any] | None, *args: Any) -> None:
        """From trio: run ``callback(*args)`` on the asyncio loop, awaiting it if it is async."""
        if callback is None or self._bridge is None:
            return

        def call() -> None:
            try:
                result = callback(*args)
            except Exception:
                self.counters["callback_errors"] += 1
                log.exception("callback %r failed", callback)
                return
            if inspect.isawaitable(result):
                self._spawn(self._await_callback(result, callback))

        self._bridge.to_asyncio(call)

    async def _await_callback(self, awaitable: Awaitable[Any], callback: Any) -> None:
        try:
            await awaitable
        except asyncio.CancelledError:
            raise
        except Exception:
            self.counters["callback_errors"] += 1
            log.exception("callback %r failed", callback)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._asyncio_tasks.add(task)
        task.add_done_callback(self._asyncio_tasks.discard)
