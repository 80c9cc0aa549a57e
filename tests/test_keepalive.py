"""One end of a connection probes, the other watches for the probes (kairos_core.p2p.keepalive).

Real kernel sockets on loopback: the watch reads the kernel's own count of received segments,
so these tests exercise exactly what a node relies on, with short timers.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from kairos_core.identity import Identity
from kairos_core.p2p.keepalive import SilenceWatch, probing_end, segments_received


def test_both_ends_agree_on_the_prober_and_each_node_probes_about_half():
    ids = [Identity.generate().peer_id for _ in range(40)]
    probes: Counter[str] = Counter()
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            end = probing_end(a, b)
            assert end == probing_end(b, a) and end in (a, b)
            probes[end] += 1
    # 39 connections each: by the pair hash, not by the order of ids, so none probes all or none
    assert all(5 <= probes[peer] <= 34 for peer in ids), probes
    lowest = min(ids)
    assert 0 < probes[lowest] < len(ids) - 1


def _pair() -> tuple[socket.socket, socket.socket, socket.socket]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    dialled = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    return listener, dialled, accepted


@contextmanager
def probed_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected pair on loopback, ``(prober, listening)``, the prober probing every second."""
    listener, prober, listening = _pair()
    try:
        _probe_every_second(prober)
        yield prober, listening
    finally:
        for s in (listener, prober, listening):
            s.close()


def _probe_every_second(sock: socket.socket, on: bool = True) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(on))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)


def test_the_kernel_counts_the_probes_the_listening_end_receives():
    with probed_pair() as (prober, listening):
        before = segments_received(listening)
        assert before is not None
        time.sleep(3.5)  # no data: only probes arrive
        after = segments_received(listening)
        assert after is not None and after - before >= 2


def test_the_watch_keeps_a_probed_connection_and_returns_one_whose_probes_stopped():
    with probed_pair() as (prober, listening):
        watch = SilenceWatch(limit=2.5)
        assert watch.watch(listening)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # probes every ~1 s: never 2.5 s of silence
            assert watch.silent() == []
            time.sleep(0.5)
        assert len(watch) == 1
        _probe_every_second(prober, on=False)  # the prober "vanishes": nothing arrives any more
        quiet_since = time.monotonic()
        found: list = []
        while not found and time.monotonic() - quiet_since < 10:
            time.sleep(0.25)
            found = watch.silent()
        assert found == [listening]
        assert time.monotonic() - quiet_since >= 2.5 - 1.1  # not before the limit (a probe may have been in flight)
        assert len(watch) == 0


def test_a_stalled_watcher_does_not_mistake_its_own_pause_for_silence():
    with probed_pair() as (prober, listening):
        watch = SilenceWatch(limit=2.0)
        start = time.monotonic()
        assert watch.watch(listening, now=start)
        time.sleep(3.5)  # the process "stalled" longer than the limit, but probes kept arriving
        assert watch.silent(now=start + 3.5) == []


def test_a_closed_socket_is_forgotten_not_reported():
    listener, prober, listening = _pair()
    watch = SilenceWatch(limit=0.0)
    assert watch.watch(listening)
    listening.close()
    assert watch.silent() == [] and len(watch) == 0
    assert not watch.watch(object())
    prober.close()
    listener.close()


async def test_a_host_closes_the_connection_whose_prober_went_silent(hosts):
    """Two real hosts on loopback, idle: when the probing end stops probing (as a vanished machine
    would), the listening end closes the connection by itself, after the silence limit."""
    from kairos_core.p2p.keepalive import SILENCE_LIMIT, kernel_socket

    a = await hosts.host()
    b = await hosts.host()
    await a.connect(b.addresses())
    prober, listener = (a, b) if probing_end(a.peer_id, b.peer_id) == a.peer_id else (b, a)

    async def stop_probing() -> None:
        for conn in prober._host.get_network().get_connections():  # the one, to the listener
            kernel_socket(conn).setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)

    await asyncio.sleep(SILENCE_LIMIT + 2)  # probed: the idle connection outlives the limit
    assert listener.is_admitted(prober.peer_id)
    assert listener.counters.get("keepalive_silence_closed", 0) == 0
    await prober._require_running().call(stop_probing)
    silent_since = time.monotonic()
    while listener.is_admitted(prober.peer_id) and time.monotonic() - silent_since < SILENCE_LIMIT + 10:
        await asyncio.sleep(0.25)
    assert not listener.is_admitted(prober.peer_id)
    assert listener.counters["keepalive_silence_closed"] == 1
    assert prober.counters.get("keepalive_silence_closed", 0) == 0
