"""Binds the ledger to the p2p network: sealed gossip deltas and anti-entropy over streams.

- Every local write goes out at once, coalesced by :class:`~kairos_core.ledger.DeltaBatcher`,
  sealed with the window's AES key and published on the token's topic. Received frames are opened,
  decoded and merged; anything that fails is dropped and counted by reason.
- Anti-entropy (:func:`~kairos_core.ledger.sync_ledgers`) runs over ``/kairos/sync/1.1.0``
  (``/kairos/sync/1.0.0`` with a peer that offers only that) with every newly admitted peer and
  every ``sync_interval`` seconds with a random admitted peer. Late joiners and healed
  partitions converge without anyone rewriting anything.

The sync on a new connection is started by the side with the lower peer id, so a pair syncs once.
The other side runs it itself when none took place within ``ADMISSION_SYNC_FALLBACK``
(``admission_syncs_taken_over``): an admission is not always seen on both sides — after a short
partition the lower side may still hold the connection the split killed (its keepalive has not
fired yet, or libp2p kept a second connection), so the peer's redial is no new admission there.
The sync is repeated until one session finds both digests equal (``syncs_confirmed``): one that
failed, or that moved entries (writes can race it; ``syncs_still_differing`` counts checks that
found more), is followed by another, up to ``ADMISSION_SYNC_TRIES`` sessions with growing pauses
while the peer stays admitted (``admission_syncs_abandoned`` if none agreed; the periodic sync
then carries on). At most ``ADMISSION_SYNC_SLOTS`` of these sessions run at once; the others wait
their turn (``admission_syncs_queued``).

A session belongs to one connection: a new admission of a peer cancels whatever session with it
still runs (it is on the connection that died) and starts afresh, a disconnect cancels it, and a
peer that stops sending frames fails it after ``SYNC_IDLE_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from contextlib import suppress
from typing import TYPE_CHECKING

from .config import CORE_DEFAULTS  # ledger.sync_interval, declared once in the config schema
from .ledger import DecodeError, DeltaBatcher, Ledger, SyncError, decode_batch, sync_ledgers
from .ledger.entry import MAX_REMOTE_VALUE_SIZE
from .ledger.sync import LEGACY_PROTOCOL_ID as LEGACY_SYNC_PROTOCOL, PROTOCOL_ID as SYNC_PROTOCOL
from .seal import OVERHEAD as SEAL_OVERHEAD, SealError, Sealer

if TYPE_CHECKING:
    from .events import LedgerUpdate
    from .p2p import P2PHost, Stream

log = logging.getLogger(__name__)

# A sync peer silent this long (no frame, or a send that does not drain) has failed the session.
SYNC_IDLE_TIMEOUT = 10.0
# Sessions the sync on a new connection runs at most until one finds both digests equal, and the
# pause before a retry (doubling up to the cap; a check right after a session that moved entries
# runs at once). Six sessions span about 12 s of pauses: longer than a connection takes to settle.
ADMISSION_SYNC_TRIES = 6
ADMISSION_SYNC_RETRY = 0.5
ADMISSION_SYNC_RETRY_MAX = 4.0
# The higher peer id of a pair runs the admission sync itself when no session with the peer was
# run or served this long after the admission (the lower side may not have seen one).
ADMISSION_SYNC_FALLBACK = 1.5
# Admission sessions this node runs at once; the others wait for a slot (``admission_syncs_queued``).
# A node that joins, or a network that forms, admits many peers within a second or two, and every
# pair's ledgers still differ while gossip is spreading the joiners' entries: run all at once,
# each session moves what gossip is about to deliver anyway and its confirming check finds new
# differences again. In turn, a later session finds most of it delivered, often by the roots
# alone. Measured forming 20 nodes on 2 cores (docs/scaling.md): half the sessions, a quarter of
# the sync bytes, formation 22 s instead of 26–32. A peer that stalls holds its slot at most
# SYNC_IDLE_TIMEOUT; the periodic sync and the sessions we serve take no slot.
ADMISSION_SYNC_SLOTS = 2
# Sessions one peer may have us serve at once; more are refused (each holds a view of the ledger).
MAX_SERVED_PER_PEER = 2


class StreamSyncChannel:
    """A :class:`~kairos_core.ledger.SyncChannel` over a framed libp2p stream."""

    def __init__(self, stream: Stream, max_frame: int, idle_timeout: float = SYNC_IDLE_TIMEOUT) -> None:
        self.stream = stream
        self.max_frame = max_frame
        self.idle_timeout = idle_timeout

    async def send(self, data: bytes) -> None:
        """Send one sync message as one frame; :class:`SyncError` if it does not go out in time."""
        try:
            await asyncio.wait_for(self.stream.write_frame(data), self.idle_timeout)
        except asyncio.TimeoutError:
            raise SyncError(f"the peer took no data for {self.idle_timeout:g} s") from None

    async def recv(self) -> bytes:
        """Receive one sync message; :class:`SyncError` at the end of the stream or after silence."""
        try:
            data = await asyncio.wait_for(self.stream.read_frame(self.max_frame), self.idle_timeout)
        except asyncio.TimeoutError:
            raise SyncError(f"the peer sent nothing for {self.idle_timeout:g} s") from None
        if not data:  # sync frames are never empty: this is the end of the stream
            raise SyncError("the peer closed the sync stream")
        return data


class Replicator:
    """Keeps one ledger in step with every admitted peer."""

    def __init__(
        self, ledger: Ledger, host: P2PHost, sealer: Sealer, *, sync_interval: float = CORE_DEFAULTS["ledger"]["sync_interval"]
    ) -> None:
        self.ledger = ledger
        self.host = host
        self.sealer = sealer
        self.topic = sealer.topic.decode()
        self.sync_interval = sync_interval
        self.max_frame = sealer.max_frame_size
        self.counters: Counter[str] = Counter()
        self.batcher = DeltaBatcher(self._publish, max_bytes=max(1024, min(256 * 1024, self.max_frame - SEAL_OVERHEAD)))
        self._tasks: set[asyncio.Task] = set()
        self._periodic: asyncio.Task | None = None
        self._sessions: dict[str, asyncio.Task] = {}  # peer -> the sync we run with it now
        self._served: Counter[str] = Counter()  # peer -> sessions we serve it now
        # peer -> monotonic time of the last session with it that completed (run or served); only
        # admitted peers (peer_gone forgets), so it stays as small as our connections
        self._synced_at: dict[str, float] = {}
        # the admission sessions that run at once (ADMISSION_SYNC_SLOTS); the rest wait their turn
        self._admission_slots = asyncio.Semaphore(ADMISSION_SYNC_SLOTS)

    def start(self) -> None:
        """Subscribe, serve sync, and start the periodic anti-entropy."""
        self.host.subscribe(self.topic, self._on_gossip, validate=self._seal_check())
        self.host.set_stream_handler(SYNC_PROTOCOL, self._serve_sync)
        self.host.set_stream_handler(LEGACY_SYNC_PROTOCOL, self._serve_sync)
        self.ledger.add_listener(self._on_update)
        self._periodic = asyncio.get_running_loop().create_task(self._periodic_sync(), name="anti-entropy")

    async def stop(self) -> None:
        """Publish what is pending, then stop every task."""
        self.ledger.remove_listener(self._on_update)
        with suppress(Exception):
            await asyncio.wait_for(self.batcher.aclose(), 2.0)
        tasks = [*self._tasks, *([self._periodic] if self._periodic else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def final_push(self, peers: int = 2, timeout: float = 1.5) -> None:
        """Before the host closes: flush gossip and sync with a few peers.

        Gossip is best effort (a mesh may not be grafted yet); a direct sync makes writes made
        during shutdown — a plugin's goodbye, a released lease — reach the network for sure.
        """
        await self.batcher.flush()
        chosen = random.sample(sorted(self.host.admitted_peers()), k=min(peers, len(self.host.admitted_peers())))
        if chosen:
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(self.sync_with(p) for p in chosen)), timeout)

    # --- gossip ------------------------------------------------------------------------------
    def _on_update(self, update: LedgerUpdate) -> None:
        if update.local:
            entry = self.ledger.get_entry(update.bucket, update.key)
            if entry is not None:
                self.batcher.add(entry)

    async def _publish(self, batch: bytes) -> None:
        await self.host.publish(self.topic, self.sealer.seal(batch))
        self.counters["deltas_sent"] += 1

    def _seal_check(self):
        """The host's gossip validator: whether a frame opens under an accepted window.

        A frame that does not is then neither delivered nor forwarded to the mesh. The check runs
        on the host's trio thread, so it gets a Sealer of its own, and hands its refusals to our
        loop to count (under the names :meth:`_on_gossip` uses).
        """
        loop = asyncio.get_running_loop()
        sealer = Sealer(self.sealer.schedule, self.topic, self.max_frame)

        def opens(frame: bytes) -> bool:
            try:
                sealer.open(frame, check_replay=False)  # replays are _on_gossip's to refuse
            except SealError as exc:
                with suppress(RuntimeError):  # the loop is closing: nobody reads counters any more
                    loop.call_soon_threadsafe(self.counters.update, (f"gossip_dropped_{exc.reason}",))
                return False
            return True

        return opens

    async def _on_gossip(self, from_peer: str, frame: bytes) -> None:
        try:
            batch = self.sealer.open(frame)
            entries = decode_batch(batch, self.max_frame, max_value_size=MAX_REMOTE_VALUE_SIZE)
        except SealError as exc:
            self.counters[f"gossip_dropped_{exc.reason}"] += 1
            return
        except DecodeError:
            self.counters["gossip_dropped_undecodable"] += 1
            self.ledger.count("decode_errors")
            return
        self.counters["deltas_received"] += 1
        await self.ledger.apply_remote_async(entries)

    # --- anti-entropy ------------------------------------------------------------------------
    def peer_admitted(self, peer_id: str) -> None:
        """A new admitted connection to ``peer_id``: sync over it (the lower peer id starts, the
        higher one after ``ADMISSION_SYNC_FALLBACK`` if nothing happened by then).

        Whatever session with that peer still runs is on a connection that is gone: it is
        cancelled, so it can never keep this one from running.
        """
        self._cancel_session(peer_id)
        wait = 0.0 if self.host.peer_id < peer_id else ADMISSION_SYNC_FALLBACK
        self._sessions[peer_id] = self._spawn(self._sync_new_connection(peer_id, wait))

    def peer_gone(self, peer_id: str) -> None:
        """``peer_id`` lost its connection: end any session with it now rather than at a timeout."""
        self._cancel_session(peer_id)
        self._synced_at.pop(peer_id, None)

    def synced_with_admitted(self) -> bool:
        """Whether a session (run or served) completed with every admitted peer since it was
        admitted; True with none. The election's ``joined``: a sitting leader's lease reaches a
        joiner through these syncs, not through gossip."""
        return all(peer in self._synced_at for peer in self.host.admitted_peers())

    async def sync_with(self, peer_id: str) -> bool:
        """Run one anti-entropy session with ``peer_id`` unless one runs already; False when it failed."""
        running = self._sessions.get(peer_id)
        if running is not None and not running.done():
            return False
        task = self._sessions[peer_id] = self._spawn(self._session(peer_id))
        try:
            return await asyncio.shield(task) is not None
        finally:
            if self._sessions.get(peer_id) is task and task.done():
                del self._sessions[peer_id]

    async def _sync_new_connection(self, peer_id: str, wait: float = 0.0) -> None:
        """Sync with a newly admitted peer until one session finds both digests equal (bounded)."""
        try:
            if wait:
                admitted_at = asyncio.get_running_loop().time()
                await asyncio.sleep(wait)
                if self._served[peer_id] or self._synced_at.get(peer_id, -1.0) >= admitted_at:
                    return  # the peer runs it (or ran it): its sessions keep us in step as well
                self.counters["admission_syncs_taken_over"] += 1
            pause, moved = 0.0, False
            for _ in range(ADMISSION_SYNC_TRIES):
                if pause:
                    await asyncio.sleep(pause)
                if not self.host.is_admitted(peer_id):
                    return
                if self._admission_slots.locked():
                    self.counters["admission_syncs_queued"] += 1
                async with self._admission_slots:  # a slot per session: a retry queues again
                    if not self.host.is_admitted(peer_id):
                        return  # it left while we waited
                    result = await self._session(peer_id)
                if result is not None and result.differing_ranges == 0:
                    self.counters["syncs_confirmed"] += 1
                    return
                if result is not None and not moved:
                    pause, moved = 0.0, True  # it moved entries: check at once that we agree now
                    continue
                if result is not None:
                    self.counters["syncs_still_differing"] += 1  # writes raced the session
                pause = min(max(2 * pause, ADMISSION_SYNC_RETRY), ADMISSION_SYNC_RETRY_MAX)
            self.counters["admission_syncs_abandoned"] += 1
        finally:
            if self._sessions.get(peer_id) is asyncio.current_task():
                del self._sessions[peer_id]

    async def _session(self, peer_id: str):  # -> SyncResult | None
        try:
            # No timeout of our own around the open: cancelling libp2p's stream negotiation midway
            # can break the whole connection ("no valid connections" after a few), and a session
            # on a connection that died is cancelled by peer_gone / the next peer_admitted anyway.
            stream = await self.host.open_stream(peer_id, [SYNC_PROTOCOL, LEGACY_SYNC_PROTOCOL])
            try:
                result = await self._sync_over(stream)
                if stream.protocol != SYNC_PROTOCOL:
                    self.counters["syncs_legacy"] += 1
            finally:
                with suppress(Exception):
                    await stream.close()
            self.counters["syncs"] += 1
            if self.host.is_admitted(peer_id):  # (a peer that left is not remembered)
                self._synced_at[peer_id] = asyncio.get_running_loop().time()
            log.debug("synced with %s: %s", peer_id, result)
            return result
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a peer that vanishes or misbehaves mid-sync is routine
            self.counters["sync_failures"] += 1
            self.counters[f"sync_failures_running_{type(exc).__name__}"] += 1  # (our exception types: bounded)
            log.debug("sync with %s failed: %s: %s", peer_id, type(exc).__name__, exc)
            return None

    async def _sync_over(self, stream: Stream):  # -> SyncResult
        """One session on ``stream``, run or served, in the dialect its protocol names."""
        return await sync_ledgers(
            self.ledger, StreamSyncChannel(stream, self.max_frame), compare_roots=stream.protocol == SYNC_PROTOCOL
        )

    def _cancel_session(self, peer_id: str) -> None:
        task = self._sessions.pop(peer_id, None)
        if task is not None and not task.done():
            task.cancel()
            self.counters["syncs_cancelled"] += 1

    async def _serve_sync(self, stream: Stream) -> None:
        peer = stream.peer_id
        if self._served[peer] >= MAX_SERVED_PER_PEER:
            self.counters["syncs_refused_busy"] += 1
            with suppress(Exception):
                await stream.reset()
            return
        self._served[peer] += 1
        try:
            await self._sync_over(stream)
            self.counters["syncs_served"] += 1
            if self.host.is_admitted(peer):  # (a peer that left is not remembered)
                self._synced_at[peer] = asyncio.get_running_loop().time()
        except Exception as exc:
            self.counters["sync_failures"] += 1
            self.counters[f"sync_failures_serving_{type(exc).__name__}"] += 1
            log.debug("serving sync to %s failed: %s: %s", peer, type(exc).__name__, exc)
        finally:
            self._served[peer] -= 1
            if self._served[peer] <= 0:
                del self._served[peer]
            with suppress(Exception):
                await stream.close()

    async def _periodic_sync(self) -> None:
        while True:
            # jitter so a network started at once does not sync in lock-step
            await asyncio.sleep(self.sync_interval * random.uniform(0.75, 1.25))
            try:
                peers = sorted(self.host.admitted_peers())
                if peers:
                    await self.sync_with(random.choice(peers))
                pruned = self.ledger.prune_tombstones()
                if pruned:
                    log.debug("pruned %d tombstones", pruned)
            except Exception:  # e.g. sqlite failing once: anti-entropy must go on
                self.counters["anti_entropy_errors"] += 1
                log.exception("anti-entropy round failed")

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
