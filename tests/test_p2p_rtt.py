"""Round-trip time per peer (issue #17): measured on real hosts, gone when the peer goes.

On loopback the value is whatever the two hosts' pings take (well under a second); through a
relay that delays each direction (``kairos_testing.delayproxy``) it reflects the delay added.
"""

from __future__ import annotations

from typing import Any

from kairos_core.p2p import P2PHost
from kairos_core.p2p.rtt import FLOOR_WINDOW, RttTable
from kairos_testing import wait_until
from kairos_testing.delayproxy import DelayingProxy
from kairos_testing.hosts import HostFactory


async def test_rtt_of_a_loopback_peer_is_measured_and_dropped_on_disconnect(hosts: HostFactory) -> None:
    a: P2PHost = await hosts.host()
    b: P2PHost = await hosts.host()
    await a.connect(b.addresses())
    await wait_until(lambda: a.rtt(b.peer_id) is not None and b.rtt(a.peer_id) is not None, timeout=20)
    for here, there in ((a, b), (b, a)):
        rtt = here.rtt(there.peer_id)
        assert rtt is not None and 0 < rtt < 1.0, rtt
        link = here.links()[there.peer_id]
        assert link["transport"] == "direct" and 0 < link["rtt_s"] < 1.0
        assert link["floor_s"] is not None and 0 < link["floor_s"] <= link["rtt_s"]
    await a.disconnect(b.peer_id)
    await wait_until(lambda: a.rtt(b.peer_id) is None and b.peer_id not in a.links(), timeout=10)
    await wait_until(lambda: b.rtt(a.peer_id) is None and a.peer_id not in b.links(), timeout=10)
    assert a._rtt.snapshot.get(b.peer_id) is None  # forgotten, not merely hidden


class _Event:
    def __init__(self, answered: bool) -> None:
        self.answered = answered

    def is_set(self) -> bool:
        return self.answered


class _Session:
    """Stands in for a yamux session: its RTT and its ping bookkeeping."""

    def __init__(self, rtt: float, nonce: int, answered: bool) -> None:
        self._rtt = rtt
        self._ping_id = nonce
        self._ping_event = _Event(answered)

    def rtt(self) -> float:
        return self._rtt


class _Conn:
    def __init__(self, session: Any) -> None:
        self.muxed_conn = session


def test_table_keeps_the_lowest_rtt_per_peer_and_counts_each_unanswered_ping_once() -> None:
    counters: dict[str, int] = {"rtt_timeouts": 0}
    table = RttTable(counters)  # type: ignore[arg-type]
    waiting = _Session(0.040, nonce=3, answered=False)
    conns = [("p", _Conn(_Session(0.020, 1, True))), ("p", _Conn(waiting)), ("q", _Conn(_Session(0.0, 1, True)))]
    table.sample(conns, now=100.0)
    assert table.snapshot == {"p": 0.020}  # q has no sample yet: absent, not 0
    table.sample(conns, now=105.0)
    assert counters["rtt_timeouts"] == 0  # unanswered for 5 s: still within the ping's 10 s
    table.sample(conns, now=111.0)
    table.sample(conns, now=113.0)
    assert counters["rtt_timeouts"] == 1  # once per ping, however often it is seen
    waiting._ping_id, waiting._ping_event = 4, _Event(False)  # the next ping, unanswered again
    table.sample(conns, now=140.0)
    table.sample(conns, now=151.0)
    assert counters["rtt_timeouts"] == 2
    assert len(table._pending) == 1 and len(table._timed_out) == 1  # bounded by the connections
    table.forget("p")
    assert table.rtt("p") is None
    table.sample([("x", _Conn(object()))], now=160.0)  # a muxer that does not measure: no value, no error
    assert table.snapshot == {} and not table._pending


def test_the_floor_is_the_lowest_value_of_this_window_and_the_one_before() -> None:
    table = RttTable({"rtt_timeouts": 0})  # type: ignore[arg-type]
    session = _Session(0.030, 1, True)
    window = FLOOR_WINDOW

    def sample(rtt: float, at: float) -> float:
        session._rtt = rtt
        table.sample([("p", _Conn(session))], now=at)
        return table.floors["p"]

    assert sample(0.030, 0) == 0.030
    assert sample(0.090, 10) == 0.030  # a hiccup: the smoothed value jumps, the floor does not
    assert table.rtt("p") == 0.090
    assert sample(0.020, 20) == 0.020  # faster: at once
    assert sample(0.080, window + 1) == 0.020  # slower: the window before still holds 20 ms
    assert sample(0.080, 2 * window + 1) == 0.080  # ... until it is two windows old
    assert sample(0.050, 5 * window) == 0.050  # after a gap, no stale window counts
    table.forget("p")
    assert table.floors == {} and table.rtt("p") is None


async def test_a_node_publishes_rtts_sparingly_and_exports_them(kairos_network) -> None:
    """Two in-process nodes: /api/peers rows, the Prometheus gauge, and the ``rtt_ms`` of the
    ``nodes`` entry — its first value in the follow-up write, a move alone written only after
    membership.rtt_publish_interval (longer on a large network) and only when it is > 20 % and
    > RTT_JITTER_MS; gone with the peer."""
    from kairos_core.metrics import NodeMetrics

    net = await kairos_network(2)
    a, b = net.nodes

    def entry() -> dict:
        return a.ledger.get("nodes", a.peer_id) or {}

    # the write of the new neighbour went out before any ping; the follow-up carries its RTT
    await net.wait_for(lambda: entry().get("neighbours") == [b.peer_id] and (entry().get("rtt_ms") or [None])[0], timeout=20)
    assert 1 <= entry()["rtt_ms"][0] < 1000 and entry()["relayed"] == []
    row = {row["peer_id"]: row for row in a.describe_peers()}[b.peer_id]
    assert row["transport"] == "direct" and 0 < row["rtt_ms"] < 1000
    exposition = NodeMetrics(a).render().decode()
    series = f'kairos_peer_rtt_seconds{{peer="{b.peer_id}",transport="direct"}}'
    assert series in exposition and "# HELP kairos_peer_rtt_seconds" in exposition

    def links(rtt_s: float) -> dict:
        return {b.peer_id: {"transport": "direct", "rtt_s": rtt_s, "floor_s": rtt_s}}

    def announce_with(rtt_s: float, *, long_after: bool) -> int:
        """What the entry's rtt_ms says after an announce round measuring ``rtt_s``."""
        a.host.links = lambda: links(rtt_s)  # type: ignore[method-assign]
        if long_after:
            a._written_at -= a.config["membership"]["rtt_publish_interval"] + 1
        a.announce()
        return entry()["rtt_ms"][0]

    before = entry()["beat"]
    published = entry()["rtt_ms"][0]
    assert announce_with(0.500, long_after=False) == published  # a move, but too soon after a write
    assert entry()["beat"] == before
    assert announce_with(0.500, long_after=True) == 500  # a minute on: written
    assert announce_with(0.560, long_after=True) == 500  # +12 %: not news
    assert announce_with(0.700, long_after=True) == 700  # +40 %: news
    a.host.links = lambda: links(0.0012)  # type: ignore[method-assign]
    a._written_at -= a.config["membership"]["rtt_publish_interval"] + 1
    a.announce()
    assert entry()["rtt_ms"] == [1]
    assert announce_with(0.0059, long_after=True) == 1  # 1 -> 6 ms: +5 ms is LAN jitter, not news
    assert announce_with(0.0071, long_after=True) == 7  # +6 ms: news
    # on a network of 50 the whole network's RTT-only rewrites stay under 0.1 a second: a node
    # waits 50 / 0.1 = 500 s between its own, not the configured 60 s
    a.membership.alive_count = lambda: 49  # type: ignore[method-assign]
    assert announce_with(0.100, long_after=True) == 7  # 61 s on: not yet
    a._written_at -= 500
    assert announce_with(0.100, long_after=False) == 100
    del a.membership.alive_count
    del a.host.links  # the host's own method again

    await b.stop()
    await net.wait_for(lambda: a.rtt(b.peer_id) is None, timeout=15)
    row = {row["peer_id"]: row for row in a.describe_peers()}[b.peer_id]
    assert row["transport"] is None and row["rtt_ms"] is None
    assert series not in NodeMetrics(a).render().decode()  # the series goes with the peer


async def test_rtt_reflects_the_delay_of_the_link(hosts: HostFactory) -> None:
    """Through a relay that delays each direction by 50 ms, every round trip takes >= 100 ms (the
    namespace test checks the same between two ``kairos run`` processes: tests/test_rtt_delayed_link.py)."""
    a: P2PHost = await hosts.host()
    b: P2PHost = await hosts.host()
    port_b = int(b.addresses()[0].split("/tcp/")[1].split("/")[0])
    proxy = DelayingProxy(port_b, delay=0.050)
    try:
        port = await proxy.start()
        await a.connect(f"/ip4/127.0.0.1/tcp/{port}/p2p/{b.peer_id}")
        await wait_until(lambda: a.rtt(b.peer_id) is not None and b.rtt(a.peer_id) is not None, timeout=30)
        for here, there in ((a, b), (b, a)):
            rtt = here.rtt(there.peer_id)
            assert rtt is not None and 0.095 <= rtt < 1.0, rtt  # 5 ms of slack: when the send time is stamped
    finally:
        await proxy.close()


async def test_with_no_publish_interval_rtts_ride_only_on_other_writes(kairos_network) -> None:
    net = await kairos_network(2, overrides={"membership": {"rtt_publish_interval": 0}})
    a, b = net.nodes
    await net.wait_for(lambda: ((a.ledger.get("nodes", a.peer_id) or {}).get("rtt_ms") or [None])[0], timeout=20)
    beat = a.ledger.get("nodes", a.peer_id)["beat"]
    a.host.links = lambda: {b.peer_id: {"transport": "direct", "rtt_s": 0.9, "floor_s": 0.9}}  # type: ignore[method-assign]
    a._written_at -= 3600
    a.announce()
    assert a.ledger.get("nodes", a.peer_id)["beat"] == beat  # a big move, an hour on: still no write
    del a.host.links


async def test_observed_ports_that_change_do_not_rewrite_the_nodes_entry(kairos_network) -> None:
    """Each reachability round asks other peers, who see other ephemeral ports of ours: the entry
    carries the observed IPs only, and is not rewritten while they stay."""
    net = await kairos_network(2)
    a, _ = net.nodes
    await net.wait_for(lambda: ((a.ledger.get("nodes", a.peer_id) or {}).get("rtt_ms") or [None])[0], timeout=20)
    a.announce()
    beat = a.ledger.get("nodes", a.peer_id)["beat"]
    rounds = (["/ip4/198.51.100.7/tcp/4001", "/ip4/198.51.100.7/tcp/50123"], ["/ip4/198.51.100.7/tcp/38800"])
    real = a.host.reachability
    for observed in rounds:
        a.host.reachability = lambda observed=observed: {**real(), "observed": observed}  # type: ignore[method-assign]
        a.announce()
    entry = a.ledger.get("nodes", a.peer_id)
    assert entry["observed"] == ["/ip4/198.51.100.7"] and entry["beat"] == beat + 1  # one write: the IP is news
    a.host.reachability = lambda: {**real(), "observed": ["/ip4/203.0.113.9/tcp/41000"]}  # type: ignore[method-assign]
    a.announce()
    assert a.ledger.get("nodes", a.peer_id)["observed"] == ["/ip4/203.0.113.9"]  # a new IP is written
    del a.host.reachability
