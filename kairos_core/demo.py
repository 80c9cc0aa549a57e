"""``kairos demo``: a throwaway network on loopback that narrates itself.

Shows what a real deployment does — admission, membership, ledger replication, leader election
and fail-over — in one process, with a fresh token and temporary state, touching nothing else.
Each node serves its local API on a socket in the temporary state dir, printed at the start, so
``kairos status --socket …`` (and ``peers``, ``leader``, ``ledger``) work while the demo runs.
SIGTERM, SIGINT and ``--seconds`` all stop the nodes and remove the temporary dir.

The narration is of the network, not of each node: a peer that left is said once (the first node
to notice it, and how long after the stop), a leader once per epoch, and a node the demo stopped
is not announced again when a stale report of it arrives late.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from .localnet import LocalNetwork
from .plugins import hookimpl

# soft_wrap: a socket path must stay one line, whatever the terminal's width (or a pipe's).
console = Console(soft_wrap=True, highlight=False)

EPOCH_NOTE = (
    "the epoch counts leaders: each new leader takes the next number, and everything a leader writes "
    "carries it, so a deposed leader's late writes lose to its successor's"
)


class Narration:
    """What the whole demo network has said so far: each change once."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.names: dict[str, str] = {}
        self.membership: dict[str, str] = {}  # peer -> "joined" | "left", as last told
        self.stopped: dict[str, float] = {}  # peers the demo stopped -> when
        self.epochs: set[int] = set()
        self.explained_epoch = False

    def name(self, peer_id: str, info: dict[str, Any] | None = None) -> str:
        hostname = (info or {}).get("hostname")
        if isinstance(hostname, str) and hostname:
            self.names.setdefault(peer_id, hostname)
        return self.names.get(peer_id) or peer_id

    def stamp(self) -> str:
        return f"[dim]{time.monotonic() - self.started:6.2f} s[/dim]"

    def peer(self, observer: str, kind: str, peer_id: str, info: dict[str, Any]) -> None:
        name = self.name(peer_id, info)
        if kind not in ("joined", "left"):
            return  # an entry refreshed: not news to the audience
        if peer_id in self.stopped and kind != "left":
            return  # a late report of a node the demo stopped: it is gone
        if self.membership.get(peer_id) == kind:
            return
        self.membership[peer_id] = kind
        after = ""
        if kind == "left" and peer_id in self.stopped:
            after = f", {time.monotonic() - self.stopped[peer_id]:.2f} s after it stopped"
        console.print(f"{self.stamp()} [cyan]{name}[/cyan] {kind} (first seen by {observer}{after})")

    def leader(self, observer: str, leader: str, epoch: int) -> None:
        if epoch in self.epochs:
            return
        self.epochs.add(epoch)
        console.print(f"{self.stamp()} [bold]leader[/bold] is {self.name(leader)}, epoch {epoch} (first seen by {observer})")
        if not self.explained_epoch:
            self.explained_epoch = True
            console.print(f"         ({EPOCH_NOTE})")


class Narrator:
    """A plugin that reports what one node sees to the shared :class:`Narration`."""

    def __init__(self, label: str, narration: Narration) -> None:
        self.label = label
        self.narration = narration

    @hookimpl
    def on_peer(self, node, event):
        """Joins and leaves, each said once for the network."""
        self.narration.peer(self.label, str(event.kind), event.peer_id, event.info)

    @hookimpl
    def on_leader_elected(self, node, leader, epoch):
        """Each new leader, said once per epoch."""
        self.narration.leader(self.label, leader, epoch)

    @hookimpl
    def on_ledger_update(self, node, update):
        """Remote writes to the demo bucket."""
        if update.bucket == "demo" and not update.local:
            console.print(
                f"{self.narration.stamp()} [cyan]{self.label}[/cyan] received {update.bucket}/{update.key} = {update.value!r}"
            )


async def run_demo(count: int, seconds: float | None) -> None:
    """Start ``count`` nodes, write to the ledger, stop the leader, and keep running until
    ``seconds`` pass, or SIGINT / SIGTERM."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    handled = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        # The nodes stop and the state dir goes however the demo is ended (a service manager's
        # SIGTERM as much as Ctrl-C).
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, main.cancel)
            handled.append(signum)
    try:
        await _narrate(count, seconds)
    except asyncio.CancelledError:
        console.print("[yellow]stopped[/yellow]; the nodes are down and their state dir is removed")
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


async def _narrate(count: int, seconds: float | None) -> None:
    narration = Narration()
    with tempfile.TemporaryDirectory(prefix="kairos-demo-") as root:
        network = LocalNetwork(Path(root))
        console.print(f"token fingerprint {network.token.fingerprint}; state in {root}")
        try:
            for index in range(count):
                name = f"node{index}"
                node = await network.add_node(plugins=[Narrator(name, narration)], name=name)
                narration.names[node.peer_id] = name
                console.print(f"{narration.stamp()} {name} is {node.peer_id}")
                if node.api_socket is not None:
                    console.print(f"         inspect it: kairos status --socket {node.api_socket}")
            await network.fully_connected()
            console.print(f"{narration.stamp()} [green]{count} nodes see each other[/green]")
            network.nodes[0].ledger.set("demo", "greeting", "hello from node0")
            await network.wait_for(lambda: all(n.leader for n in network.running()), timeout=20)
            if count >= 3:
                await _fail_over(network, narration)
            console.print("[green]running; Ctrl-C to stop[/green]" if seconds is None else f"running {seconds} s more")
            await asyncio.sleep(seconds if seconds is not None else 10**9)
        finally:
            await network.stop()


async def _fail_over(network: LocalNetwork, narration: Narration) -> None:
    leader_id, epoch = network.nodes[0].leader
    leader = next(n for n in network.nodes if n.peer_id == leader_id)
    console.print(f"{narration.stamp()} [yellow]stopping the leader {leader.hostname}[/yellow] (epoch {epoch})")
    stopped_at = time.monotonic()
    narration.stopped[leader_id] = stopped_at
    await leader.stop()
    await network.wait_for(lambda: all(n.leader and n.leader[0] != leader_id for n in network.running()), timeout=30)
    took = time.monotonic() - stopped_at
    new_id, new_epoch = network.running()[0].leader
    console.print(
        f"{narration.stamp()} [green]fail-over took {took:.2f} s[/green]: every remaining node follows "
        f"{narration.name(new_id)}, epoch {new_epoch}"
    )
