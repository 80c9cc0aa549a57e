"""Binds the ledger to the p2p network: sealed gossip deltas and anti-entropy over streams.

- Every local write goes out at once, coalesced by :class:`~kairos_core.ledger.DeltaBatcher`,
  sealed with the window's AES key and published on the token's topic. Received frames are opened,
  decoded and merged; anything that fails is dropped and counted by reason.
- Anti-entropy (:func:`~kairos_core.ledger.sync_ledgers`) runs over ``/kairos/sync/1.0.0``
  with every newly admitted peer (started by the side with the lower peer id, so a pair syncs
  once) and every ``sync_interval`` seconds with a random admitted peer. Late joiners and healed
  partitions converge without anyone rewriting anything.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from contextlib import suppress
from typing import TYPE_CHECKING

from .ledger import DecodeError, DeltaBatcher, Ledger, SyncError, decode_batch, sync_ledgers
from .ledger.entry import MAX_REMOTE_VALUE_SIZE
from .ledger.sync import PROTOCOL_ID as SYNC_PROTOCOL
from .seal import OVERHEAD as SEAL_OVERHEAD, SealError, Sealer

if TYPE_CHECKING:
    from .events import LedgerUpdate
    from .p2p import P2PHost, Stream

log = logging.getLogger(__name__)


class StreamSyncChannel:
    """A :class:`~kairos_core.ledger.SyncChannel` over a framed libp2p stream."""

    def __init__(self, stream: Stream, max_frame: int) -> None:
        self.stream = stream
        self.max_frame = max_frame

    async def send(self, data: bytes) -> None:
        """Send one sync message as one frame."""
        await self.stream.write_frame(data)

    async def recv(self) -> bytes:
        """Receive one sync message; :class:`SyncError` at the end of the stream."""
        data = await self.stream.read_frame(self.max_frame)
        if not data:  # sync frames are never empty: this is the end of the stream
            raise SyncError("the peer closed the sync stream")
        return data


class Replicator:
    """Keeps one ledger in step with every admitted peer."""

    def __init__(self, ledger: Ledger, host: P2PHost, sealer: Sealer, *, sync_interval: float = 30.0) -> None:
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
        self._syncing: set[str] = set()

    def start(self) -> None:
        """Subscribe, serve sync, and start the periodic anti-entropy."""
        self.host.subscribe(self.topic, self._on_gossip)
        self.host.set_stream_handler(SYNC_PROTOCOL, self._serve_sync)
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
        """Sync with a newly admitted peer (the lower peer id starts, so a pair syncs once)."""
        if self.host.peer_id < peer_id:
            self._spawn(self.sync_with(peer_id))

    async def sync_with(self, peer_id: str) -> bool:
        """Run one anti-entropy session with ``peer_id``; False when it failed (counted)."""
        if peer_id in self._syncing:
            return False
        self._syncing.add(peer_id)
        try:
            stream = await self.host.open_stream(peer_id, SYNC_PROTOCOL)
            try:
                result = await sync_ledgers(self.ledger, StreamSyncChannel(stream, self.max_frame))
            finally:
                with suppress(Exception):
                    await stream.close()
            self.counters["syncs"] += 1
            log.debug("synced with %s: %s", peer_id, result)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a peer that vanishes or misbehaves mid-sync is routine
            self.counters["sync_failures"] += 1
            log.debug("sync with %s failed: %s: %s", peer_id, type(exc).__name__, exc)
            return False
        finally:
            self._syncing.discard(peer_id)

    async def _serve_sync(self, stream: Stream) -> None:
        try:
            await sync_ledgers(self.ledger, StreamSyncChannel(stream, self.max_frame))
            self.counters["syncs_served"] += 1
        except Exception as exc:
            self.counters["sync_failures"] += 1
            log.debug("serving sync to %s failed: %s: %s", stream.peer_id, type(exc).__name__, exc)
        finally:
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

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
