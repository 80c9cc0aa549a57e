"""One mDNS node for lab tests and benchmarks, plus the code that runs a LAN of them.

As a script (run inside a lab namespace) it starts :class:`MDNSDiscovery` with a fresh identity
and prints JSON lines on stdout: ``starting`` (peer id, monotonic time before ``start()``),
``started``, one ``found`` per discovery, ``looked`` when ``looked()`` turns true, and ``stats`` (counters) after SIGTERM or ``--duration``.
CLOCK_MONOTONIC is shared by all namespaces, so the times of different nodes compare.

:func:`discover_lan` (imported by tests and ``bench/discovery_mdns.py``) runs one probe per lab
node and gathers what each found.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PROBE = Path(__file__).resolve()


def _emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


async def _probe(args: argparse.Namespace) -> None:
    from kairos_core.discovery.mdns import MDNSDiscovery
    from kairos_core.identity import Identity
    from kairos_core.keys import KeySchedule
    from kairos_core.token import parse_token

    identity = Identity.generate()
    offset = args.clock_offset
    schedule = KeySchedule(parse_token(args.token), clock=lambda: time.time() + offset)
    if args.garbage:
        await _garbage(schedule, args)
        return
    addrs = [f"/ip4/{args.address}/tcp/{args.port}/p2p/{identity.peer_id}"]

    def on_found(peer_id: str, found: list[str]) -> None:
        _emit("found", peer_id=peer_id, addrs=found)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    discovery = MDNSDiscovery(schedule, identity.peer_id, addrs, on_found, rotation_poll=args.poll)
    _emit("starting", peer_id=identity.peer_id, addrs=addrs)
    broadcasts = _count_broadcasts()
    await discovery.start()
    _emit("started", name=discovery.announced_name)

    async def report_looked() -> None:
        while not discovery.looked():
            await asyncio.sleep(0.02)
        _emit("looked")

    looked = asyncio.create_task(report_looked())
    try:
        await asyncio.wait_for(stop.wait(), args.duration)
    except asyncio.TimeoutError:
        pass
    looked.cancel()
    await discovery.stop()
    _emit("stats", counters=discovery.counters.as_dict() | {"broadcasts": broadcasts[0]}, known=sorted(discovery.known_peers))


def _count_broadcasts() -> list[int]:
    """Count the unsolicited packets (announcements and goodbyes) zeroconf builds for us: every
    one is built by ``generate_service_broadcast`` and sent once; answers to queries are not."""
    from zeroconf import Zeroconf

    count = [0]
    original = Zeroconf.generate_service_broadcast

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        count[0] += 1
        return original(self, *args, **kwargs)

    Zeroconf.generate_service_broadcast = counted  # type: ignore[method-assign]
    return count


async def _garbage(schedule: object, args: argparse.Namespace) -> None:
    """Announce instances named like token holders but with broken TXT records, until stopped."""
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    from kairos_core.discovery.mdns import SERVICE_TYPE

    rendezvous = schedule.current_rendezvous()[0]  # type: ignore[attr-defined]
    junk = [
        b"\x05v=1id\xff\xfe",  # truncated string, binary id
        b"\x03v=2\x05id=zz\x05a0=/x",  # wrong version
        b"\x03v=1\x0bid=notapeer\x0ba0=/ip4/1/tcp",  # bad peer id, bad address
        b"\xff" * 40,  # lengths running past the end
    ]
    azc = AsyncZeroconf()
    for n, text in enumerate(junk):
        name = f"{rendezvous}-{n:012x}.{SERVICE_TYPE}"
        info = AsyncServiceInfo(SERVICE_TYPE, name, port=9, server=f"junk{n}.local.", parsed_addresses=[args.address])
        info.text = text  # raw wire bytes, bypassing zeroconf's own encoder
        await azc.async_register_service(info, cooperating_responders=True)
    _emit("starting", peer_id=None, garbage=len(junk))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), args.duration)
    except asyncio.TimeoutError:
        pass
    await azc.async_close()
    _emit("stats", counters={})


@dataclass
class ProbeResult:
    """What one probe reported."""

    node: int
    token: str
    peer_id: str | None = None
    t_spawn: float = 0.0
    t_starting: float | None = None
    t_started: float | None = None
    t_looked: float | None = None
    found: dict[str, float] = field(default_factory=dict)
    found_addrs: dict[str, list[str]] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    stderr: str = ""
    returncode: int | None = None


async def discover_lan(
    lab: object,
    tokens: dict[int, str],
    *,
    timeout: float = 20.0,
    linger: float = 1.5,
    poll: float = 5.0,
    extra_args: dict[int, list[str]] | None = None,
    delays: dict[int, float] | None = None,
) -> dict[int, ProbeResult]:
    """Run a probe in lab node ``i`` with ``tokens[i]`` for every ``i``.

    Returns when every node has found every other node holding the same token and reported
    ``looked`` (or after ``timeout``), plus ``linger`` seconds during which wrong discoveries
    could still show up.
    ``delays[i]`` launches node ``i`` that many seconds after the start; ``extra_args[i]`` are
    passed to its probe. Garbage announcers (``--garbage``) are left out of the completeness check.
    """
    extra_args = extra_args or {}
    delays = delays or {}
    results = {i: ProbeResult(i, tok) for i, tok in tokens.items()}
    garbage = {i for i in tokens if "--garbage" in extra_args.get(i, [])}
    procs: dict[int, asyncio.subprocess.Process] = {}
    readers: list[asyncio.Task] = []
    complete = asyncio.Event()

    def check_complete() -> None:
        honest = {i: r for i, r in results.items() if i not in garbage}
        if any(r.peer_id is None for r in honest.values()):
            return
        for i, r in honest.items():
            expected = {o.peer_id for j, o in honest.items() if j != i and o.token == r.token}
            if not expected <= set(r.found) or r.t_looked is None:
                return
        complete.set()

    async def read(i: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            r = results[i]
            if msg["event"] == "starting":
                r.peer_id, r.t_starting = msg["peer_id"], msg["t"]
            elif msg["event"] == "started":
                r.t_started = msg["t"]
            elif msg["event"] == "looked":
                r.t_looked = msg["t"]
            elif msg["event"] == "found":
                r.found.setdefault(msg["peer_id"], msg["t"])
                r.found_addrs[msg["peer_id"]] = msg["addrs"]
            elif msg["event"] == "stats":
                r.counters = msg["counters"]
            check_complete()

    async def read_stderr(i: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        results[i].stderr = (await proc.stderr.read()).decode(errors="replace")[-4000:]

    async def launch(i: int, token: str) -> None:
        await asyncio.sleep(delays.get(i, 0.0))
        argv = [
            sys.executable,
            str(PROBE),
            "--token",
            token,
            "--address",
            lab.address(i),  # type: ignore[attr-defined]
            "--duration",
            str(timeout + linger + 10),
            "--poll",
            str(poll),
            *extra_args.get(i, []),
        ]
        results[i].t_spawn = time.monotonic()
        proc = await lab.spawn(i, argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # type: ignore[attr-defined]
        procs[i] = proc
        readers.append(asyncio.create_task(read(i, proc)))
        readers.append(asyncio.create_task(read_stderr(i, proc)))

    launchers = [asyncio.create_task(launch(i, tok)) for i, tok in tokens.items()]
    try:
        await asyncio.wait_for(complete.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    await asyncio.sleep(linger)
    await asyncio.gather(*launchers, return_exceptions=True)
    for proc in procs.values():
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
    for i, proc in procs.items():
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
        results[i].returncode = proc.returncode
    await asyncio.gather(*readers, return_exceptions=True)
    return results


def full_discovery_times(results: dict[int, ProbeResult], members: list[int]) -> dict[str, float] | None:
    """Seconds until the last of ``members`` found the last other member, from three origins.

    ``from_spawn``: from launching the first process (includes Python start-up);
    ``from_first_start`` / ``from_last_start``: from the first / last call of ``start()``.
    ``None`` when discovery was not complete.
    """
    ids = {results[i].peer_id for i in members}
    last = 0.0
    for i in members:
        for peer in ids - {results[i].peer_id}:
            if peer not in results[i].found:
                return None
            last = max(last, results[i].found[peer])
    starts = [results[i].t_starting for i in members if results[i].t_starting is not None]
    return {
        "from_spawn": last - min(results[i].t_spawn for i in members),
        "from_first_start": last - min(starts),
        "from_last_start": last - max(starts),
    }


def main() -> None:
    """Command line of the probe."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--token", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--port", type=int, default=4001)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--poll", type=float, default=5.0)
    parser.add_argument("--clock-offset", type=float, default=0.0, help="seconds added to this node's clock")
    parser.add_argument("--garbage", action="store_true", help="announce broken records instead of a node")
    asyncio.run(_probe(parser.parse_args()))


if __name__ == "__main__":
    main()
