"""The trim notice (kairos_core/dial_manager.py): a node that trims a connection tells the peer,
which then holds off redialling it — on real hosts over loopback."""

from __future__ import annotations


from kairos_core.dial_manager import TRIM_HOLD, TRIM_PROTOCOL, DialManager
from kairos_testing.hosts import until


def _manager(host, others) -> DialManager:
    addresses = {other.peer_id: other.addresses() for other in others}
    manager = DialManager(
        host.peer_id, host, lambda: list(addresses), lambda peer: addresses.get(peer, []), low=1, high=1, grace=0.0
    )
    manager.start()
    return manager


async def test_a_trimmed_peer_is_told_and_holds_off_redialling_the_trimmer(hosts):
    a, b, c = await hosts.host(), await hosts.host(), await hosts.host()
    trimmer, trimmed = _manager(a, [b, c]), _manager(b, [a, c])
    # a's own passes (every second) do the trim; c's connection is protected from the start, so
    # the one over a's high of 1 that a closes is b's
    trimmer.connections.protect(c.peer_id, "test")
    try:
        await b.connect(a.addresses())
        await c.connect(a.addresses())
        await until(lambda: not a.is_admitted(b.peer_id), "a trims b", timeout=15)
        assert a.is_admitted(c.peer_id)
        assert trimmer.counters["trim_notices_sent"] >= 1 and trimmer.counters["connections_trimmed"] >= 1
        assert trimmed.counters["trim_notices_received"] == 1 and trimmed.dialer.held(a.peer_id)
        assert a.peer_id not in trimmed.dialer.candidates({a.peer_id: a.addresses()})
        # below its low of 1, b's passes dial c, never a, while the hold lasts (TRIM_HOLD s)
        await until(lambda: b.is_admitted(c.peer_id), "b dials c instead", timeout=10)
        assert not b.is_admitted(a.peer_id) and TRIM_HOLD >= 60
    finally:
        await trimmer.stop()
        await trimmed.stop()


async def test_a_garbled_or_oversized_notice_holds_nothing_and_is_counted(hosts):
    a, b = await hosts.host(), await hosts.host()
    manager = _manager(a, [b])
    try:
        await b.connect(a.addresses())
        await until(lambda: a.is_admitted(b.peer_id), "a admits b")
        for garbage in (b"\x02", b"\x01" * 100):
            stream = await b.open_stream(a.peer_id, TRIM_PROTOCOL)
            await stream.write_frame(garbage)
            await stream.close()
        await until(
            lambda: manager.counters["trim_notices_malformed"] + manager.counters["trim_notices_unreadable"] == 2,
            "both notices refused",
        )
        assert not manager.dialer.held(b.peer_id) and manager.counters["trim_notices_received"] == 0
        assert a.is_admitted(b.peer_id)  # a bad notice costs the sender nothing but the stream
    finally:
        await manager.stop()
