"""Helpers for tests that run real hosts on loopback in one asyncio loop."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from kairos_core.identity import Identity
from kairos_core.keys import KeySchedule
from kairos_core.p2p.host import P2PHost
from kairos_core.token import NetworkToken, generate_token

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


class HostFactory:
    """Builds started hosts and stops every one of them in :meth:`close`, even after a failure."""

    def __init__(self) -> None:
        self.token: NetworkToken = generate_token()
        self.hosts: list[P2PHost] = []

    async def host(
        self,
        token: NetworkToken | None = None,
        listen: list[str] | None = None,
        *,
        host_class: type[P2PHost] = P2PHost,
        start: bool = True,
        **kwargs: Any,
    ) -> P2PHost:
        """A host with the factory's token (or ``token``), listening on loopback by default."""
        token = token or self.token
        kwargs.setdefault("max_message_size", token.max_message_size)
        host = host_class(Identity.generate(), KeySchedule(token), listen or [LOOPBACK], **kwargs)
        self.hosts.append(host)
        if start:
            await host.start()
        return host

    async def close(self) -> None:
        """Stop every host built here."""
        await asyncio.gather(*(h.stop() for h in self.hosts), return_exceptions=True)


async def publish_until_received(
    sender: P2PHost, topic: str, inbox: "asyncio.Queue[tuple[str, bytes]]", payload: bytes, timeout: float = 10.0
) -> tuple[str, bytes]:
    """Publish ``payload`` until it shows up in ``inbox`` (the gossip mesh forms after a heartbeat)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        await sender.publish(topic, payload)
        try:
            while True:
                got = await asyncio.wait_for(inbox.get(), 0.3)
                if got[1] == payload:
                    return got
        except asyncio.TimeoutError:
            continue
    raise TimeoutError(f"{payload!r} never arrived")


def collector() -> tuple["asyncio.Queue[tuple[str, bytes]]", Callable[[str, bytes], Awaitable[None]]]:
    """An inbox and an async gossip handler that fills it."""
    inbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def handler(peer: str, data: bytes) -> None:
        await inbox.put((peer, data))

    return inbox, handler


async def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition()`` every 0.1 s; AssertionError naming ``what`` after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await asyncio.sleep(0.1)
