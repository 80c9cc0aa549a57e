"""The connecting end's pool of idle side connections, on stand-in connections: the watchers that
drop idle ones and the takers that pop them share one list."""

from __future__ import annotations

import asyncio

from kairos_plugin_services.relay import Pooled, Services


class _Transport:
    def __init__(self) -> None:
        self.aborted = False

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


class _Reader:
    """Stands for an idle side connection's reader: ``read`` returns once ``end`` is set."""

    def __init__(self, eof: bool = False) -> None:
        self.eof = eof
        self.end = asyncio.Event()

    def at_eof(self) -> bool:
        return self.eof

    async def read(self, _n: int) -> bytes:
        await self.end.wait()
        self.eof = True
        return b""


class _Writer:
    def __init__(self) -> None:
        self.transport = _Transport()


async def test_an_idle_connection_dropped_while_a_taker_waits_is_never_handed_out_twice():
    services = Services(node=None, settings=None)  # type: ignore[arg-type]  # the pool needs neither
    owner = "12D3KooWExposer"

    def pooled(eof: bool = False) -> Pooled:
        side = (_Reader(eof), _Writer(), None, None)
        return Pooled(side, asyncio.create_task(services._watch_idle(owner, side)))  # type: ignore[arg-type]

    live, idle, dead = pooled(), pooled(), pooled(eof=True)
    services.pool[owner] = [live, idle, dead]
    await asyncio.sleep(0)  # the watchers wait on their reads
    # the first taker pops the dead one and waits for its watcher; meanwhile the idle one's
    # watcher ends (the exposing end closed it) and drops it from the pool
    idle.side[0].end.set()
    first = await services._take(owner)
    second = await services._take(owner)
    assert first is live.side and second is None
    assert services.pool[owner] == [] and idle.side[1].transport.aborted and dead.side[1].transport.aborted
    assert not live.side[1].transport.aborted
