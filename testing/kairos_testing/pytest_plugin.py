"""The kit's pytest fixtures: in-process networks, namespace labs, kairos processes in them, p2p
hosts, the k3s fakes. One definition each, for the core's tests, the plugins' and any plugin
author's.

Registered as a pytest plugin (entry point ``pytest11`` of kairos-testing), so a plugin author's
test is a few lines::

    async def test_my_plugin(kairos_network):
        net = await kairos_network(3, plugins=[MyPlugin()])
        await net.wait_for(lambda: all(len(n.members()) == 2 for n in net.nodes))

Every node gets its own state dir, a real libp2p host on 127.0.0.1, a real sqlite ledger, and
its own plugin manager (built-ins, the given plugins, no autoloading unless asked for). mDNS and
the DHT are off; nodes are dialled to each other directly (a full mesh).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kairos_core.localnet import LocalNetwork, wait_until
from kairos_core.plugins import KairosPluginManager, make_plugin_manager

from .hosts import HostFactory
from .k3s import K3sKit, k3s_kit
from .labnodes import LabNetwork
from .netlab import DEFAULT_PREFIX_BASE, Lab, NatLab, cleanup_stale, require_netns, unique_prefix

try:  # works in pytest-asyncio's strict mode as well as in auto mode
    from pytest_asyncio import fixture as async_fixture
except ImportError:  # pragma: no cover - without pytest-asyncio async fixtures cannot run anyway
    async_fixture = pytest.fixture

__all__ = [
    "K3sKit",
    "LocalNetwork",
    "hosts",
    "k3s_kit",
    "kairos_network",
    "kairos_plugins",
    "lab_network",
    "netlab",
    "netns_unavailable",
    "wait_until",
]


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


@pytest.fixture(scope="session")
def netns_unavailable() -> str | None:
    """Why namespace labs cannot run here, or ``None``; leftovers of crashed runs are removed once."""
    reason = require_netns()
    if reason is None:
        cleanup_stale(DEFAULT_PREFIX_BASE)
    return reason


@pytest.fixture
def netlab(netns_unavailable: str | None) -> Iterator[Callable[..., Lab]]:
    """A factory ``netlab(nodes=3) -> Lab`` of started labs, all closed at teardown (pass or fail);
    ``netlab(kinds=[...])`` builds a :class:`NatLab` instead (public, port-preserving, symmetric).

    Skips the test, with the reason, when namespaces are unavailable (not root, no ip/nft).
    """
    if netns_unavailable is not None:
        pytest.skip(netns_unavailable)
    labs: list[Lab] = []

    def make(nodes: int = 3, *, kinds: list[str] | None = None) -> Lab:
        lab = NatLab(kinds, unique_prefix()) if kinds else Lab(unique_prefix(), nodes)
        labs.append(lab)  # registered before start(): a half-built lab is still torn down
        return lab.start()

    try:
        yield make
    finally:
        for lab in labs:
            lab.close()


@pytest.fixture
def lab_network(netlab: Callable[..., Lab], tmp_path: Path) -> Iterator[Callable[..., LabNetwork]]:
    """A factory ``lab_network(nodes=3) -> LabNetwork``: real ``kairos run`` processes in a fresh
    lab, each network closed at teardown (its processes stopped, then the lab). ``kinds=[...]``
    builds the lab as a NAT lab; other keywords go to :class:`~.labnodes.LabNetwork`
    (``token=``, ``autoload_plugins=``)."""
    made: list[LabNetwork] = []

    def make(nodes: int = 3, *, kinds: list[str] | None = None, **kwargs: Any) -> LabNetwork:
        network = LabNetwork(netlab(nodes, kinds=kinds), tmp_path / f"lab{len(made)}", **kwargs)
        made.append(network)
        return network

    try:
        yield make
    finally:
        for network in made:
            network.close()


@async_fixture
async def hosts() -> AsyncIterator[HostFactory]:
    """A factory of real p2p hosts on loopback sharing one token; all stopped after the test."""
    factory = HostFactory()
    try:
        yield factory
    finally:
        await factory.close()
