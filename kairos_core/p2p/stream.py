"""The asyncio-side view of a libp2p stream, with length-prefixed frames.

Every call hops to the host's trio thread. libp2p signals the end of a stream in two ways
(``b""`` or a ``StreamEOF`` exception, trap 4): both come out here as ``b""``. A reset or a broken
connection is a :class:`P2PError`.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from libp2p.network.stream.exceptions import StreamEOF, StreamError

from .errors import P2PError

if TYPE_CHECKING:
    from .bridge import TrioThread

FRAME_HEADER = struct.Struct(">I")
MAX_READ = 1 << 20
READ_CHUNK = 1 << 16


async def _read_or_eof(net_stream: Any, n: int) -> bytes:
    try:
        data = await net_stream.read(n)
    except StreamEOF:
        return b""
    except StreamError as exc:
        raise P2PError(f"stream broken: {type(exc).__name__}") from None
    return data or b""


async def _write(net_stream: Any, data: bytes) -> None:
    try:
        await net_stream.write(data)
    except StreamError as exc:
        raise P2PError(f"stream broken: {type(exc).__name__}") from None


async def _quietly(fn: Any) -> None:
    try:
        await fn()
    except Exception:  # closing or resetting a dead stream has nothing left to report
        pass


class Stream:
    """One libp2p stream to an admitted peer, usable from asyncio."""

    def __init__(
        self,
        bridge: "TrioThread",
        net_stream: Any,
        peer_id: str,
        protocol: str,
        counters: dict[str, int] | None = None,
    ) -> None:
        self._bridge = bridge
        self._counters = counters if counters is not None else {}
        self._net_stream = net_stream
        self._buffer = bytearray()
        self._eof = False
        #: the remote peer's id
        self.peer_id = peer_id
        #: the negotiated protocol id
        self.protocol = protocol

    async def read(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes; ``b""`` at end of stream."""
        if n <= 0:
            return b""
        if self._buffer:
            data = bytes(self._buffer[:n])
            del self._buffer[:n]
            return data
        if self._eof:
            return b""
        # Ask for at least a chunk: small reads (a frame header) would otherwise cost a thread
        # hop each; the surplus waits in the buffer.
        data = await self._bridge.call(_read_or_eof, self._net_stream, min(max(n, READ_CHUNK), MAX_READ))
        if not data:
            self._eof = True
            return b""
        if len(data) > n:
            self._buffer += data[n:]
            data = data[:n]
        return data

    async def read_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or :class:`P2PError` if the stream ends first."""
        chunks = bytearray()
        while len(chunks) < n:
            chunk = await self.read(n - len(chunks))
            if not chunk:
                raise P2PError(f"stream ended after {len(chunks)} of {n} bytes")
            chunks += chunk
        return bytes(chunks)

    async def write(self, data: bytes) -> None:
        """Send ``data``."""
        if data:
            await self._bridge.call(_write, self._net_stream, bytes(data))

    async def read_frame(self, max_size: int) -> bytes:
        """One frame: a 4-byte big-endian length, then that many bytes.

        Returns ``b""`` at a clean end of stream between frames. A length above ``max_size`` is a
        :class:`P2PError` and the stream is reset: the frame is never allocated.
        """
        header = await self.read(FRAME_HEADER.size)
        if not header:
            return b""
        if len(header) < FRAME_HEADER.size:
            header += await self.read_exactly(FRAME_HEADER.size - len(header))
        (size,) = FRAME_HEADER.unpack(header)
        if size > max_size:
            self._counters["frames_dropped"] = self._counters.get("frames_dropped", 0) + 1
            await self.reset()
            raise P2PError(f"frame of {size} bytes exceeds the limit of {max_size}")
        return await self.read_exactly(size) if size else b""

    async def write_frame(self, data: bytes) -> None:
        """Send ``data`` as one frame (header and body in one write)."""
        if len(data) > 0xFFFFFFFF:
            raise P2PError("frame too large for a 4-byte length")
        await self._bridge.call(_write, self._net_stream, FRAME_HEADER.pack(len(data)) + bytes(data))

    async def close(self) -> None:
        """Close our writing side; the peer reads ``b""``. Reading what is still in flight works."""
        await self._bridge.call(_quietly, self._net_stream.close)

    async def reset(self) -> None:
        """Abort the stream in both directions."""
        self._eof = True
        self._buffer.clear()
        if self._bridge.running:
            await self._bridge.call(_quietly, self._net_stream.reset)
