"""A node whose libp2p thread dies says so and fails, instead of running on reaching no one."""

from __future__ import annotations

import asyncio
import logging


def crash_libp2p_thread(node) -> None:
    bridge = node.host._bridge

    async def boom() -> None:
        raise RuntimeError("simulated crash in the libp2p thread")

    bridge.run_sync_soon(lambda: bridge._nursery.start_soon(boom))


async def test_a_dead_libp2p_host_fails_the_node_loudly(kairos_network, caplog):
    net = await kairos_network(2)
    victim, other = net.nodes
    await net.fully_connected()
    with caplog.at_level(logging.ERROR, logger="kairos_core.p2p.host"):
        crash_libp2p_thread(victim)
        await asyncio.wait_for(victim.failed.wait(), 10)
    assert "simulated crash" in (victim.failure or "")
    assert victim.host.counters["host_died"] == 1
    assert any("libp2p host died" in record.getMessage() for record in caplog.records)
    assert not other.failed.is_set()


async def test_a_normal_stop_is_not_a_death(kairos_network):
    net = await kairos_network(1)
    node = net.nodes[0]
    await node.stop()
    await asyncio.sleep(0.2)
    assert not node.failed.is_set() and node.failure is None


async def test_run_node_ends_with_an_error_when_the_host_dies(tmp_path, monkeypatch):
    # `kairos run` (run_node) must exit 1 then, so that systemd's Restart= brings the node back.
    import pytest

    from kairos_core.errors import KairosError
    from kairos_core.localnet import LocalNetwork
    from kairos_core.node import Node, run_node
    from kairos_core.plugins import make_plugin_manager

    started: list[Node] = []
    original_start = Node.start

    async def start_then_crash(self: Node) -> None:
        await original_start(self)
        started.append(self)
        crash_libp2p_thread(self)

    monkeypatch.setattr(Node, "start", start_then_crash)
    manager = make_plugin_manager(autoload=False)
    config = LocalNetwork(tmp_path).make_config("lone", manager=manager)
    with pytest.raises(KairosError, match="libp2p host died"):
        await asyncio.wait_for(run_node(config, manager), 30)
    assert started and started[0]._stopped.is_set()  # it stopped cleanly on the way out
