"""The fallback path: sealed datagrams over one persistent libp2p stream per peer and direction.

When UDP does not get through, the data plane hands each sealed datagram to
:meth:`FallbackSender.send` (from its sender thread). The sender queues it and an asyncio task
writes everything queued as *one* frame on a persistent stream (``/kairos/vpn/packets/1.0.0``),
so a burst of packets costs one frame, and a stream is opened once, not per packet. The receiving
node reads frames with :func:`read_datagrams` and injects each datagram into its data plane, which
checks that it opens under the keys of the stream's peer — a stream cannot speak for another.

A frame's body is a sequence of ``length (2 bytes, big-endian) | datagram``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

PACKETS_PROTOCOL = "/kairos/vpn/packets/1.0.0"
MAX_FRAME = 1 << 20
# A frame is sent once this much is queued, or when the queue runs dry.
FRAME_TARGET = 256 * 1024
# Beyond this much waiting, new datagrams are dropped (TCP above slows down; memory stays bounded).
MAX_QUEUED = 4 << 20
_LENGTH = struct.Struct("!H")

log = logging.getLogger(__name__)


def pack_datagrams(datagrams: list[bytes]) -> bytes:
    """One frame body holding ``datagrams``."""
    return b"".join(_LENGTH.pack(len(d)) + d for d in datagrams)


def unpack_datagrams(body: bytes) -> Iterator[bytes]:
    """The datagrams of a frame body; stops at a truncated tail (counted by the caller)."""
    pos, end = 0, len(body)
    while pos + 2 <= end:
        (length,) = _LENGTH.unpack_from(body, pos)
        pos += 2
        if pos + length > end:
            raise ValueError("truncated datagram in a fallback frame")
        yield body[pos : pos + length]
        pos += length
    if pos != end:
        raise ValueError("trailing byte in a fallback frame")


class FallbackSender:
    """Queues one peer's sealed datagrams and writes them in frames on a persistent stream.

    :param open_stream: coroutine function returning a new stream to the peer.
    :param loop: the event loop the writer runs on (``send`` is called from other threads).
    """

    def __init__(
        self, open_stream: Callable[[], Any], loop: asyncio.AbstractEventLoop, counters: collections.Counter[str] | None = None
    ) -> None:
        self._open_stream = open_stream
        self._loop = loop
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        self._stream: Any = None
        self._task: asyncio.Task[None] | None = None
        self.counters: collections.Counter[str] = counters if counters is not None else collections.Counter()

    def start(self) -> None:
        """Start the writer task (on the loop's thread)."""
        if self._task is None:
            self._task = self._loop.create_task(self._run(), name="tunvpn-fallback")

    async def stop(self) -> None:
        """Stop the writer and close the stream."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=1.0)
            self._task = None
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                await asyncio.wait_for(stream.close(), 1.0)
            except Exception:  # the peer or the host is going away: nothing to tell it
                pass

    def send(self, datagram: bytes) -> None:
        """Queue one sealed datagram (any thread; never blocks)."""
        with self._lock:
            if self._queued_bytes + len(datagram) > MAX_QUEUED:
                self.counters["vpn_fallback_dropped"] += 1
                return
            self._queue.append(datagram)
            self._queued_bytes += len(datagram)
            first = len(self._queue) == 1
        if first:
            self._loop.call_soon_threadsafe(self._wake.set)

    def _take(self) -> list[bytes]:
        batch: list[bytes] = []
        size = 0
        with self._lock:
            while self._queue and size < FRAME_TARGET:
                datagram = self._queue.popleft()
                batch.append(datagram)
                size += len(datagram) + 2
            self._queued_bytes -= size - 2 * len(batch)
        return batch

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                batch = self._take()
                if not batch:
                    break
                try:
                    if self._stream is None:
                        self._stream = await self._open_stream()
                    await self._stream.write_frame(pack_datagrams(batch))
                    self.counters["vpn_fallback_frames_sent"] += 1
                    self.counters["vpn_fallback_datagrams_sent"] += len(batch)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the peer went away or reset: reopen on the next batch
                    self.counters["vpn_fallback_send_errors"] += 1
                    log.debug("fallback stream failed: %s", exc)
                    stream, self._stream = self._stream, None
                    if stream is not None:
                        try:
                            await stream.reset()
                        except Exception:
                            pass
                    await asyncio.sleep(0.5)


async def read_datagrams(stream: Any, deliver: Callable[[list[bytes]], Any], counters: collections.Counter[str]) -> None:
    """Read frames from a fallback stream until it ends; ``deliver`` gets each frame's datagrams."""
    while True:
        body = await stream.read_frame(MAX_FRAME)
        if not body:
            return
        try:
            datagrams = list(unpack_datagrams(body))
        except ValueError:
            counters["vpn_fallback_malformed"] += 1
            await stream.reset()
            return
        counters["vpn_fallback_frames_received"] += 1
        await deliver(datagrams)


class PathHysteresis:
    """When a link that fell back to the stream may try UDP again: the cure for path flapping.

    A peer behind a NAT is heard over UDP (its keepalives open the NAT towards us) while what we
    send it over UDP may never arrive, so "heard over UDP again" alone switched such a link up
    every retry and down again ``udp_timeout`` later, every ~10 s (issue #15). Here each switch up
    that does not hold for ``stable`` seconds counts as a failure and doubles the wait before the
    next trial (``retry`` … ``max_retry``); one that holds resets it.
    """

    def __init__(self, retry: float = 10.0, stable: float = 30.0, max_retry: float = 300.0) -> None:
        self.retry, self.stable, self.max_retry = retry, stable, max_retry
        #: switches up that fell back within ``stable`` seconds, since the last one that held
        self.failures = 0
        self._up_at: float | None = None

    def retry_interval(self) -> float:
        """Seconds between UDP trials now."""
        return float(min(self.max_retry, self.retry * 2 ** min(self.failures, 16)))

    def may_try(self, now: float, last_trial: float) -> bool:
        """Whether a link on the stream may try UDP again at ``now``."""
        return now - last_trial > self.retry_interval()

    def went_up(self, now: float) -> None:
        """The link switched to UDP."""
        self._up_at = now

    def went_down(self, now: float) -> None:
        """The link fell back to the stream."""
        if self._up_at is not None and now - self._up_at < self.stable:
            self.failures += 1
        self._up_at = None

    def holding(self, now: float) -> None:
        """The link is on UDP and working at ``now``: once it held ``stable`` seconds, forgive."""
        if self._up_at is not None and now - self._up_at >= self.stable:
            self.failures = 0


def udp_target(
    advertised: tuple[str, int] | None, heard_from: tuple[str, int] | None, heard_at: float | None, now: float, timeout: float
) -> tuple[str, int] | None:
    """Where to send a peer's UDP datagrams: the endpoint its authentic datagrams come from while
    they keep coming (``timeout``), else the endpoint it advertises.

    Behind a NAT the two differ: the peer advertises its LAN address, which nobody outside
    reaches, while its datagrams arrive from the router's mapping, which answers reach as long as
    the peer keeps it open. Sending to the advertised one is what made the path of a public node
    to a NATed one fall back to the stream over and over (issue #15).
    """
    if heard_from is not None and heard_at is not None and now - heard_at <= timeout:
        return heard_from
    return advertised
