"""Small JSON control frames on a raw libp2p stream (trio side), for the relay and reachability protocols.

A frame is a 2-byte big-endian length and that many bytes of a JSON object. Both protocols only
exchange a few short requests and answers, so frames are capped at :data:`MAX_FRAME`; anything
longer, not JSON, or not an object is a :class:`FrameError` (the caller drops the stream and counts).
"""

from __future__ import annotations

import json
from typing import Any

from libp2p.network.stream.exceptions import StreamError

MAX_FRAME = 1024


class FrameError(Exception):
    """A control frame was malformed, oversized, or the stream ended or broke mid-frame."""


async def read_exactly(net_stream: Any, n: int) -> bytes:
    """``n`` bytes from ``net_stream``; :class:`FrameError` if it ends or breaks first."""
    out = b""
    while len(out) < n:
        try:
            chunk = await net_stream.read(n - len(out))
        except StreamError as exc:
            raise FrameError(f"stream ended: {type(exc).__name__}") from None
        if not chunk:
            raise FrameError("stream ended")
        out += chunk
    return out


async def read_frame(net_stream: Any) -> dict[str, Any]:
    """One frame's JSON object."""
    size = int.from_bytes(await read_exactly(net_stream, 2), "big")
    if size == 0 or size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes (1..{MAX_FRAME} allowed)")
    try:
        value = json.loads(await read_exactly(net_stream, size))
    except (ValueError, UnicodeDecodeError):
        raise FrameError("frame is not JSON") from None
    if not isinstance(value, dict):
        raise FrameError("frame is not a JSON object")
    return value


async def write_frame(net_stream: Any, value: dict[str, Any]) -> None:
    """Send ``value`` as one frame."""
    data = json.dumps(value, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise FrameError(f"frame of {len(data)} bytes exceeds {MAX_FRAME}")
    try:
        await net_stream.write(len(data).to_bytes(2, "big") + data)
    except StreamError as exc:
        raise FrameError(f"stream broken: {type(exc).__name__}") from None
