"""Coalescing local writes into gossip deltas.

A burst of writes (a plugin filling a bucket, a node publishing its state) should leave as a few
batches, not one message per key. The batcher holds writes for a few milliseconds, then publishes
them split under a byte budget. A key written twice within the window is sent once, at its latest
version: the earlier one would lose the merge everywhere anyway.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Awaitable, Callable

from .codec import DEFAULT_BATCH_BUDGET, split_batches
from .entry import Entry

log = logging.getLogger(__name__)

Publish = Callable[[bytes], "Awaitable[None] | None"]


class DeltaBatcher:
    """Collects entries and publishes them as encoded batches after ``delay`` seconds.

    ``publish(batch_bytes)`` may be a plain function or a coroutine function; a failure is logged
    and the batch dropped (anti-entropy repairs what gossip misses). Must be used from a running
    event loop.
    """

    def __init__(
        self,
        publish: Publish,
        *,
        delay: float = 0.005,
        max_bytes: int = DEFAULT_BATCH_BUDGET,
        max_pending: int = 1000,
    ) -> None:
        self._publish = publish
        self.delay = delay
        self.max_bytes = max_bytes
        self.max_pending = max_pending
        self._pending: dict[tuple[str, str], Entry] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches_sent = 0

    def add(self, entry: Entry) -> None:
        """Queue ``entry`` for the next batch."""
        ident = (entry.bucket, entry.key)
        held = self._pending.get(ident)
        if held is None or entry.newer_than(held):
            self._pending[ident] = entry
        if len(self._pending) >= self.max_pending:
            self._start_flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay, self._start_flush)

    def _start_flush(self) -> None:
        task = asyncio.get_running_loop().create_task(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Publish everything pending now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = list(self._pending.values()), {}
        for batch in split_batches(pending, self.max_bytes):
            try:
                result = self._publish(batch)
                if inspect.isawaitable(result):
                    await result
                self.batches_sent += 1
            except Exception:
                log.exception("publishing a ledger delta of %d bytes failed", len(batch))

    async def aclose(self) -> None:
        """Publish what is pending and wait for in-flight batches."""
        await self.flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
