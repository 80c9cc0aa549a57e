"""An in-process network of nodes on loopback, and pytest fixtures built on it.

Registered as a pytest plugin (entry point ``pytest11``), so a plugin author's test is a few
lines::

    async def test_my_plugin(kairos_network):
        net = await kairos_network(3, plugins=[MyPlugin()])
        await net.wait_for(lambda: all(len(n.members()) == 2 for n in net.nodes))

Every node gets its own state dir, a real libp2p host on 127.0.0.1, a real sqlite ledger, and
its own plugin manager (built-ins, the given plugins, no autoloading unless asked for). mDNS and
the DHT are off; nodes are dialled to each other directly (a full mesh).
"""

from __future__ import annotations

from typing import Any

import pytest

from .localnet import LocalNetwork, wait_until
from .plugins import KairosPluginManager, make_plugin_manager

try:  # works in pytest-asyncio's strict mode as well as in auto mode
    from pytest_asyncio import fixture as async_fixture
except ImportError:  # pragma: no cover - without pytest-asyncio async fixtures cannot run anyway
    async_fixture = pytest.fixture

__all__ = ["LocalNetwork", "kairos_network", "kairos_plugins", "wait_until"]


@pytest.fixture
def kairos_plugins() -> KairosPluginManager:
    """A plugin manager with the core's built-in plugins only."""
    return make_plugin_manager(autoload=False)


@async_fixture
async def kairos_network(tmp_path):
    """A factory: ``net = await kairos_network(n, plugins=[...])``; all nodes stop after the test."""
    networks: list[LocalNetwork] = []

    async def factory(count: int = 3, **kwargs: Any) -> LocalNetwork:
        network = LocalNetwork(tmp_path / f"net{len(networks)}")
        networks.append(network)
        return await network.start(count, **kwargs)

    yield factory
    for network in networks:
        await network.stop()
