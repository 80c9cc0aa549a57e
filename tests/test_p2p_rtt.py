"""Round-trip time per peer (issue #17): measured on real hosts, gone when the peer goes.

On loopback the value is whatever the two hosts' pings take (well under a second); through a
veth pair with ``netem delay`` in network namespaces it reflects the delay added.
"""

from __future__ import annotations

from typing import Any

from kairos_core.p2p import P2PHost
from kairos_core.p2p.rtt import RttTable
from kairos_testing import wait_until
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
        assert link == {"transport": "direct", "rtt_s": link["rtt_s"]} and 0 < link["rtt_s"] < 1.0
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
