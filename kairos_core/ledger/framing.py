"""Length-prefixed frames over asyncio streams: a :class:`~.sync.SyncChannel` for TCP or unix
sockets (tests, benchmarks, the local API). The libp2p binding frames its stream the same way."""

from __future__ import annotations

import asyncio
import struct

from .errors import SyncError

_LENGTH = struct.Struct(">I")


class StreamChannel:
    """Frames of ``u32 big-endian length ‖ payload``; a frame over ``max_frame`` is refused before
    its payload is read, so a peer cannot make us buffer an arbitrary amount."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_frame: int) -> None:
        self.reader = reader
        self.writer = writer
        self.max_frame = max_frame

    async def send(self, data: bytes) -> None:
        """Write one frame and wait until the transport takes it."""
        self.writer.write(_LENGTH.pack(len(data)) + data)
        await self.writer.drain()

    async def recv(self) -> bytes:
        """Read one frame; ``SyncError`` when oversized, ``IncompleteReadError`` at end of stream."""
        (length,) = _LENGTH.unpack(await self.reader.readexactly(_LENGTH.size))
        if length > self.max_frame:
            raise SyncError(f"frame of {length} bytes exceeds {self.max_frame}")
        return await self.reader.readexactly(length)

    async def aclose(self) -> None:
        """Close the underlying stream."""
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
