"""Noticing a silent peer: one end of each connection probes, the other listens for the probes.

A partition, or a peer whose machine vanished, sends no FIN or RST. Without a probe a connection
looks alive for the ~15 minutes TCP retransmits for, and so would the peer in our membership. The
kernel's keepalive finds out within ``KEEPALIVE_DEAD`` seconds: after ``KEEPALIVE_IDLE`` seconds
without a segment from the peer it sends a probe, and gives up after ``KEEPALIVE_COUNT`` more
unanswered ones.

With keepalive on at both ends, an idle connection carries two probes and two answers every
``KEEPALIVE_IDLE`` seconds: a probe does not reset the timer of the end that receives it, so the
two ends probe side by side. At 4 s and ~12 connections that was a third of an idle node's bytes
(one packet per second per connection; docs/scaling.md). So only one end of each connection
probes, :func:`probing_end` of the two peer ids; the other end watches the segments it receives
(the kernel counts them, probes included, in ``tcpi_segs_in``) and closes a connection on which
none arrived for ``SILENCE_LIMIT`` seconds. While the path is up the prober's probes arrive at
least every ``KEEPALIVE_IDLE`` seconds plus one per lost probe, so silence that long means the
path, or the prober, is gone: the probing end learns it within ``KEEPALIVE_DEAD`` seconds, the
listening end within ``SILENCE_LIMIT`` plus one sampling round. The counter moves in the kernel,
so a listener whose process stalled for a while finds the probes counted when it wakes up, and
never closes a healthy connection for its own slowness.

Both ends also set ``TCP_USER_TIMEOUT``: data that goes unacknowledged that long ends the
connection however busy it is. A peer running an older release probes from both ends; the
listening end then simply sees more segments.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

# Probe after 4 s idle, every 1 s, 2 times: the prober gives a silent peer up after 6 s. The
# minority side of a partition learns it lost the majority within this (its leader steps down).
KEEPALIVE_IDLE = 4
KEEPALIVE_INTERVAL = 1
KEEPALIVE_COUNT = 2
KEEPALIVE_DEAD = KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT
# The listening end: the probing end's idle time, two lost probes and a second of timer slack.
SILENCE_LIMIT = KEEPALIVE_DEAD + 1.0
# How often the listening end reads the counters (one getsockopt per watched connection).
SILENCE_SAMPLE = 1.0

# struct tcp_info (linux/tcp.h): tcpi_segs_in, a __u32 after 8 bytes of flags, 24 __u32 fields
# and 4 __u64 fields; present since Linux 4.2.
_SEGS_IN = struct.Struct("=I")
_SEGS_IN_OFFSET = 140
_TCP_INFO_SIZE = 256


def probing_end(peer_a: str, peer_b: str) -> str:
    """Which of two peers probes the connection between them; both ends compute the same answer.

    A hash of the pair, not "the lower id": every node then probes about half of its
    connections, so no node's silence is left to listening ends alone.
    """
    low, high = sorted((peer_a, peer_b))
    return low if hashlib.sha256(f"{low}\0{high}".encode()).digest()[0] & 1 else high


def connection_layers(conn: Any) -> Iterator[Any]:
    """The objects under a libp2p connection, outermost first, down to the kernel socket.

    SwarmConn → Yamux → SecureSession → RawConnection → the listener's stream → trio's
    SocketStream → socket. Bounded: a layout we do not know ends the walk, never loops.
    """
    node = conn
    for _ in range(10):
        yield node
        node = next(
            (
                getattr(node, name)
                for name in ("muxed_conn", "secured_conn", "conn", "stream", "socket")
                if getattr(node, name, None) is not None
            ),
            None,
        )
        if node is None:
            return


def kernel_socket(conn: Any) -> Any | None:
    """The socket under ``conn``, or None (a relayed connection has none of its own)."""
    for node in connection_layers(conn):
        if hasattr(node, "setsockopt") and hasattr(node, "family"):
            return node
    return None


def enable_keepalive(conn: Any, *, probe: bool = True) -> bool:
    """Set the dead-peer options on the socket under ``conn``; False if no socket was found.

    ``probe``: this end sends the keepalive probes (:func:`probing_end`); otherwise it only gets
    the user timeout and should be watched with :class:`SilenceWatch`.
    """
    node = kernel_socket(conn)
    if node is None:
        return False
    try:
        node.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, KEEPALIVE_DEAD * 1000)
        if probe:
            node.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            node.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
            node.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
            node.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    except OSError:
        return False
    return True


def segments_received(sock: Any) -> int | None:
    """``tcpi_segs_in`` of a TCP socket, or None when the kernel does not tell (closed, too old)."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except (OSError, ValueError):
        return None
    if len(info) < _SEGS_IN_OFFSET + _SEGS_IN.size:
        return None
    return int(_SEGS_IN.unpack_from(info, _SEGS_IN_OFFSET)[0])


class SilenceWatch:
    """The listening ends: connections whose peer probes, and when a segment last came in."""

    def __init__(self, limit: float = SILENCE_LIMIT) -> None:
        self.limit = limit
        # connection -> (its socket, segments received at the last change, monotonic time of it)
        self._watched: dict[Any, tuple[Any, int, float]] = {}

    def __len__(self) -> int:
        return len(self._watched)

    def watch(self, conn: Any, now: float | None = None) -> bool:
        """Start watching ``conn``; False when it has no socket whose counters can be read."""
        sock = kernel_socket(conn)
        count = segments_received(sock) if sock is not None else None
        if count is None:
            return False
        self._watched[conn] = (sock, count, time.monotonic() if now is None else now)
        return True

    def forget(self, conn: Any) -> None:
        self._watched.pop(conn, None)

    def silent(self, now: float | None = None) -> list[Any]:
        """Read every watched connection's counter; return (and stop watching) those on which
        nothing arrived for ``limit`` seconds. A counter that cannot be read any more means a
        closed socket: that connection is forgotten, its close is on its way."""
        now = time.monotonic() if now is None else now
        quiet = []
        for conn, (sock, count, since) in list(self._watched.items()):
            current = segments_received(sock)
            if current is None:
                del self._watched[conn]
            elif current != count:
                self._watched[conn] = (sock, current, now)
            elif now - since >= self.limit:
                del self._watched[conn]
                quiet.append(conn)
        return quiet
