"""Prometheus metrics of a node: every counter it and its plugins keep, and a few gauges.

``GET /metrics`` on the local API (and on ``api.metrics_listen`` when set) answers in the text
exposition format, built by ``prometheus_client`` from one collector that reads the node at
scrape time — nothing is copied or kept twice:

- every counter of ``kairos status --json`` as ``kairos_<name>_total`` with its HELP text
  (counters named ``<name>:<protocol>``, the host's traffic counters, become one metric with a
  ``protocol`` label);
- gauges: ``kairos_members_alive``, ``kairos_connections``, ``kairos_is_leader``,
  ``kairos_leader_epoch``, ``kairos_ledger_entries{bucket}``, ``kairos_vpn_peers{path}``,
  ``kairos_p2p_bytes_total{direction}`` and ``kairos_vpn_bytes_total{direction}`` (counters),
  ``kairos_peer_rtt_seconds{peer,transport}`` (one series per admitted peer connected now: a peer
  that goes takes its series with it, so the labels are bounded by ``p2p.connections.high``);
- what plugins declare through :class:`MetricRegistry` (``NodeView.counter`` /
  ``NodeView.gauge``): their name, kind, HELP text and labels.

A plugin counter published through the older ``NodeView.count`` / ``set_counters`` without a
declaration is still exported, as a counter with a HELP text that says it was not described.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric as Family
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .errors import KairosError

if TYPE_CHECKING:
    from .node import Node

#: The Content-Type of ``GET /metrics``.
CONTENT_TYPE = CONTENT_TYPE_LATEST
PREFIX = "kairos_"
#: HELP of a counter published without a declaration (``NodeView.count`` / ``set_counters``).
UNDECLARED_HELP = "Counter {name} (published without a description; declare it with NodeView.counter)."
# At most this many label combinations per declared metric: a plugin labelling by peer id must not
# let the peers of a large network grow the exposition (and this process) without bound.
MAX_LABEL_SETS = 1024

# What each counter of the core counts. Names as in `kairos status --json`.
CORE_HELP: dict[str, str] = {
    "background_errors": "Periodic or background tasks of the node that failed (logged).",
    "connections_trimmed": "Connections closed because the node had more than p2p.connections.high.",
    "trims_spared_bridges": "Trims that kept a connection above p2p.connections.high: the only way to some member.",
    "trims_announced_lazily": "Trimmed connections to a peer others vouch for, announced with the next lazy write.",
    "unvouched_announcements_spared": "New connections to a peer nobody vouched for that another node announced first.",
    "entry_writes_first": "Writes of this node's nodes entry: the first one.",
    "entry_writes_neighbours_added": "Writes of this node's nodes entry: new connections (and none lost).",
    "entry_writes_neighbours_lost": "Writes of this node's nodes entry: a connection lost.",
    "entry_writes_advertisement": "Writes of this node's nodes entry: its addresses, role, eligibility or reachability changed.",
    "entry_writes_rtt_first": "Writes of this node's nodes entry: the first RTT of new neighbours.",
    "entry_writes_rtt_moved": "Writes of this node's nodes entry: RTTs that moved (membership.rtt_publish_interval).",
    "entry_writes_refresh": "Writes of this node's nodes entry: an unchanged entry refreshed for its TTL.",
    "repair_dials": "Dials of a member reached through nobody (a split overlay, or a crashed node) by a node at its degree.",
    "discovered_mdns": "Peers reported by mDNS discovery (each report counts).",
    "discovered_dht": "Peers reported by the DHT rendezvous (each report counts).",
    "ledger_applied": "Remote ledger entries applied.",
    "ledger_stale": "Remote ledger entries ignored: older than what this node holds.",
    "ledger_rejected_signature": "Remote ledger entries refused: bad signature.",
    "ledger_rejected_policy": "Remote ledger entries refused by the bucket's write policy.",
    "ledger_rejected_future": "Remote ledger entries refused: stamped further ahead than ledger.max_clock_drift.",
    "ledger_rejected_quota": "Remote ledger entries refused: their owner is over its quota.",
    "ledger_rejected_invalid": "Remote ledger entries refused: malformed.",
    "ledger_decode_errors": "Ledger deltas that could not be decoded.",
    "ledger_sync_errors": "Ledger sync exchanges that failed.",
    "ledger_pruned": "Tombstones pruned after ledger.tombstone_grace.",
    "ledger_watch_overflow": "Ledger updates a watcher missed because its queue was full.",
    "ledger_watch_dropped": "API watch clients dropped because they fell too far behind.",
    "ledger_listener_errors": "Ledger listeners that raised.",
    "ledger_clock_capped": "Remote versions that would have moved the ledger clock too far ahead.",
    "deltas_sent": "Ledger deltas gossiped.",
    "deltas_received": "Ledger deltas received by gossip.",
    "gossip_dropped_undecodable": "Gossip messages dropped: not a ledger delta.",
    "syncs": "Anti-entropy syncs this node started.",
    "syncs_served": "Anti-entropy syncs served to peers.",
    "syncs_confirmed": "Syncs after an admission that confirmed both ledgers agree.",
    "syncs_still_differing": "Syncs after an admission that left the ledgers differing.",
    "syncs_cancelled": "Anti-entropy syncs cancelled (the peer left, the node stopped).",
    "syncs_refused_busy": "Sync requests refused: too many at once.",
    "sync_failures": "Anti-entropy syncs that failed.",
    "admission_syncs_abandoned": "Syncs after an admission given up.",
    "admission_syncs_queued": "Sessions of a sync after an admission that waited for a slot (a few run at once).",
    "anti_entropy_errors": "Anti-entropy rounds that failed.",
    "p2p_admission_ok": "Peers admitted (they proved the network token).",
    "p2p_admission_failed": "Admission handshakes that failed, all reasons.",
    "p2p_admission_refused_token": "Admissions refused: the peer does not hold this network token (or refused ours).",
    "p2p_admission_refused_hangup": "Admissions refused: the peer closed the handshake early (a dialler does when "
    "our proof fails: usually another network token).",
    "p2p_admission_refused_revoked": "Admissions refused: the peer is revoked.",
    "p2p_admission_revoked": "Admissions of revoked peers refused before any handshake.",
    "ledger_rejected_revoked": "Remote ledger entries refused: written by a revoked peer.",
    "p2p_admission_refused_timeout": "Admissions refused: the handshake did not finish in time.",
    "p2p_admission_refused_protocol": "Admissions refused: the peer does not speak the admission protocol, or broke it.",
    "p2p_gossip_refused": "Gossip refused from peers that were not admitted.",
    "p2p_gossip_refused_unsealed": "Gossip refused: not sealed with the network's key.",
    "p2p_gossip_dropped": "Gossip messages dropped by the validator.",
    "p2p_streams_refused": "Streams refused from peers that were not admitted.",
    "p2p_stream_handler_errors": "Stream handlers that raised.",
    "p2p_frames_dropped": "Stream frames dropped: larger than allowed.",
    "p2p_dht_provide_failed": "DHT provide calls that failed.",
    "p2p_callback_errors": "Host callbacks into the node that raised.",
    "p2p_keepalive_unavailable": "Connections on which dead-peer detection (keepalive probes or their watch) could not be set up.",
    "p2p_keepalive_silence_closed": "Connections closed because the probing end's keepalive probes stopped arriving.",
    "p2p_rtt_timeouts": "RTT pings (yamux's, one per connection every 30 s) that got no answer within 10 s.",
    "p2p_dials_ok": "Dials that ended in an admitted connection.",
    "p2p_dials_failed": "Dials that failed.",
    "p2p_dials_deferred": "Dials put off (the node has enough connections).",
    "p2p_dial_backoff_resets": "Dial back-offs reset (the network changed).",
    "p2p_dial_candidates_dropped": "Discovered peers dropped: too many candidates.",
    "p2p_in_bytes": "Payload bytes read from libp2p streams, by protocol.",
    "p2p_out_bytes": "Payload bytes written to libp2p streams, by protocol.",
    "p2p_out_writes": "Stream writes, by protocol.",
    "p2p_streams": "Streams negotiated, by protocol.",
}
# Families of counters named with a variable part.
_PATTERN_HELP = (
    (re.compile(r"gossip_dropped_(\w+)"), "Gossip messages dropped: {0}."),
    (re.compile(r"p2p_gossip_out_(\w+)"), "Gossipsub RPC content written: {0}."),
)
_UNSAFE_NAME = re.compile(r"[^a-zA-Z0-9_]")


def metric_name(name: str) -> str:
    """``kairos_<name>`` with every character Prometheus does not allow replaced by ``_``."""
    return PREFIX + _UNSAFE_NAME.sub("_", name)


def core_help(name: str) -> str | None:
    """The HELP text of a core counter, or None when it is not the core's."""
    if name in CORE_HELP:
        return CORE_HELP[name]
    for pattern, text in _PATTERN_HELP:
        match = pattern.fullmatch(name)
        if match:
            return text.format(match.group(1).replace("_", " "))
    return None


class Metric:
    """A counter or gauge a plugin declared (``NodeView.counter`` / ``NodeView.gauge``).

    Without labels its value is the node's counter of the same name (what ``kairos status``
    shows and ``NodeView.count`` adds to); with labels each combination has its own value.
    """

    def __init__(self, kind: str, name: str, help: str, labels: tuple[str, ...], store: MutableMapping[str, float]) -> None:
        self.kind = kind
        self.name = name
        self.help = help
        self.labels = labels
        self._store = store
        self._values: dict[tuple[str, ...], float] = {}

    def _key(self, labels: Mapping[str, Any]) -> tuple[str, ...]:
        if set(labels) != set(self.labels):
            raise KairosError(f"metric {self.name} has labels {list(self.labels)}, not {sorted(labels)}")
        key = tuple(str(labels[label]) for label in self.labels)
        if key not in self._values and len(self._values) >= MAX_LABEL_SETS:
            raise KairosError(f"metric {self.name} has {MAX_LABEL_SETS} label combinations already")
        return key

    def inc(self, n: float = 1, **labels: Any) -> None:
        """Add ``n`` (a counter only goes up: ``n`` >= 0)."""
        if self.kind == "counter" and n < 0:
            raise KairosError(f"counter {self.name} cannot go down (inc({n}))")
        if not self.labels:
            self._store[self.name] = self._store.get(self.name, 0) + n
            return
        key = self._key(labels)
        self._values[key] = self._values.get(key, 0) + n

    def set(self, value: float, **labels: Any) -> None:
        """Set the value (gauges; a counter may be set to a total it keeps itself)."""
        if not self.labels:
            self._store[self.name] = value
            return
        self._values[self._key(labels)] = value

    def value(self, **labels: Any) -> float:
        """The current value (0 before the first ``inc`` or ``set``)."""
        if not self.labels:
            return self._store.get(self.name, 0)
        return self._values.get(tuple(str(labels.get(label)) for label in self.labels), 0)

    def samples(self) -> Iterator[tuple[tuple[str, ...], float]]:
        """``(label values, value)`` of each labelled combination."""
        return iter(list(self._values.items()))


class MetricRegistry:
    """The metrics plugins declare: name, kind, HELP text, labels. One per node.

    Declaring the same name again with the same kind and labels returns the same metric (a plugin
    restarted in a test, two components of one plugin); another kind or other labels are a
    :class:`KairosError`, as is a name the core uses.
    """

    def __init__(self, store: MutableMapping[str, float]) -> None:
        self._store = store
        self._metrics: dict[str, Metric] = {}

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Metric:
        """Declare a counter ``name`` (exported as ``kairos_<name>_total``)."""
        return self._declare("counter", name, help, tuple(labels))

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> Metric:
        """Declare a gauge ``name`` (exported as ``kairos_<name>``)."""
        return self._declare("gauge", name, help, tuple(labels))

    def get(self, name: str) -> Metric | None:
        """The metric declared as ``name``, or None."""
        return self._metrics.get(name)

    def __iter__(self) -> Iterator[Metric]:
        return iter(list(self._metrics.values()))

    def _declare(self, kind: str, name: str, help: str, labels: tuple[str, ...]) -> Metric:
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise KairosError(f"metric name {name!r}: lower-case letters, digits and _ only, starting with a letter")
        if not isinstance(help, str) or not help.strip():
            raise KairosError(f"metric {name}: a HELP text is required")
        if core_help(name) is not None or name in _CORE_GAUGES:
            raise KairosError(f"metric {name} is the core's")
        for label in labels:
            if not re.fullmatch(r"[a-z][a-z0-9_]*", label):
                raise KairosError(f"metric {name}: label {label!r} is not a valid label name")
        existing = self._metrics.get(name)
        if existing is not None:
            if existing.kind != kind or existing.labels != labels:
                raise KairosError(f"metric {name} is declared already as a {existing.kind} with labels {list(existing.labels)}")
            return existing
        metric = self._metrics[name] = Metric(kind, name, help.strip(), labels, self._store)
        return metric


_CORE_GAUGES = {
    "members_alive",
    "connections",
    "is_leader",
    "leader_epoch",
    "ledger_entries",
    "vpn_peers",
    "p2p_bytes",
    "vpn_bytes",
    "uptime_seconds",
    "peer_rtt_seconds",
}


class NodeCollector:
    """A ``prometheus_client`` collector reading one node at scrape time."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Family]:
        """Every family of the node, built from its state now."""
        node = self.node
        status = node.status()
        counters: dict[str, float] = status["counters"]
        declared = {metric.name: metric for metric in node.metrics}
        yield from self._gauges(status, counters)
        yield from self._counters(counters, declared)
        for metric in declared.values():
            if metric.labels:
                family_type = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
                family = family_type(metric_name(metric.name), metric.help, labels=list(metric.labels))
                for labels, value in metric.samples():
                    family.add_metric(list(labels), value)
                yield family

    def _gauges(self, status: dict[str, Any], counters: Mapping[str, float]) -> Iterator[Family]:
        node = self.node

        def gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(metric_name(name), help, value=value)

        yield gauge("members_alive", "Peers this node counts alive (not itself).", status["members"])
        yield gauge("connections", "Admitted peers connected to this node now.", status["admitted"])
        yield gauge("is_leader", "1 when this node is the leader, else 0.", int(status["is_leader"]))
        leader = status["leader"]
        yield gauge("leader_epoch", "Epoch of the leader this node knows (0: no leader yet).", leader["epoch"] if leader else 0)
        yield gauge("uptime_seconds", "Seconds since the node started.", status["uptime_s"])
        entries = GaugeMetricFamily(metric_name("ledger_entries"), "Live ledger entries, by bucket.", labels=["bucket"])
        if node.ledger is not None:
            for bucket, count in sorted(node.ledger.bucket_sizes().items()):
                entries.add_metric([bucket], count)
        yield entries
        rtts = GaugeMetricFamily(
            metric_name("peer_rtt_seconds"),
            "Smoothed round-trip time to each connected peer (yamux pings, every 30 s), by transport.",
            labels=["peer", "transport"],
        )
        for peer, link in (node.host.links() if getattr(node, "host", None) else {}).items():
            if link["rtt_s"] is not None:
                rtts.add_metric([peer, link["transport"]], link["rtt_s"])
        yield rtts
        paths = GaugeMetricFamily(metric_name("vpn_peers"), "VPN peers, by the path their packets take.", labels=["path"])
        for name, value in counters.items():
            if name.startswith("vpn_peers_"):
                paths.add_metric([name.removeprefix("vpn_peers_")], value)
        yield paths
        for family, prefix_in, prefix_out, help in (
            ("p2p_bytes", "p2p_in_bytes:", "p2p_out_bytes:", "Payload bytes over libp2p streams, all protocols, by direction."),
            ("vpn_bytes", "vpn_rx_bytes", "vpn_tx_bytes", "Bytes of VPN packets, by direction."),
        ):
            total = CounterMetricFamily(metric_name(family), help, labels=["direction"])
            total.add_metric(["in"], sum(v for k, v in counters.items() if k.startswith(prefix_in)))
            total.add_metric(["out"], sum(v for k, v in counters.items() if k.startswith(prefix_out)))
            yield total

    def _counters(self, counters: Mapping[str, float], declared: Mapping[str, Metric]) -> Iterator[Family]:
        by_protocol: dict[str, list[tuple[str, float]]] = defaultdict(list)
        for name, value in sorted(counters.items()):
            if ":" in name:  # <counter>:<protocol id>, the host's traffic counters
                base, protocol = name.split(":", 1)
                by_protocol[base].append((protocol, value))
                continue
            if name.startswith("vpn_peers_"):
                continue  # the kairos_vpn_peers{path} gauge
            metric = declared.get(name)
            if metric is not None and metric.kind == "gauge":
                yield GaugeMetricFamily(metric_name(name), metric.help, value=value)
                continue
            help = metric.help if metric is not None else core_help(name) or UNDECLARED_HELP.format(name=name)
            yield CounterMetricFamily(metric_name(name), help, value=value)
        for base, values in sorted(by_protocol.items()):
            family = CounterMetricFamily(
                metric_name(base), core_help(base) or UNDECLARED_HELP.format(name=base), labels=["protocol"]
            )
            for protocol, value in values:
                family.add_metric([protocol], value)
            yield family


class NodeMetrics:
    """The exposition of one node: ``render()`` is what ``GET /metrics`` answers."""

    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(NodeCollector(node))

    def render(self) -> bytes:
        """The text exposition format, now."""
        return generate_latest(self.registry)


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9464`` for IPv6) of ``api.metrics_listen``; :class:`KairosError` otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise KairosError(f"api.metrics_listen: {text!r} is not host:port (e.g. 127.0.0.1:9464)")
    return host, int(port)
