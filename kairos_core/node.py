"""A kairos node: composes identity, p2p host, discovery, ledger, membership, election and plugins.

One node is one process in production; tests and plugin authors build several in one event loop
(see :mod:`kairos_testing`). Start-up order matters and is:

identity → ledger (from disk) → p2p host → replication → membership → plugins' ``kairos_startup``
→ own entry in ``nodes`` → discovery → election → local API.

Shutdown runs the reverse, with ``kairos_shutdown`` while the ledger and host still work.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections import Counter
from contextlib import suppress
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .api import APIServer
from .config import Config
from . import connections as connections_module
from .connections import ConnectionManager
from . import dial_manager as dial_manager_module
from .dial_manager import DialManager
from .dialer import Dialer
from .doctor import ClockOffsets, PeerSample
from .election import HEARTBEAT_SIZE, Election, Heartbeat, decode_heartbeat, encode_heartbeat, winner
from .errors import KairosError
from .events import LedgerUpdate, PeerEvent
from .identity import Identity, load_or_create_identity
from .keys import KeySchedule
from .ledger import Ledger, ledger_fingerprint, open_ledger
from .ledger.ledger import LEDGER_FILE
from .metrics import Metric, MetricRegistry
from .membership import MAX_NEIGHBOURS, NODES_BUCKET, REFRESHES_PER_TTL, Membership, is_node_key
from .plugins import KairosPluginManager, call_hook, call_hook_sync, make_plugin_manager
from .replication import Replicator
from .revocation import REVOKED_BUCKET, Revocations
from .rotation import ROTATION_BUCKET, Rotator, box_public, schedule_at_start
from .seal import SealError, Sealer
from .statedir import secure_state_dir

log = logging.getLogger(__name__)

# Shutdown: plugins get this long for kairos_shutdown, every other step STOP_STEP_TIMEOUT.
SHUTDOWN_HOOK_TIMEOUT = 5.0
STOP_STEP_TIMEOUT = 6.0
# How long the election's fast path waits for a departed leader to answer a dial.
PROBE_TIMEOUT = 1.0
# A lease's heartbeat, asked of its holder directly when gossip brought none for a whole lease
# (kairos_core.election: Election._still_renewed); the answer is one heartbeat frame.
LEASE_PULL_PROTOCOL = "/kairos/lease-pull/1.0.0"
# How long the candidate waits for that answer (a dial, if it is not a neighbour, and one frame):
# a holder that is merely slow answers within it, a hung one never does.
PULL_TIMEOUT = 5.0
# A holder answers one peer's pulls at most this often (each answer is an ed25519 signature).
PULL_SPACING = 1.0
# Our entry's sub-key recording who led each epoch we saw confirmed, and how many epochs it keeps.
EPOCH_RECORD = "epochs"
EPOCHS_RECORDED = 256
# A confirmed leader is recorded at once in memory (lease_holder answers from it), but published
# (a ledger write every node receives) only after a random wait between EPOCH_RECORD_DELAY and
# EPOCH_RECORD_DELAY + members × EPOCH_RECORD_SPREAD seconds: every member records every
# election, and those N writes, all at once, held back the news of the new leader itself for the
# last nodes to hear it (at N = 50 on 2 cores, 4.8 s from its confirmation to the last
# survivor). Spread, the whole network publishes about 1 / EPOCH_RECORD_SPREAD of them a second.
# A graceful stop publishes what is pending; a crash loses it (the lease itself still answers).
EPOCH_RECORD_DELAY = 5.0
EPOCH_RECORD_SPREAD = 0.2
# A change of our connections is announced this long after it (changes in a burst, one write).
NEIGHBOUR_ANNOUNCE_DELAY = 0.2
# ... but a new connection to a peer that others vouch for already is no news for liveness (it is
# alive everywhere without our word): on a network larger than ``p2p.connections.low`` it is
# announced this long after, so that a node's additions in a burst (a batch of joiners, a
# joiner's own dials) and the new neighbours' first RTTs go out in one write. Every write
# reaches every node: at N = 50 a joiner's connections rewrote ~13 entries, each taken in by all
# 50 nodes on the 2 cores. The trim of a connection to a peer others vouch for waits for the same
# write (a choice of degree, not a failure). A connection to a peer nobody else vouches for (a
# joiner's first voucher, a peer across a healed partition: see UNVOUCHED_SPREAD) and every other
# lost connection go out soon.
NEIGHBOUR_ADDED_LAZY_DELAY = 10.0
# ... counted from the last such addition (a burst of them is one write), but never more than
# this long after the first: a node that keeps gaining connections still says so twice a minute.
NEIGHBOUR_ADDED_LAZY_LIMIT = 30.0
# On a network above ``low`` a joiner's first connections come at once from several nodes, none of
# which sees it vouched for yet: each waits a random moment up to this long before it announces,
# and one that finds another's entry vouching for the joiner by then has no news to write
# (`bench/formation.py --sizes 30 --join 10`: 27–50 announcements spared per batch of joiners).
UNVOUCHED_SPREAD = 2.0
# A new connection (and an RTT follow-up) is announced no sooner than this after our entry's last
# write: a joining node's connections come one by one over seconds, each changing the entries at
# both ends, and every write reaches every node — at N = 50 on 2 cores those writes kept the
# machine saturated. A lost connection is news for liveness and the election (who is left to
# count): it goes out after NEIGHBOUR_ANNOUNCE_DELAY whatever was written before.
ANNOUNCE_SPACING = 2.0
# how often a stream waiting for its dial checks whether the peer got connected another way
CONNECTED_POLL = 0.1
# The RTTs an entry publishes (``rtt_ms``, issue #17) ride on the writes that happen anyway (a
# change of neighbours, a refresh); a move alone rewrites the entry at most once per
# ``membership.rtt_publish_interval``, and only when some value moved by more than
# RTT_REWRITE_CHANGE of it and by more than RTT_JITTER_MS (on a LAN, 1 vs 4 ms is scheduling
# noise, not news). Every write reaches every node (docs/scaling.md counts the cost). A new
# neighbour's first value is the exception on a network within ``low``: the write its connection
# caused went out before any ping, so one follow-up RTT_FIRST_DELAY later carries it (at most one
# per change of neighbours). Above ``low``, where every write costs every node, a first value is an
# RTT-only rewrite like a move, within the same network-wide budget below: it rides on the lazy
# write of a burst of new connections, which comes after the first pings, or on the next write
# for any reason, or goes out alone once that budget allows (sent 30 s after formation instead,
# at N = 10 six such rewrites doubled every node's idle bytes for half a minute).
RTT_FIRST_DELAY = 3.0
# ... and the whole network's RTT-only rewrites stay below this many a second, however
# many members it has: a node waits at least (members / this) seconds between them. On a loaded
# machine every floor moves by more than 20 % and 5 ms now and then, and at N = 50 those rewrites
# (0.7 a second, each reaching every node ~6 times over) were the largest idle traffic left.
RTT_REWRITES_PER_S_NETWORK = 0.1
RTT_REWRITE_CHANGE = 0.2
RTT_JITTER_MS = 5
# Lease heartbeats go on the ledger topic plus this suffix (sealed under the same keys).
HEARTBEAT_TOPIC_SUFFIX = "/lease"
# The gossip validator refuses a signer's heartbeats that come closer together than this share of
# the renewal interval (a leader sends one every lease_seconds / 3): a flood is not forwarded.
HEARTBEAT_MIN_SPACING = 0.5


def _observed_ips(observed: list[str]) -> list[str]:
    """``/ip4/<ip>`` (or ``/ip6/``) of each observed multiaddr, sorted, once each."""
    ips = set()
    for address in observed:
        parts = str(address).split("/")
        if len(parts) >= 3 and parts[1] in ("ip4", "ip6") and parts[2]:
            ips.add(f"/{parts[1]}/{parts[2]}")
    return sorted(ips)


def _rtt_ms(seconds: float) -> int:
    """An RTT as an entry publishes it: whole milliseconds, at least 1."""
    return max(1, round(seconds * 1000))


def _rtt_moved(published: int | None, measured: int) -> bool:
    """Whether ``measured`` is news against what the entry says (see RTT_REWRITE_CHANGE)."""
    if published is None:
        return True
    change = abs(measured - published)
    return change > RTT_JITTER_MS and change > RTT_REWRITE_CHANGE * published


class Node:
    """One member of a kairos network.

    :param config: a validated config (``kairos_core.config.load_config``).
    :param manager: the plugin manager; default: built-ins plus installed plugins.
    :param identity: use this identity instead of the one in the state dir (tests).
    """

    def __init__(self, config: Config, manager: KairosPluginManager | None = None, *, identity: Identity | None = None) -> None:
        self.config = config
        self.manager = manager or make_plugin_manager(disabled=config["plugins"]["disabled"])
        self.manager.hook_timeout = config.section("node").hook_timeout
        self.token = config.network_token
        self.schedule = KeySchedule(self.token)
        self.network_id: str = config["p2p"]["network_id"]
        self.identity = identity or load_or_create_identity(config.state_dir)
        self.peer_id = self.identity.peer_id
        self.hostname = config["node"]["hostname"] or socket.gethostname()
        self.counters: Counter[str] = Counter()
        self.states: dict[str, str] = {}  # plugin → what it waits for (NodeView.set_state)
        # what plugins declare (NodeView.counter/gauge); undeclared counters stay in self.counters
        self.metrics = MetricRegistry(self.counters)
        # for kairos doctor: peers each discovery reported, and the peers' clock offsets
        self.discovered: dict[str, PeerSample] = {"mdns": PeerSample(), "dht": PeerSample()}
        self.clock_offsets = ClockOffsets()
        self.started_at: float | None = None
        self.host = None
        #: set, with ``failure`` saying why, when the node cannot go on (its libp2p host died)
        self.failed = asyncio.Event()
        self.failure: str | None = None
        self.ledger: Ledger | None = None
        self.replicator: Replicator | None = None
        self.membership: Membership | None = None
        self.election: Election | None = None
        self.api: APIServer | None = None
        self.metrics_server: APIServer | None = None  # api.metrics_listen
        self.revocations: Revocations | None = None
        self.rotator: Rotator | None = None
        self._box = box_public(self.identity)  # what members seal a rotated token to (kairos_core.rotation)
        self._discovery: list[Any] = []
        self._tasks: set[asyncio.Task] = set()
        # Ledger updates and leader changes are delivered in order, each through its own queue, so
        # a plugin slow on ledger updates never delays the news of a new leader.
        self._ledger_events: asyncio.Queue = asyncio.Queue()
        self._leader_events: asyncio.Queue = asyncio.Queue()
        self.dial_manager: DialManager | None = None  # owns the two below
        self.dialer: Dialer | None = None
        self.connections: ConnectionManager | None = None
        self._beat = 0
        self._advertised: dict[str, Any] | None = None  # what our entry says now
        self._rounds_unchanged = 0
        self._published_rtt: dict[str, int] = {}  # peer -> the rtt_ms our entry says now
        self._written_at = 0.0  # monotonic time of our entry's last write
        self._announce_pending: asyncio.TimerHandle | None = None
        self._rtt_announce_pending: asyncio.TimerHandle | None = None
        self._announce_is_lazy = False  # the pending announcement is a lazy one (_announce_lazily)
        self._lazy_since: float | None = None  # loop time of the first lazy change not yet written
        # epoch -> leader recorded here but not yet published (see EPOCH_RECORD_DELAY)
        self._epochs_unpublished: dict[str, str] = {}
        self._epoch_record_pending: asyncio.TimerHandle | None = None
        self._stopped = asyncio.Event()
        self._running = False

    # ---------------------------------------------------------------------------------------
    # lifecycle
    # ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bring the node up; raises on what the node cannot run without (ports, state dir)."""
        from .p2p import P2PHost, RelayLimits  # imported here: libp2p is heavy and only a running node needs it

        p2p = self.config.section("p2p")
        if self.config["api"]["metrics_listen"]:
            from .metrics import parse_listen

            parse_listen(self.config["api"]["metrics_listen"])  # a typo fails now, before anything runs
        self.started_at = time.monotonic()
        secure_state_dir(self.config.state_dir, create=(LEDGER_FILE,))
        self.ledger = self._open_ledger()
        self.ledger.add_listener(self._on_ledger_update)
        # Revocations recorded before a restart are in force before the first connection.
        self.revocations = Revocations(
            self.peer_id,
            self.ledger,
            self.lease_holder,
            self._peers_revoked,
            current_epoch=self._known_epoch,
            is_leader=lambda: self.is_leader,
        )
        self.revocations.refresh()
        self._spawn(self._deliver_hooks(self._ledger_events), "ledger-hooks")
        # A token rotated since the config was written is in the state dir (kairos_core.rotation).
        self.schedule, replaced = schedule_at_start(self.config.network_token, self.config.state_dir)
        self.token = self.schedule.token
        self.rotator = Rotator(
            self.identity,
            self.ledger,
            self.schedule,
            self.config.state_dir,
            replaced,
            lease_holder=self.lease_holder,
            members=self._rotation_members,
            on_rotated=self._token_rotated,
            current_epoch=self._known_epoch,
        )
        self._spawn(self._deliver_hooks(self._leader_events), "leader-hooks")

        listen = list(p2p.listen) or [f"/ip4/0.0.0.0/tcp/{p2p.port}"]
        self.host = P2PHost(
            self.identity,
            self.schedule,
            listen,
            max_message_size=self.token.max_message_size,
            on_peer_admitted=self._peer_admitted,
            on_peer_disconnected=self._peer_disconnected,
            relay=RelayLimits(
                enable=p2p.relay.enable,
                max_circuits=p2p.relay.max_circuits,
                max_bytes=p2p.relay.max_bytes,
                max_duration=p2p.relay.max_duration,
            ),
        )
        self.host.on_died = self._host_died
        self.host.on_addresses_changed = self._announce_soon
        await self.host.revoke(self.revocations.revoked)  # the gate refuses them from the start
        await self.host.start()
        horizon = self.config.section("election").quorum_horizon
        self.dial_manager = DialManager(
            self.peer_id,
            self.host,
            lambda: self.membership.worth_dialling(horizon),
            self._advertised_addresses,
            addresses_changed=self._announce_soon,
            lost=lambda: self.membership.lost(horizon),
            bridges=lambda peers: self.membership.bridges(peers),
            degree=lambda peer: self.membership.degree(peer),
            counters=self.counters,
            low=p2p.connections.low,
            high=p2p.connections.high,
            grace=connections_module.GRACE,
            repair_interval=dial_manager_module.REPAIR_INTERVAL,
        )
        self.dialer, self.connections = self.dial_manager.dialer, self.dial_manager.connections
        sealer = Sealer(self.schedule, max_frame_size=self.token.max_message_size)
        self.replicator = Replicator(self.ledger, self.host, sealer, sync_interval=self.config.section("ledger").sync_interval)
        self.replicator.start()
        self._heartbeat_sealer = Sealer(
            self.schedule, f"{sealer.topic.decode()}{HEARTBEAT_TOPIC_SUFFIX}", self.token.max_message_size
        )
        self.host.subscribe(
            self._heartbeat_sealer.topic.decode(), self._on_heartbeat, validate=self._heartbeat_check(self._heartbeat_sealer)
        )
        self._pulls_served: dict[str, float] = {}  # peer -> when we last answered its pull
        self.host.set_stream_handler(LEASE_PULL_PROTOCOL, self._serve_heartbeat_pull)

        membership = self.config.section("membership")
        self.membership = Membership(
            self.peer_id,
            self._emit_peer_event,
            network_id=self.network_id,
            ttl=membership.peer_ttl,
            refresh_budget=membership.refresh_budget,
        )
        for peer_id, info in self.ledger.items(NODES_BUCKET).items():
            if is_node_key(peer_id) and isinstance(info, dict):
                # entries from disk are old news: remember them without counting them alive
                self.membership.remember(peer_id, info)
        self.membership.start()

        self._running = True
        await call_hook(self.manager, "kairos_startup", node=self)
        self.announce()
        self._spawn(self._every(membership.announce_interval, self.announce), "announce")
        self._spawn(self._every(1.0, self.membership.expire), "membership-expiry")
        self.dial_manager.start()
        # a record may arrive before this node can tell who led its epoch: look again each second
        self._spawn(self._every(1.0, self.revocations.refresh), "revocations")
        self._spawn(self._every(1.0, self.rotator.refresh), "token-rotation")

        await self._start_discovery()
        election = self.config.section("election")
        self.election = Election(
            self.peer_id,
            self.ledger,
            self.membership,
            self._emit_leader,
            network_id=self.network_id,
            lease_seconds=election.lease_seconds,
            eligible=self.leader_eligible,
            require_majority=election.require_majority,
            quorum_horizon=election.quorum_horizon,
            probe=self._probe,
            heartbeat=self._publish_heartbeat,
            pull=self._pull_heartbeat,
            joined=self._joined,
        )
        self.election.start()
        if self.config["api"]["enable"]:
            self.api = APIServer(self, self.config.api_socket)
            await self.api.start()
        if self.config["api"]["metrics_listen"]:
            self.metrics_server = APIServer(self, None, metrics_listen=self.config["api"]["metrics_listen"])
            await self.metrics_server.start()
        log.info("node %s up on %s", self.peer_id, ", ".join(self.host.addresses()), extra={"peer": self.peer_id})

    async def stop(self) -> None:
        """Stop everything, plugins first (while the ledger and the host still work).

        Every step is bounded and none can keep the later ones from running: the host, its trio
        thread and the ledger are always closed, whatever a plugin or a peer does meanwhile.
        """
        if not self._running and self.host is None:
            return
        self._running = False
        if self._announce_pending is not None:
            self._announce_pending.cancel()
            self._announce_pending = None
        if self._rtt_announce_pending is not None:
            self._rtt_announce_pending.cancel()
            self._rtt_announce_pending = None
        self._publish_epoch_record()  # before the final push carries it out
        try:
            steps = [
                self.api and self.api.stop,
                self.metrics_server and self.metrics_server.stop,
                self.election and self.election.stop,
                *(discovery.stop for discovery in self._discovery),
                lambda: call_hook(self.manager, "kairos_shutdown", node=self, timeout=SHUTDOWN_HOOK_TIMEOUT),
                self.replicator and self.replicator.final_push,
                self.membership and self.membership.stop,
                self.replicator and self.replicator.stop,
            ]
            for step in steps:
                if step:
                    await self._bounded(step())
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if self.dial_manager:
                await self._bounded(self.dial_manager.stop())
        finally:
            if self.host:
                host, self.host = self.host, None
                await self._bounded(host.stop())
            if self.ledger:
                self.ledger.close()
            self._stopped.set()

    async def _bounded(self, step) -> None:
        try:
            await asyncio.wait_for(step, STOP_STEP_TIMEOUT)
        except Exception as exc:  # a stuck or failing step is logged; shutdown goes on
            log.warning("shutdown step %s: %s: %s", getattr(step, "__qualname__", step), type(exc).__name__, exc)

    def _host_died(self, error: BaseException) -> None:
        # A node without its p2p host looks alive (API, status) and reaches no one: worse than
        # stopping. It stops, and `kairos run` exits 1 so that a supervisor restarts it.
        if self.failure is None:
            self.failure = f"the libp2p host died: {error!r}"
            self.failed.set()

    async def wait_stopped(self) -> None:
        """Return once :meth:`stop` has finished."""
        await self._stopped.wait()

    # ---------------------------------------------------------------------------------------
    # what plugins and the API read
    # ---------------------------------------------------------------------------------------
    @property
    def leader(self) -> tuple[str, int] | None:
        """``(peer_id, epoch)`` of the current leader as this node knows it, or None."""
        return self.election.leader if self.election else None

    @property
    def is_leader(self) -> bool:
        """Whether this node is the leader now."""
        return bool(self.election and self.election.is_leader)

    @property
    def api_socket(self) -> Path | None:
        """The local API's unix socket, or None when ``api.enable`` is false."""
        return self.config.api_socket if self.config["api"]["enable"] else None

    def members(self) -> dict[str, dict[str, Any]]:
        """Alive peers (not this node) with their advertised entries."""
        return self.membership.alive() if self.membership else {}

    # --- the rest of the plugin contract (kairos_core.plugin.NodeView) ------------------------
    def neighbours(self) -> set[str]:
        """Peers connected now that passed admission."""
        return self.host.admitted_peers() if self.host else set()

    def addresses(self) -> list[str]:
        """The multiaddrs this node is reachable at now (empty while it is not running)."""
        return self.host.addresses() if self.host else []

    def rtt(self, peer_id: str) -> float | None:
        """The smoothed round-trip time to a connected, admitted peer in seconds, or None."""
        return self.host.rtt(peer_id) if self.host else None

    def describe_peers(self) -> list[dict[str, Any]]:
        """``GET /api/peers``: every known peer (see :meth:`Membership.describe`) and, for those
        connected now, ``transport`` (direct, relayed or punched) and ``rtt_ms`` (None until measured)."""
        rows = self.membership.describe() if self.membership else []
        links = self.host.links() if self.host else {}
        for row in rows:
            link = links.get(row["peer_id"])
            rtt = link["rtt_s"] if link else None
            row["transport"] = link["transport"] if link else None
            row["rtt_ms"] = None if rtt is None else round(rtt * 1000, 2)
        return rows

    def lease_holder(self, epoch: int) -> str | None:
        """The leader of ``epoch``, as the members attest it, or None.

        A token holder can sign a lease of any epoch for an identity it made up, with an early
        claim, so "the winning valid lease" alone proves nothing. The answer, in order:

        1. the leader this node itself announced for ``epoch`` (recorded in its own entry
           ``nodes/<peer_id>/epochs``, so it survives restarts);
        2. the winner among the leases the election counts (holders this node or vouched-for
           members, within the epoch chain);
        3. what the vouched-for members recorded for ``epoch`` (the most of them).
        """
        own = self._epoch_record(self.peer_id).get(str(epoch))
        if own is not None:
            return own
        if self.election is not None:
            lease = winner([lease for lease in self.election.leases() if lease.epoch == epoch and self.election.credible(lease)])
            if lease is not None:
                return lease.peer
        if self.membership is None:
            return None
        horizon = self.config.section("election").quorum_horizon
        votes = Counter(
            record
            for peer in self.membership.recently_alive(horizon)
            if (record := self._epoch_record(peer).get(str(epoch))) is not None
        )
        return votes.most_common(1)[0][0] if votes else None

    def _known_epoch(self) -> int | None:
        """The highest epoch this node knows: the election's (held or lapsed), else — at start,
        before the election runs — the newest one this node recorded in its own entry."""
        if self.election is not None:
            lease = self.election.current()
            if lease is not None:
                return lease.epoch
        recorded = [int(epoch) for epoch in self._epoch_record(self.peer_id) if epoch.isdigit()]
        return max(recorded) if recorded else None

    def _epoch_record(self, peer_id: str) -> dict[str, str]:
        value = self.ledger.get(NODES_BUCKET, f"{peer_id}/{EPOCH_RECORD}") if self.ledger else None
        record = {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(value, dict) else {}
        if peer_id == self.peer_id:
            record.update(self._epochs_unpublished)
        return record

    def _record_epoch(self, leader: str, epoch: int) -> None:
        """Note who led ``epoch`` (what lease_holder and other nodes read): at once here, in our
        own entry after a random wait (EPOCH_RECORD_DELAY)."""
        if self._epoch_record(self.peer_id).get(str(epoch)) == leader:
            return
        self._epochs_unpublished[str(epoch)] = leader
        if self._epoch_record_pending is not None:
            return  # the pending write will carry this epoch too
        members = self.membership.alive_count() if self.membership is not None else 0
        delay = EPOCH_RECORD_DELAY + random.uniform(0, members * EPOCH_RECORD_SPREAD)
        try:
            self._epoch_record_pending = asyncio.get_running_loop().call_later(delay, self._publish_epoch_record)
        except RuntimeError:  # outside the loop (a test): publish now
            self._publish_epoch_record()

    def _publish_epoch_record(self) -> None:
        if self._epoch_record_pending is not None:
            self._epoch_record_pending.cancel()
            self._epoch_record_pending = None
        if not self._epochs_unpublished or self.ledger is None:
            return
        record = self._epoch_record(self.peer_id)
        kept = sorted(record, key=int)[-EPOCHS_RECORDED:]
        try:
            self.ledger.set(NODES_BUCKET, f"{self.peer_id}/{EPOCH_RECORD}", {k: record[k] for k in kept})
        except Exception:  # kept in memory (lease_holder still answers); the next election retries
            self.counters["background_errors"] += 1
            log.exception("recording the leaders of epochs %s failed", ", ".join(sorted(self._epochs_unpublished, key=int)))
        else:
            self._epochs_unpublished.clear()

    async def open_stream(self, peer_id: str, protocol: str):
        """Open ``protocol`` to an admitted neighbour; :class:`KairosError` when it cannot."""
        from .p2p import P2PError

        if self.host is None:
            raise KairosError("the node is not running")
        try:
            if not self.host.is_admitted(peer_id):
                # not a neighbour (the degree is bounded): dial it at its advertised addresses
                info = self.ledger.get(NODES_BUCKET, peer_id) if self.ledger else None
                addrs = info.get("addresses") if isinstance(info, dict) else None
                if not (isinstance(addrs, list) and addrs):
                    raise KairosError(f"{peer_id} is not connected and advertises no address")
                await self._connected_soon(peer_id, [a for a in addrs if isinstance(a, str)])
            return await self.host.open_stream(peer_id, protocol)
        except P2PError as exc:
            raise KairosError(str(exc)) from None

    async def _connected_soon(self, peer_id: str, addrs: list[str]) -> None:
        """Dial ``peer_id`` at ``addrs`` and return once it is admitted — by this dial or by
        another way that wins meanwhile (the dialler's attempt at a relayed address learned a
        moment later, the peer dialling us): a dial of a NATed peer's own addresses takes its
        whole timeout to fail, and a stream that waited for it would start seconds late."""
        assert self.host is not None
        dial = asyncio.ensure_future(self.host.connect(addrs))
        # left to finish on its own when another way won: its failure is nobody's news then
        dial.add_done_callback(lambda done: done.cancelled() or done.exception())
        while not dial.done() and not self.host.is_admitted(peer_id):
            await asyncio.wait({dial}, timeout=CONNECTED_POLL)
        if not self.host.is_admitted(peer_id):
            dial.result()  # the dial's error

    def protect(self, peer_id: str, tag: str) -> None:
        """Keep the connection to ``peer_id`` while ``tag`` needs it."""
        if self.connections is not None:
            self.connections.protect(peer_id, tag)

    def unprotect(self, peer_id: str, tag: str) -> None:
        """``tag`` no longer needs the connection to ``peer_id``."""
        if self.connections is not None:
            self.connections.unprotect(peer_id, tag)

    def serve(self, protocol: str, handler) -> None:
        """Serve ``protocol`` to admitted peers (see :meth:`P2PHost.set_stream_handler`)."""
        if self.host is None:
            raise KairosError("the node is not running")
        self.host.set_stream_handler(protocol, handler)

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name``."""
        self.counters[name] += n

    def set_counters(self, prefix: str, values) -> None:
        """Publish a plugin's own counters as ``<prefix>_<name>``."""
        for name, value in values.items():
            self.counters[f"{prefix}_{name}"] = value

    def counter(self, name: str, help: str, labels=()) -> Metric:
        """Declare a counter (exported as ``kairos_<name>_total`` with ``help``)."""
        return self.metrics.counter(name, help, labels)

    def gauge(self, name: str, help: str, labels=()) -> Metric:
        """Declare a gauge (exported as ``kairos_<name>`` with ``help``)."""
        return self.metrics.gauge(name, help, labels)

    def set_state(self, plugin: str, text: str | None) -> None:
        """Say what ``plugin`` waits for (shown by ``kairos status``); None when it waits no more."""
        if text:
            self.states[plugin] = str(text)
        else:
            self.states.pop(plugin, None)

    def spawn(self, coro, name: str) -> asyncio.Task:
        """Run ``coro`` for the node's lifetime: cancelled at shutdown, a failure logged."""
        return self._spawn(self._logged(coro, name), name)

    def clock_version(self) -> tuple[int, int]:
        """A fresh hybrid-logical-clock reading ``(wall_ms, counter)``."""
        version = self.ledger.clock.tick()
        return version[0], version[1]

    async def call_hook(self, name: str, *, firstresult: bool = False, **kwargs: Any) -> Any:
        """Call hook ``name`` of every plugin with ``node`` and ``kwargs``: all non-None results,
        or the first one with ``firstresult`` (implementations run in registration order, the
        latest registered first, as pluggy orders them)."""
        result = await call_hook(self.manager, name, node=self, **kwargs)
        if firstresult:
            return result.results[0] if result.results else None
        return list(result.results)

    async def _logged(self, coro, name: str) -> Any:
        try:
            return await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            self.counters["background_errors"] += 1
            log.exception("task %s failed", name)
            return None

    def status(self) -> dict[str, Any]:
        """A summary for ``kairos status`` and the API."""
        leader = self.leader
        counters: Counter[str] = Counter(self.counters)
        if self.ledger:
            counters.update({f"ledger_{k}": v for k, v in self.ledger.counters.items()})
        if self.replicator:
            counters.update(self.replicator.counters)
        if self.host:
            counters.update({f"p2p_{k}": v for k, v in getattr(self.host, "counters", {}).items()})
        if self.dialer:
            counters.update({f"p2p_{k}": v for k, v in self.dialer.counters.items()})
        if self.election:
            counters.update({f"election_{k}": v for k, v in self.election.counters.items()})
        if self.ledger:
            counters["ledger_rejected_revoked"] = self.ledger.policies.refused_revoked
        return {
            "peer_id": self.peer_id,
            "hostname": self.hostname,
            "network_id": self.network_id,
            "token_fingerprint": self.token.fingerprint,
            "version": __version__,
            "addresses": self.host.addresses() if self.host else [],
            "reachability": self.host.reachability() if self.host else None,
            "leader": {"peer_id": leader[0], "epoch": leader[1]} if leader else None,
            "is_leader": self.is_leader,
            "members": len(self.members()),
            "admitted": len(self.host.admitted_peers()) if self.host else 0,
            # the peers each ledger message is copied to and from (gossipsub D_lo..D_hi)
            "gossip_mesh": self.host.gossip_mesh_size(self.replicator.topic) if self.host and self.replicator else 0,
            "ledger_entries": len(self.ledger) if self.ledger else 0,
            # equal on two nodes: they hold the same entries (compare nodes with it, or wait for it)
            "ledger_fingerprint": ledger_fingerprint(self.ledger) if self.ledger else None,
            "uptime_s": round(time.monotonic() - self.started_at, 1) if self.started_at else 0,
            "states": dict(sorted(self.states.items())),
            "counters": dict(sorted(counters.items())),
        }

    def leader_eligible(self) -> bool:
        """Config ``election.eligible`` and no plugin's ``kairos_leader_eligible`` said False."""
        if not self.config["election"]["eligible"]:
            return False
        votes = call_hook_sync(self.manager, "kairos_leader_eligible", node=self)
        return not any(vote is False for vote in votes.results)

    def announce(self) -> None:
        """Write this node's entry in ``nodes`` if it changed, or as a refresh
        every :meth:`~kairos_core.membership.Membership.refresh_interval` (a third of
        ``membership.peer_ttl``, longer on a network too large for ``membership.refresh_budget``):
        its advertisement and the peers it
        vouches for (connected and admitted: see :mod:`kairos_core.membership`).

        Every entry reaches every node, so rewriting an unchanged one on each round would cost each
        node work in proportion to the network's size; liveness does not need it (the vouchers say
        who is alive), only the TTL on vouchers' entries does, which the refresh keeps.
        """
        neighbours = sorted(self.host.admitted_peers())[:MAX_NEIGHBOURS] if self.host else []
        nat = self.host.reachability() if self.host else None
        advertised = {
            "network_id": self.network_id,
            "hostname": self.hostname,
            "addresses": self.host.addresses() if self.host else [],
            "version": __version__,
            "role": self.config["p2p"]["role"],
            "eligible": self.leader_eligible(),
            "neighbours": neighbours,
            "box": self._box,
            # issue #15: public | private | unknown, and where admitted peers see this node
            "reachability": nat["reachability"] if nat else "unknown",
            # the IPs only: the ports peers see are our outbound connections' ephemeral ones,
            # which change with whichever 3 peers the last reachability round asked, and
            # rewrote this entry (which every node receives) about once a minute for nothing
            "observed": _observed_ips(nat["observed"]) if nat else [],
        }
        links = self.host.links() if self.host else {}
        # issue #17: which neighbours are reached through a relay, for the dashboards of others
        advertised["relayed"] = [peer for peer in neighbours if links.get(peer, {}).get("transport") == "relayed"]
        # the floor, not the smoothed value: a hiccup of two busy processes is no news for others
        measured = {peer: _rtt_ms(links[peer]["floor_s"]) for peer in neighbours if links.get(peer, {}).get("floor_s")}
        self._rounds_unchanged += 1
        membership = self.config.section("membership")
        refresh_every = (
            self.membership.refresh_interval() if self.membership is not None else membership.peer_ttl / REFRESHES_PER_TTL
        )
        refresh_rounds = max(1, int(refresh_every / membership.announce_interval))
        now = time.monotonic()
        first = any(peer not in self._published_rtt for peer in measured)
        if advertised == self._advertised and self._rounds_unchanged < refresh_rounds:
            moved = any(_rtt_moved(self._published_rtt.get(peer), value) for peer, value in measured.items())
            if not (first or moved):
                return
            # (membership is walked only now that an RTT rewrite is in question: this runs every round)
            first_on_a_small_network = first and not self._network_above_low()  # goes out now
            if not first_on_a_small_network:  # an RTT-only rewrite, within the network's budget
                interval = self._rtt_rewrite_interval()
                if not interval or now - self._written_at < interval:
                    return
        reason = self._write_reason(advertised, refresh_rounds, first)
        self.counters[f"entry_writes_{reason}"] += 1
        self._advertised, self._rounds_unchanged = advertised, 0
        self._published_rtt, self._written_at = measured, now
        self._lazy_since = None  # whatever waited for a lazy write is in this one
        self._beat += 1
        # rtt_ms lines up with neighbours (a peer id per value would double the entry's size)
        rtts = [measured.get(peer) for peer in neighbours]
        self.ledger.set(NODES_BUCKET, self.peer_id, {**advertised, "rtt_ms": rtts, "beat": self._beat})
        if len(measured) < len(neighbours):
            if not self._network_above_low():
                self._announce_later("_rtt_announce_pending", RTT_FIRST_DELAY)
            elif interval := self._rtt_rewrite_interval():
                self._announce_later("_rtt_announce_pending", max(RTT_FIRST_DELAY, interval))

    def _rtt_rewrite_interval(self) -> float:
        """The least time between two rewrites of our entry for RTTs alone (0: never alone):
        ``membership.rtt_publish_interval``, stretched so that the whole network's RTT-only
        rewrites stay below RTT_REWRITES_PER_S_NETWORK."""
        interval = self.config.section("membership").rtt_publish_interval
        if interval and self.membership is not None:
            interval = max(interval, (self.membership.alive_count() + 1) / RTT_REWRITES_PER_S_NETWORK)
        return interval

    def _write_reason(self, advertised: dict[str, Any], refresh_rounds: int, first_rtt: bool) -> str:
        """Why our entry is rewritten now (counted as ``entry_writes_<reason>``: every write
        reaches every node, so which changes cost the network is worth seeing)."""
        before = self._advertised
        if before is None:
            return "first"
        if advertised["neighbours"] != before["neighbours"]:
            return "neighbours_lost" if set(before["neighbours"]) - set(advertised["neighbours"]) else "neighbours_added"
        if advertised != before:
            return "advertisement"
        if self._rounds_unchanged >= refresh_rounds:
            return "refresh"
        return "rtt_first" if first_rtt else "rtt_moved"

    def _announce_soon(self, spaced: bool = False) -> None:
        # Our neighbours or our addresses changed: others learn who is alive from whom we vouch
        # for, and how to reach us from our addresses. Say it soon, once per burst.
        self._announce_later("_announce_pending", NEIGHBOUR_ANNOUNCE_DELAY, spaced=spaced)

    def _announce_later(self, slot: str, delay: float, *, spaced: bool = True) -> None:
        """Announce in ``delay`` seconds unless the timer in attribute ``slot`` is pending already
        (an unspaced call brings a later pending one forward). ``spaced``: and no sooner than
        ANNOUNCE_SPACING after the last write."""
        if not self._running:
            return
        if spaced and self._written_at:
            delay = max(delay, self._written_at + ANNOUNCE_SPACING - time.monotonic())
        pending = getattr(self, slot)
        if pending is not None:
            try:
                late = pending.when() > asyncio.get_running_loop().time() + delay
            except RuntimeError:
                late = False
            if not late:
                return
            pending.cancel()
            setattr(self, slot, None)
        self._schedule_announce(slot, delay)

    def _announce_lazily(self) -> None:
        """A change nobody needs at once (a connection to a peer others vouch for, the trim of one):
        written NEIGHBOUR_ADDED_LAZY_DELAY after the last such change, at most
        NEIGHBOUR_ADDED_LAZY_LIMIT after the first; an urgent announcement pending takes it along."""
        if not self._running:
            return
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:
            return  # outside the loop (a test): the next round's announce() writes it
        pending = self._announce_pending
        if pending is not None and not self._announce_is_lazy:
            return  # an urgent write is coming, and writes this change too
        if self._lazy_since is None:
            self._lazy_since = now
        when = min(now + NEIGHBOUR_ADDED_LAZY_DELAY, self._lazy_since + NEIGHBOUR_ADDED_LAZY_LIMIT)
        if pending is not None:
            pending.cancel()
            self._announce_pending = None
        self._schedule_announce("_announce_pending", max(0.0, when - now), lazy=True)

    def _schedule_announce(self, slot: str, delay: float, *, lazy: bool = False) -> None:
        def announce_now() -> None:
            setattr(self, slot, None)
            if slot == "_announce_pending":
                self._announce_is_lazy, self._lazy_since = False, None
            if self._running and self.ledger is not None:
                try:
                    self.announce()
                except Exception:
                    self.counters["background_errors"] += 1
                    log.exception("announcing this node's entry failed")

        try:
            setattr(self, slot, asyncio.get_running_loop().call_later(delay, announce_now))
        except RuntimeError:  # announce() called outside the loop (a test): no follow-up
            return
        if slot == "_announce_pending":
            self._announce_is_lazy = lazy

    async def connect(self, addrs: str | list[str]) -> str:
        """Dial and admit a peer by multiaddr(s); returns its peer id."""
        return await self.host.connect(addrs)

    # ---------------------------------------------------------------------------------------
    # internals
    # ---------------------------------------------------------------------------------------
    def _open_ledger(self) -> Ledger:
        """Open the ledger with the core's bucket policies and those plugins name (``kairos_ledger_policies``).

        The policies are registered before the first entry is loaded or merged. A plugin whose
        policies cannot be registered stops the node: a bucket left open by mistake would accept
        forged entries and keep them, on this node and every node it syncs with.
        """
        import inspect
        from collections.abc import Mapping

        from .errors import PluginError
        from .ledger import PolicyRegistry
        from .ledger.policy import DEFAULT_POLICIES

        registry = PolicyRegistry()
        owners: dict[str, str] = {}
        arguments = {"node": self}
        for impl in reversed(self.manager.pm.hook.kairos_ledger_policies.get_hookimpls()):
            plugin = impl.plugin_name
            try:
                declared = impl.function(*[arguments[name] for name in impl.argnames])
            except Exception as exc:
                raise PluginError(f"plugin {plugin} could not name its ledger policies: {type(exc).__name__}: {exc}") from None
            if inspect.isawaitable(declared):
                if inspect.iscoroutine(declared):
                    declared.close()
                raise PluginError(f"plugin {plugin}: kairos_ledger_policies must not be async")
            if declared is None:
                continue
            if not isinstance(declared, Mapping):
                raise PluginError(f"plugin {plugin}: kairos_ledger_policies must return a mapping of bucket names to policies")
            for bucket, policy in declared.items():
                if not isinstance(bucket, str) or not bucket or not callable(getattr(policy, "allows", None)):
                    raise PluginError(
                        f"plugin {plugin}: kairos_ledger_policies maps {bucket!r} to {policy!r}, not to a write policy"
                    )
                if bucket in DEFAULT_POLICIES:
                    raise PluginError(f"plugin {plugin}: bucket {bucket!r} is the core's; its policy cannot be replaced")
                if bucket in owners:
                    raise PluginError(f"ledger bucket {bucket!r} is claimed by both {owners[bucket]} and {plugin}")
                owners[bucket] = plugin
                registry.register(bucket, policy)
        return open_ledger(self.identity, self.config.state_dir, self.config["ledger"], policies=registry)

    async def _start_discovery(self) -> None:
        p2p = self.config["p2p"]
        if p2p["disable_dht"]:  # with the DHT on, its rounds reach them
            for addr in p2p["bootstrap_peers"]:
                peer_id = addr.rsplit("/p2p/", 1)[-1] if "/p2p/" in addr else None
                if peer_id:
                    self.dial_manager.pin(peer_id, [addr])
        if not p2p["disable_mdns"]:
            from .discovery.mdns import MDNSDiscovery

            mdns = MDNSDiscovery(self.schedule, self.peer_id, self.host.addresses, self._discovered_by("mdns"))
            await self._start_one(mdns, "mDNS")
        if not p2p["disable_dht"]:
            from .discovery.dht import DHTRendezvous

            dht = DHTRendezvous(
                self.host,
                self.schedule,
                self._discovered_by("dht"),
                list(p2p["bootstrap_peers"]),
                saturated=self.connections.saturated,
            )
            await self._start_one(dht, "DHT")

    async def _start_one(self, discovery: Any, name: str) -> None:
        try:
            await discovery.start()
        except Exception as exc:  # a node without multicast still works through the DHT
            log.error("%s discovery could not start: %s: %s", name, type(exc).__name__, exc)
            return
        self._discovery.append(discovery)

    def _discovered_by(self, source: str):
        """The callback of one discovery: counts what it finds (kairos doctor shows it)."""

        async def discovered(peer_id: str, addrs: list[str]) -> None:
            self.counters[f"discovered_{source}"] += 1
            self.discovered[source].add(peer_id)
            await self._discovered(peer_id, addrs)

        return discovered

    async def _discovered(self, peer_id: str, addrs: list[str]) -> None:
        if self._running and self.dialer and not self.revocations.is_revoked(peer_id):
            self.dialer.discovered(peer_id, addrs)

    # --- lease heartbeats (kairos_core.election: renewals that are gossiped, not stored) -----------
    async def _publish_heartbeat(self, epoch: int) -> None:
        version = self.ledger.clock.tick()
        beat = encode_heartbeat(self.identity, self.network_id, epoch, (version[0], version[1]))
        await self.host.publish(self._heartbeat_sealer.topic.decode(), self._heartbeat_sealer.seal(beat))
        self.counters["heartbeats_sent"] += 1

    async def _pull_heartbeat(self, peer_id: str, epoch: int) -> Heartbeat | None:
        """A fresh heartbeat of ``peer_id``'s lease, asked of it directly (dialled if it is not a
        neighbour: a connection the dial manager did not choose, trimmed later like any other);
        None when it does not answer within PULL_TIMEOUT or answers nothing (it does not lead)."""
        self.counters["heartbeat_pulls"] += 1

        async def pull() -> Heartbeat | None:
            if not self.host.is_admitted(peer_id):
                addrs = self._advertised_addresses(peer_id)
                if not addrs:
                    return None
                self.counters["heartbeat_pull_dials"] += 1
                await self.host.connect(addrs)
            stream = await self.host.open_stream(peer_id, LEASE_PULL_PROTOCOL)
            try:
                frame = await stream.read_exactly(HEARTBEAT_SIZE)
            finally:
                with suppress(Exception):
                    await stream.close()
            beat = decode_heartbeat(self.network_id, frame)
            return beat if beat is not None and (beat.peer, beat.epoch) == (peer_id, epoch) else None

        try:
            beat = await asyncio.wait_for(pull(), PULL_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception:
            beat = None
        if beat is None:
            self.counters["heartbeat_pulls_unanswered"] += 1
        return beat

    async def _serve_heartbeat_pull(self, stream) -> None:
        """Answer a pull with a fresh heartbeat of our lease while we lead (else nothing)."""
        try:
            election, peer, now = self.election, stream.peer_id, time.monotonic()
            leader = election.leader if election is not None else None
            if leader is None or leader[0] != self.peer_id or now - self._pulls_served.get(peer, -PULL_SPACING) < PULL_SPACING:
                return
            if len(self._pulls_served) > 64:
                self._pulls_served.clear()  # (only candidates pull, and only after a lapse: a handful)
            self._pulls_served[peer] = now
            version = self.ledger.clock.tick()
            await stream.write(encode_heartbeat(self.identity, self.network_id, leader[1], (version[0], version[1])))
            self.counters["heartbeat_pulls_served"] += 1
        finally:
            with suppress(Exception):
                await stream.close()

    def _heartbeat_check(self, sealer: Sealer) -> Callable[[bytes], bool]:
        """The gossip validator of the heartbeat topic (runs on the p2p thread, for each message).

        Forwarded only: a sealed, well-signed heartbeat of the peer this node takes for the
        current leader, at most one per half renewal interval per signer. So a member cannot make
        the whole network carry heartbeats of identities it made up, nor of itself at a high rate;
        what it is refused counts against the forwarder's gossip score. A new leader's first
        heartbeat, reaching a node that has not yet seen its confirmed lease, is refused there —
        the lease entry itself renews the lease.
        """
        opener = Sealer(sealer.schedule, sealer.topic.decode(), sealer.max_frame_size)  # this thread's own
        last_accepted: dict[str, float] = {}

        def check(frame: bytes) -> bool:
            try:
                beat = decode_heartbeat(self.network_id, opener.open(frame, check_replay=False))
            except SealError:
                return False
            election = self.election
            if beat is None or election is None or beat.peer != election.heartbeat_signer:
                return False
            now, spacing = time.monotonic(), HEARTBEAT_MIN_SPACING * election.renew_interval
            if now - last_accepted.get(beat.peer, -spacing) < spacing:
                return False
            if len(last_accepted) > 16:
                last_accepted.clear()  # signers change only with leaders: never more than a few
            last_accepted[beat.peer] = now
            return True

        return check

    async def _on_heartbeat(self, origin: str, frame: bytes) -> None:
        try:
            beat = decode_heartbeat(self.network_id, self._heartbeat_sealer.open(frame))
        except SealError as exc:
            self.counters[f"heartbeats_dropped_{exc.reason}"] += 1
            return
        if beat is None:
            self.counters["heartbeats_dropped_invalid"] += 1
            return
        if self.election is not None:
            self.election.observe_heartbeat(beat)

    def _joined(self) -> bool:
        """No dial in flight, and a sync completed with every admitted peer: what the network's
        ledger holds (a sitting leader's lease) is here now. With no admitted peer, joined only
        when it knows nobody to dial either and every discovery has had its look around (alone):
        a joiner whose dials time out on a busy network is between two of them, not alone
        (twelve joiners of a 100-node run claimed epoch 1 so)."""
        if self.dialer is not None and self.dialer.dialling():
            return False
        if self.host is not None and not self.host.admitted_peers():
            if self.dial_manager is not None and self.dial_manager.has_candidates():
                return False
            # and alone only once every discovery has had its look around: on a loaded machine
            # mDNS answers take longer than STARTUP_GRACE (two joiners of a 100-node run claimed
            # epoch 1 before discovery had shown them anyone)
            return all(discovery.looked() for discovery in self._discovery)
        return self.replicator is None or self.replicator.synced_with_admitted()

    async def _probe(self, peer_id: str) -> bool:
        """Whether ``peer_id`` answers a dial at its advertised addresses within a second."""
        addrs = self._advertised_addresses(peer_id)
        if not addrs:
            return False
        self.counters["leader_probes"] += 1
        if not self.host.is_admitted(peer_id):
            self.counters["leader_probe_dials"] += 1  # (a connection the dial manager did not choose)
        try:
            await asyncio.wait_for(self.host.connect(addrs), PROBE_TIMEOUT)
        except Exception:
            return False
        return True

    async def _peer_admitted(self, peer_id: str) -> None:
        host = self.host
        if host is None or not self._running:
            return  # an admission that raced our shutdown: nothing is left to tell
        if peer_id not in host.admitted_peers():
            return  # it already left again: the disconnect was handled, do not resurrect it
        self.dial_manager.admitted(peer_id)
        self.membership.connected(peer_id)
        self.replicator.peer_admitted(peer_id)
        if self._vouched_without_us(peer_id):
            self._announce_lazily()
        elif self._network_above_low():
            # others that admitted this peer just now see it unvouched too: the first to write
            # spares the rest (see UNVOUCHED_SPREAD)
            delay = random.uniform(NEIGHBOUR_ANNOUNCE_DELAY, UNVOUCHED_SPREAD)
            asyncio.get_running_loop().call_later(delay, self._announce_if_unvouched, peer_id)
        else:
            self._announce_soon(spaced=True)

    def _announce_if_unvouched(self, peer_id: str) -> None:
        if not self._running:
            return
        if self._vouched_without_us(peer_id):
            self.counters["unvouched_announcements_spared"] += 1
            self._announce_lazily()
        else:
            self._announce_soon(spaced=True)

    def _network_above_low(self) -> bool:
        """More members alive than ``p2p.connections.low``: not every node is connected to every
        node, and each write of our entry costs every one of them."""
        return self.membership is not None and self.membership.alive_count() > self.config["p2p"]["connections"]["low"]

    def _vouched_without_us(self, peer_id: str) -> bool:
        """Whether others' entries keep ``peer_id`` alive without our connection to it, on a
        network above ``p2p.connections.low`` (a small one stays a full mesh that says
        everything at once)."""
        if not self._network_above_low():
            return False
        return peer_id in self.membership.vouched(without=peer_id)

    async def _peer_disconnected(self, peer_id: str) -> None:
        if self.dial_manager:
            self.dial_manager.disconnected(peer_id)
        if self.replicator:
            self.replicator.peer_gone(peer_id)
        if self.membership:
            self.membership.disconnected(peer_id)
        if self.dial_manager is not None and self.dial_manager.trimmed(peer_id) and self._vouched_without_us(peer_id):
            # a trim is a choice of degree, and others keep the peer alive: no news for liveness
            # (should the peer crash meanwhile, its other vouchers drop it; our entry names it
            # until the lazy write, at most NEIGHBOUR_ADDED_LAZY_LIMIT)
            self.counters["trims_announced_lazily"] += 1
            self._announce_lazily()
        else:
            self._announce_soon()

    def revoke(self, peer_id: str, reason: str = "") -> tuple[dict[str, Any], bool]:
        """Revoke ``peer_id`` network-wide (the leader only); ``(record, newly written)``.

        :class:`KairosError` says why not (not the leader: which node is; not a peer id; itself).
        """
        if self.revocations is None:
            raise KairosError("the node is not running")
        record, written = self.revocations.revoke(peer_id, leader=self.leader, reason=reason)
        return record.as_dict(), written

    def rotate_token(self) -> dict[str, Any]:
        """A new network token for every member (the leader only; :mod:`kairos_core.rotation`)."""
        if self.rotator is None:
            raise KairosError("the node is not running")
        summary = self.rotator.rotate(self.leader, self.config.section("p2p").token_grace, adopt=False)
        self._spawn(self._adopt_rotated_token(), "token-rotation")
        return summary

    async def _adopt_rotated_token(self) -> None:
        # The members' sealed copies must leave under the old key (see Rotator.rotate): publish
        # them now, then switch. The batcher seals a batch before its first await, so nothing
        # written before this point goes out under the new key.
        try:
            if self.replicator is not None:
                await self.replicator.batcher.flush()
        finally:
            if self.rotator is not None:
                self.rotator.adopt_pending()

    def _rotation_members(self) -> dict[str, str]:
        """The members to seal a rotated token to, with their box keys: attested members alive now
        or within the quorum horizon (so one offline for a while is included), never a revoked
        one, never an identity nobody admitted (an insider's made-up ones would get the token)."""
        horizon = self.config.section("election").quorum_horizon
        found: dict[str, str] = {}
        for peer_id in self.membership.recently_alive(horizon) if self.membership else ():
            info = self.ledger.get(NODES_BUCKET, peer_id)
            box = info.get("box") if isinstance(info, dict) else None
            if isinstance(box, str) and not self.revocations.is_revoked(peer_id):
                found[peer_id] = box
        return found

    def _token_rotated(self, token) -> None:
        self.token = token
        self.counters["token_rotations"] += 1

    def _peers_revoked(self, peers: frozenset[str]) -> None:
        """Peers newly revoked (kairos_core.revocation): refuse them everywhere, at once."""
        self.counters["peers_revoked"] += len(peers)
        self.ledger.policies.refuse_owners(self.revocations.revoked)
        if self.membership is not None:
            self.membership.exclude(peers)
        if self.dialer is not None:
            for peer_id in peers:
                self.dialer.forget(peer_id)
        if self.host is not None and self._running:
            self._spawn(self._logged(self.host.revoke(peers), "revoke"), "revoke")

    def _on_ledger_update(self, update: LedgerUpdate) -> None:
        if update.bucket == REVOKED_BUCKET and self.revocations is not None and self._running:
            self.revocations.refresh()
        if update.bucket == ROTATION_BUCKET and self.rotator is not None and self._running:
            self.rotator.refresh()
        if update.bucket == NODES_BUCKET and self.membership and update.key != self.peer_id and is_node_key(update.key):
            if not update.local and update.owner == update.key:
                self.clock_offsets.observe(update.key, update.version[0])
            self.membership.entry_changed(update.key, update.value if isinstance(update.value, dict) else None)
        if self.election:
            self.election.observe(update)
        self._ledger_events.put_nowait(("on_ledger_update", {"node": self, "update": update}))

    async def _emit_peer_event(self, event: PeerEvent) -> None:
        await call_hook(self.manager, "on_peer", node=self, event=event)

    async def _emit_leader(self, leader: str, epoch: int) -> None:
        self._record_epoch(leader, epoch)
        self._leader_events.put_nowait(("on_leader_elected", {"node": self, "leader": leader, "epoch": epoch}))

    async def _deliver_hooks(self, queue: asyncio.Queue) -> None:
        # Events of one queue reach plugins in the order they happened.
        while True:
            name, kwargs = await queue.get()
            await call_hook(self.manager, name, **kwargs)

    def _advertised_addresses(self, peer_id: str) -> list[str]:
        """The multiaddrs ``peer_id``'s entry in ``nodes`` advertises (the dial manager dials them)."""
        info = self.ledger.get(NODES_BUCKET, peer_id) if self.ledger else None
        addrs = info.get("addresses") if isinstance(info, dict) else None
        return [a for a in addrs if isinstance(a, str)] if isinstance(addrs, list) else []

    async def _every(self, interval: float, step) -> None:
        """Run ``step()`` every ``interval`` seconds; one failure (a full disk, say) is logged, not fatal."""
        while True:
            await asyncio.sleep(interval)
            try:
                step()
            except Exception:
                self.counters["background_errors"] += 1
                log.exception("periodic %s failed", getattr(step, "__name__", step))

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


async def run_node(
    config: Config,
    manager: KairosPluginManager | None = None,
    *,
    reload: Callable[[], None] | None = None,
    progress: Callable[[Node], None] | None = None,
    progress_interval: float = 0.5,
) -> None:
    """Run a node until SIGINT or SIGTERM, then stop it cleanly.

    Under systemd (``Type=notify``) it says ``READY=1`` once the node is up and feeds the watchdog
    when ``WATCHDOG_USEC`` asks for it (:mod:`.sdnotify`); ``reload`` runs on SIGHUP; ``progress``
    is called with the node every ``progress_interval`` seconds (what ``kairos run`` shows in a
    terminal).
    """
    import signal

    from . import sdnotify

    node = Node(config, manager)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, reload)
    helpers: list[asyncio.Task] = []
    try:
        await node.start()
        sdnotify.notify(f"READY=1\nSTATUS=up as {node.peer_id}")
        interval = sdnotify.watchdog_interval()
        if interval is not None:
            # pinged from the event loop itself: a loop that hangs stops the pings, and systemd restarts us
            helpers.append(loop.create_task(_every_async(interval, lambda: sdnotify.notify("WATCHDOG=1"))))
        if progress is not None:
            helpers.append(loop.create_task(_every_async(progress_interval, lambda: progress(node))))
        stopping = loop.create_task(stop.wait())
        failing = loop.create_task(node.failed.wait())
        helpers += [stopping, failing]
        await asyncio.wait([stopping, failing], return_when=asyncio.FIRST_COMPLETED)
        if node.failure is not None:
            raise KairosError(f"{node.failure}; the node stopped")
    finally:
        log.info("stopping")
        sdnotify.notify("STOPPING=1")
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        await node.stop()  # bounded step by step: see Node.stop


async def _every_async(interval: float, step: Callable[[], Any]) -> None:
    while True:
        try:
            step()
        except Exception:  # a progress line or a ping that failed must not end the node
            log.exception("periodic %s failed", getattr(step, "__name__", step))
        await asyncio.sleep(interval)
