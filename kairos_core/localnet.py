"""An in-process network of nodes on loopback (no pytest needed: ``kairos demo`` runs on it).

Every node gets its own state dir, a real libp2p host on 127.0.0.1, a real sqlite ledger, and
its own plugin manager (built-ins, the given plugins, no autoloading unless asked for). mDNS and
the DHT are off; nodes are dialled to each other directly (a full mesh). The pytest fixtures
built on it are in :mod:`kairos_testing`.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .config import Config, resolve_config
from .plugins import KairosPluginManager, make_plugin_manager
from .token import NetworkToken, generate_token

_counter = itertools.count()


async def wait_until(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll ``condition()`` (sync or async) until it is truthy; ``TimeoutError`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


class LocalNetwork:
    """N nodes in this event loop, sharing one token."""

    def __init__(self, root: Path, token: NetworkToken | None = None) -> None:
        self.root = Path(root)
        self.token = token or generate_token()
        self.nodes: list[Any] = []

    def make_config(
        self, name: str, overrides: dict[str, Any] | None = None, manager: KairosPluginManager | None = None
    ) -> Config:
        """The config of one node: loopback, discovery off, API socket in its state dir."""
        raw: dict[str, Any] = {
            "p2p": {
                "network_token": self.token.encode(),
                "listen": ["/ip4/127.0.0.1/tcp/0"],
                "disable_mdns": True,
                "disable_dht": True,
            },
            "node": {"state_dir": str(self.root / name), "hostname": name},
        }
        for section, values in (overrides or {}).items():
            raw.setdefault(section, {}).update(values)
        return resolve_config(raw, manager or make_plugin_manager(autoload=False), env={})

    async def add_node(
        self,
        plugins: Iterable[object] = (),
        overrides: dict[str, Any] | None = None,
        autoload: bool = False,
        connect: bool = True,
        name: str | None = None,
    ):
        """Start one more node and (by default) connect it to every running node."""
        from .node import Node

        manager = make_plugin_manager(autoload=autoload, extra_plugins=list(plugins))
        name = name or f"node{next(_counter)}"
        node = Node(self.make_config(name, overrides, manager), manager)
        await node.start()
        if connect:
            for other in self.nodes:
                if other.host is not None:
                    await node.connect(other.host.addresses())
        self.nodes.append(node)
        return node

    async def start(self, count: int, **kwargs: Any) -> "LocalNetwork":
        """Start ``count`` nodes."""
        for _ in range(count):
            await self.add_node(**kwargs)
        return self

    async def stop(self) -> None:
        """Stop every node that still runs."""
        await asyncio.gather(*(node.stop() for node in self.nodes), return_exceptions=True)

    async def wait_for(self, condition: Callable[[], bool], timeout: float = 15.0, interval: float = 0.05) -> None:
        """Wait until ``condition()`` is true; ``TimeoutError`` otherwise."""
        await wait_until(condition, timeout, interval)

    def running(self) -> list[Any]:
        """Nodes that have not been stopped."""
        return [node for node in self.nodes if node.host is not None]

    async def fully_connected(self, timeout: float = 15.0) -> None:
        """Wait until every running node sees every other as a member."""
        await self.wait_for(lambda: all(len(n.members()) == len(self.running()) - 1 for n in self.running()), timeout)
