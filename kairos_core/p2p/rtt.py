"""Round-trip time to each connected peer, from the pings yamux already sends (issue #17).

Every yamux session of py-libp2p 0.8.1 pings its peer on its own: the first ping half a second
after the connection is up, then one every ``RTT_MEASURE_INTERVAL`` (30 s), never more than one in
flight, each given 10 s, and it keeps a smoothed RTT (each sample averaged with the value before:
an EWMA with weight 1/2). Those pings are 12-byte frames that cross every connection anyway, so
reading their result costs no traffic at all; a probe of our own (``/ipfs/ping/1.0.0``) would add
a stream per peer and the same kind of exchange for the same number. On a relayed connection the
session runs inside the circuit, so its pings measure the whole path through the relay.

:class:`RttTable` samples those values on the trio side into a snapshot the asyncio side reads
(a dict replaced whole, never mutated), drops a peer the moment its last connection closes, and
counts pings that got no answer in time (``rtt_timeouts``). Beside the smoothed value it keeps
each peer's *floor*: the lowest value seen in the current and the previous ``FLOOR_WINDOW``. The
smoothed value follows every hiccup of two busy processes (one slow answer moves it by half); the
floor is the path's own latency, what a node publishes for others (a path that got slower shows in
it within two windows, one that got faster at once).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from typing import Any

import trio

# How often the trio side copies the sessions' values (CPU only, no traffic); a new connection's
# first value shows up within ~0.5 s + this.
SAMPLE_INTERVAL = 2.0
# yamux waits this long for a pong before it gives up on a ping (yamux.py: move_on_after(10.0)); a
# ping seen unanswered for longer than this, plus a sampling round of slack, counts as timed out.
PING_TIMEOUT = 10.0
# The floor is the lowest value of this window and the one before (seconds).
FLOOR_WINDOW = 120.0


def session_rtt(conn: Any) -> float | None:
    """The smoothed RTT in seconds the connection's muxer measured, or None (none yet, or a muxer
    that does not measure)."""
    muxed = getattr(conn, "muxed_conn", None)
    measure = getattr(muxed, "rtt", None)
    if not callable(measure):
        return None
    try:
        value = float(measure())
    except Exception:
        return None
    return value if value > 0 else None


class RttTable:
    """Per-peer RTT of the admitted connections (trio side writes, any thread reads)."""

    def __init__(self, counters: MutableMapping[str, int]) -> None:
        self.counters = counters
        #: peer id -> smoothed RTT in seconds; replaced whole on every update
        self.snapshot: dict[str, float] = {}
        #: peer id -> its floor in seconds (see the module's docs); replaced whole on every update
        self.floors: dict[str, float] = {}
        # peer id -> (window number, lowest value in it, lowest value in the window before or None)
        self._windows: dict[str, tuple[int, float, float | None]] = {}
        # (muxer object id, ping nonce) -> when we first saw that ping unanswered
        self._pending: dict[tuple[int, int], float] = {}
        self._timed_out: set[tuple[int, int]] = set()

    def rtt(self, peer_id: str) -> float | None:
        """The smoothed RTT to ``peer_id`` in seconds, or None when not connected or not measured yet."""
        return self.snapshot.get(peer_id)

    def sample(self, connections: Iterable[tuple[str, Any]], now: float) -> None:
        """Take the values of ``(peer id, connection)`` pairs (trio side): the lowest per peer."""
        fresh: dict[str, float] = {}
        seen: set[tuple[int, int]] = set()
        for peer, conn in connections:
            value = session_rtt(conn)
            if value is not None and (peer not in fresh or value < fresh[peer]):
                fresh[peer] = value
            key = self._unanswered_ping(conn)
            if key is None:
                continue
            seen.add(key)
            first = self._pending.setdefault(key, now)
            if now - first > PING_TIMEOUT and key not in self._timed_out:
                self._timed_out.add(key)
                self.counters["rtt_timeouts"] += 1
        # Only pings still unanswered are remembered: both sets stay as small as the connections.
        self._pending = {key: at for key, at in self._pending.items() if key in seen}
        self._timed_out &= seen
        window = int(now // FLOOR_WINDOW)
        windows: dict[str, tuple[int, float, float | None]] = {}
        for peer, value in fresh.items():
            known = self._windows.get(peer)
            if known is None or known[0] < window - 1:
                windows[peer] = (window, value, None)
            elif known[0] == window - 1:
                windows[peer] = (window, value, known[1])
            else:
                windows[peer] = (window, min(known[1], value), known[2])
        self._windows = windows
        self.floors = {peer: low if before is None else min(low, before) for peer, (_, low, before) in windows.items()}
        self.snapshot = fresh

    def forget(self, peer_id: str) -> None:
        """``peer_id``'s last connection closed: its RTT goes at once, not at the next sample."""
        if peer_id in self.snapshot or peer_id in self.floors:
            self.snapshot = {peer: value for peer, value in self.snapshot.items() if peer != peer_id}
            self.floors = {peer: value for peer, value in self.floors.items() if peer != peer_id}
            self._windows.pop(peer_id, None)

    def clear(self) -> None:
        """The host stopped."""
        self.snapshot = {}
        self.floors = {}
        self._windows = {}
        self._pending.clear()
        self._timed_out.clear()

    async def sample_forever(self, connections: Callable[[], Iterable[tuple[str, Any]]]) -> None:
        """Trio task: sample every ``SAMPLE_INTERVAL`` until cancelled."""
        while True:
            self.sample(connections(), trio.current_time())
            await trio.sleep(SAMPLE_INTERVAL)

    @staticmethod
    def _unanswered_ping(conn: Any) -> tuple[int, int] | None:
        """``(muxer id, nonce)`` of the ping the session waits an answer for, or None.

        Reads yamux's own bookkeeping (``_ping_id``, ``_ping_event``): the session exposes only its
        RTT. A ping counts from the first sample that sees it unanswered, so the moment between
        writing a ping and stamping its send time is never mistaken for a long wait.
        """
        muxed = getattr(conn, "muxed_conn", None)
        nonce = getattr(muxed, "_ping_id", 0)
        event = getattr(muxed, "_ping_event", None)
        if not isinstance(nonce, int) or nonce <= 0 or event is None:
            return None
        try:
            answered = bool(event.is_set())
        except Exception:
            return None
        if answered or getattr(muxed, "event_shutting_down", None) is not None and muxed.event_shutting_down.is_set():
            return None
        return (id(muxed), nonce)
