"""The asyncio ↔ trio bridge: one trio event loop in a dedicated thread per host.

py-libp2p is trio-only and the core is asyncio. Trio's guest mode allows only *one* guest run per
host loop, so several hosts in one asyncio loop (the in-process test network) would have to share
one trio run, and one host's stop could not end its own trio tasks (libp2p spawns system tasks
that live until the run ends). A thread per host keeps each host's trio world separate: stopping a
host ends its run, which cancels every task it spawned, then the thread is joined.

Calls cross with :meth:`TrioThread.call` (asyncio awaits a trio coroutine) and
:meth:`TrioThread.to_asyncio` (trio hands a callable to the asyncio loop, never blocking).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Awaitable, Callable, TypeVar

import outcome
import trio

from .errors import P2PError

T = TypeVar("T")
log = logging.getLogger(__name__)


class TrioThread:
    """A trio run in its own thread, serving calls from one asyncio loop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finished = threading.Event()
        self._pending: set[Callable[[], None]] = set()
        #: called (on the asyncio loop) with the error when the trio run dies after it started
        #: serving, not while it starts or is asked to stop: the host is gone, and its owner must know
        self.on_died: Callable[[BaseException], None] | None = None

    @property
    def running(self) -> bool:
        """True between a successful :meth:`start` and the end of the trio run."""
        return self._token is not None and not self._finished.is_set()

    async def start(self, main: Callable[[trio.Nursery, Callable[[], None]], Awaitable[None]]) -> None:
        """Start the thread and ``await main(nursery, ready)`` inside trio.

        ``main`` must call ``ready()`` once it is serving and return when the run should end;
        :meth:`start` returns when ``ready`` was called and raises what ``main`` raised before it.
        """
        self._loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = self._loop.create_future()

        def report(result: outcome.Outcome) -> None:
            if not started.done():
                if isinstance(result, outcome.Error):
                    exc = _first_leaf(result.error)
                    started.set_exception(exc if isinstance(exc, P2PError) else P2PError(f"host failed to start: {exc!r}"))
                else:
                    started.set_exception(P2PError("host stopped while starting"))

        def ready() -> None:
            self._call_soon_asyncio(lambda: started.done() or started.set_result(None))

        async def root() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery

                async def run_main() -> None:
                    await main(nursery, ready)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(run_main)

        def thread_body() -> None:
            result = outcome.capture(trio.run, root)
            self._nursery = None
            self._finished.set()
            if isinstance(result, outcome.Error):
                log.debug("trio run of %s ended with %r", self.name, result.error)
                error = result.error

                def died() -> None:
                    if started.done() and self.on_died is not None:
                        self.on_died(error)

                self._call_soon_asyncio(died)
            self._call_soon_asyncio(lambda: report(result))
            self._call_soon_asyncio(self._refuse_pending)

        self._thread = threading.Thread(target=thread_body, name=f"kairos-p2p-{self.name}", daemon=True)
        self._thread.start()
        await started

    async def join(self, timeout: float = 10.0) -> None:
        """Wait (without blocking the asyncio loop) for the trio run and its thread to end."""
        thread = self._thread
        if thread is None:
            return
        deadline = asyncio.get_running_loop().time() + timeout
        while not self._finished.is_set():
            if asyncio.get_running_loop().time() > deadline:
                raise P2PError(f"trio thread of {self.name} did not stop within {timeout}s")
            await asyncio.sleep(0.01)
        # trio.run has returned; the thread only has its last few bytecodes left to run
        thread.join(timeout=1.0)
        self._thread = None

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run the trio coroutine function ``fn(*args)`` and return its result to asyncio.

        Cancelling the awaiting asyncio task cancels the trio call too.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        scope = trio.CancelScope()

        def settle(result: outcome.Outcome) -> None:
            if future.done():
                return
            if isinstance(result, outcome.Error):
                future.set_exception(result.error)
            else:
                future.set_result(result.value)

        async def task() -> None:
            result: outcome.Outcome = outcome.Error(P2PError("call cancelled (host stopping)"))
            try:
                with scope:
                    try:
                        result = outcome.Value(await fn(*args))
                    except Exception as exc:  # Cancelled (a BaseException) must keep unwinding
                        result = outcome.Error(exc)
            finally:
                # runs on success, error, our own cancel and the run ending: asyncio always hears
                final = result
                self._call_soon_asyncio(lambda: settle(final), loop)

        def refuse() -> None:
            settle(outcome.Error(P2PError("host is not running")))

        def spawn() -> None:
            try:
                if self._nursery is None:
                    raise RuntimeError("no nursery")
                self._nursery.start_soon(task)
            except RuntimeError:  # the nursery is already closing: the host is stopping
                self._call_soon_asyncio(refuse, loop)

        # A call queued just as the run ends may never be picked up: the end of the run settles
        # whatever is still pending, so no caller waits forever.
        self._pending.add(refuse)
        future.add_done_callback(lambda _: self._pending.discard(refuse))
        self.run_sync_soon(spawn, on_finished=refuse)
        try:
            return await future
        except asyncio.CancelledError:
            self.run_sync_soon(scope.cancel)
            raise

    def _refuse_pending(self) -> None:
        for refuse in list(self._pending):
            refuse()

    def run_sync_soon(self, fn: Callable[[], object], on_finished: Callable[[], None] | None = None) -> None:
        """Schedule ``fn()`` in the trio thread; ``on_finished()`` runs here if trio is gone."""
        token = self._token
        if token is None or self._finished.is_set():
            if on_finished:
                on_finished()
            return
        try:
            token.run_sync_soon(fn)
        except trio.RunFinishedError:
            if on_finished:
                on_finished()

    def to_asyncio(self, fn: Callable[[], object]) -> None:
        """From trio: run ``fn()`` on the asyncio loop soon (dropped if that loop is closed)."""
        self._call_soon_asyncio(fn)

    def _call_soon_asyncio(self, fn: Callable[[], object], loop: asyncio.AbstractEventLoop | None = None) -> None:
        loop = loop or self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the loop closed between the check and the call
            pass


def _first_leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
