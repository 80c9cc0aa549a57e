"""Which sync protocol two real libp2p hosts speak, and what a session between agreeing ledgers costs.

A node offers ``/kairos/sync/1.1.0`` (ROOT phase first) and falls back to ``/kairos/sync/1.0.0``
for a peer that serves only that (kairos-core 0.1.0): the stand-in for such a peer here is a
host that serves the old protocol exactly as 0.1.0 did, a digest first, and nothing else.
"""

from __future__ import annotations

from kairos_core.ledger import open_ledger, sync_ledgers
from kairos_core.ledger.sync import LEGACY_PROTOCOL_ID, PROTOCOL_ID
from kairos_core.replication import Replicator, StreamSyncChannel
from kairos_core.seal import Sealer
from kairos_testing import wait_until
from kairos_testing.hosts import HostFactory

BUCKET = "data"


async def _admitted_pair(hosts: HostFactory):
    a, b = await hosts.host(), await hosts.host()
    await a.connect(b.addresses())
    await wait_until(lambda: a.is_admitted(b.peer_id) and b.is_admitted(a.peer_id), timeout=10)
    return a, b


def _replicator(host, ledger, hosts: HostFactory) -> Replicator:
    sealer = Sealer(host.schedule, max_frame_size=hosts.token.max_message_size)
    return Replicator(ledger, host, sealer, sync_interval=3600.0)  # no periodic sync: we call it


async def test_agreeing_nodes_sync_over_1_1_with_two_root_frames(hosts: HostFactory, tmp_path) -> None:
    a, b = await _admitted_pair(hosts)
    ledgers = [open_ledger(a.identity, tmp_path / "a"), open_ledger(b.identity, tmp_path / "b")]
    for k in range(200):
        ledgers[0].set(BUCKET, f"k{k}", {"k": k})
    replicators = [_replicator(a, ledgers[0], hosts), _replicator(b, ledgers[1], hosts)]
    try:
        for replicator in replicators:
            replicator.start()
        assert await replicators[0].sync_with(b.peer_id)
        # (the serving side may still be merging what it received when ours returns)
        await wait_until(lambda: ledgers[1].items(BUCKET) == ledgers[0].items(BUCKET), timeout=10)
        await wait_until(lambda: replicators[1].counters["syncs_served"] == 1, timeout=10)
        sent = a.counters[f"out_bytes:{PROTOCOL_ID}"]
        assert sent > 2000  # the first session carried a digest and 200 entries
        assert await replicators[0].sync_with(b.peer_id)
        # the second: the root frame and its length prefix, where the digest alone was > 2 KB
        assert 17 <= a.counters[f"out_bytes:{PROTOCOL_ID}"] - sent <= 32
        assert a.counters[f"streams:{PROTOCOL_ID}"] >= 2
        assert a.counters[f"streams:{LEGACY_PROTOCOL_ID}"] == 0
        assert replicators[0].counters["syncs_legacy"] == 0
        await wait_until(lambda: replicators[1].counters["syncs_served"] == 2, timeout=10)
    finally:
        for replicator in replicators:
            await replicator.stop()
        for ledger in ledgers:
            ledger.close()


async def test_a_peer_serving_only_1_0_is_synced_over_1_0(hosts: HostFactory, tmp_path) -> None:
    a, old = await _admitted_pair(hosts)
    ledger = open_ledger(a.identity, tmp_path / "a")
    old_ledger = open_ledger(old.identity, tmp_path / "old")
    for k in range(30):
        ledger.set(BUCKET, f"new-{k}", k)
        old_ledger.set(BUCKET, f"old-{k}", k)
    served: list[str] = []

    async def serve_as_0_1_0(stream) -> None:
        served.append(stream.protocol)
        try:
            await sync_ledgers(old_ledger, StreamSyncChannel(stream, hosts.token.max_message_size), compare_roots=False)
        finally:
            await stream.close()

    old.set_stream_handler(LEGACY_PROTOCOL_ID, serve_as_0_1_0)
    replicator = _replicator(a, ledger, hosts)
    try:
        replicator.start()
        assert await replicator.sync_with(old.peer_id)
        assert served == [LEGACY_PROTOCOL_ID]
        assert replicator.counters["syncs_legacy"] == 1 and replicator.counters["sync_failures"] == 0
        await wait_until(lambda: ledger.items(BUCKET) == old_ledger.items(BUCKET), timeout=10)
        assert len(ledger.items(BUCKET)) == 60
        # and the other way round: the old node's sessions (1.0.0 only) are served by the new one
        old_stream = await old.open_stream(a.peer_id, LEGACY_PROTOCOL_ID)
        try:
            result = await sync_ledgers(
                old_ledger, StreamSyncChannel(old_stream, hosts.token.max_message_size), compare_roots=False
            )
        finally:
            await old_stream.close()
        assert result.differing_ranges == 0
        await wait_until(lambda: replicator.counters["syncs_served"] == 1, timeout=5)
    finally:
        await replicator.stop()
        ledger.close()
        old_ledger.close()
