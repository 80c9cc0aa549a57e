"""``kairos demo``: a throwaway network on loopback that narrates itself.

Shows what a real deployment does — admission, membership, ledger replication, leader election
and fail-over — in one process, with a fresh token and temporary state, touching nothing else.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from rich.console import Console

from .plugins import hookimpl
from .localnet import LocalNetwork

console = Console()


class Narrator:
    """A plugin that prints what one node sees."""

    def __init__(self, label: str) -> None:
        self.label = label

    @hookimpl
    def on_peer(self, node, event):
        """Print joins and leaves."""
        console.print(f"[cyan]{self.label}[/cyan] peer {event.kind}: {event.info.get('hostname') or event.peer_id[-8:]}")

    @hookimpl
    def on_leader_elected(self, node, leader, epoch):
        """Print each new leader."""
        name = "itself" if leader == node.peer_id else node.members().get(leader, {}).get("hostname") or leader[-8:]
        console.print(f"[cyan]{self.label}[/cyan] [bold]leader[/bold] is {name}, epoch {epoch}")

    @hookimpl
    def on_ledger_update(self, node, update):
        """Print remote writes to the demo bucket."""
        if update.bucket == "demo" and not update.local:
            console.print(f"[cyan]{self.label}[/cyan] ledger {update.bucket}/{update.key} = {update.value!r}")


async def run_demo(count: int, seconds: float | None) -> None:
    """Start ``count`` nodes, write to the ledger, stop the leader, and keep running."""
    with tempfile.TemporaryDirectory(prefix="kairos-demo-") as root:
        network = LocalNetwork(Path(root))
        console.print(f"token fingerprint {network.token.fingerprint}; state in {root}")
        try:
            for index in range(count):
                await network.add_node(plugins=[Narrator(f"node{index}")], name=f"node{index}",
                                       overrides={"api": {"enable": False}})
            await network.fully_connected()
            console.print(f"[green]{count} nodes see each other[/green]")
            network.nodes[0].ledger.set("demo", "greeting", "hello from node0")
            await network.wait_for(lambda: all(n.leader for n in network.running()), timeout=20)
            if count >= 3:
                leader_id = network.nodes[0].leader[0]
                leader = next(n for n in network.nodes if n.peer_id == leader_id)
                console.print(f"[yellow]stopping the leader {leader.hostname}[/yellow]")
                await leader.stop()
                await network.wait_for(lambda: all(n.leader and n.leader[0] != leader_id for n in network.running()), timeout=20)
            console.print("[green]running; Ctrl-C to stop[/green]" if seconds is None else f"running {seconds} s")
            await asyncio.sleep(seconds if seconds is not None else 10**9)
        finally:
            await network.stop()
