"""Real ``kairos run`` nodes with the VPN, in network namespaces: for acceptance tests and bench/vpn.py.

:class:`VPNLab` builds a :class:`kairos_testing.netlab.Lab` of N nodes, starts ``kairos run`` in each
with the tunvpn plugin loaded (the other installed plugins disabled), and waits until every node
has a session with every other. Cleanup (processes, namespaces) happens in :meth:`close`, which
the context manager calls also when the body raises.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from .labnodes import LabNetwork, LabNode
from .netlab import Closing, Lab, unique_prefix

BLOCK_TABLE = "tunvpn_block"


def other_plugins(enabled: Iterable[str] = ("tunvpn",)) -> list[str]:
    """Installed plugins other than ``enabled`` (disabled in lab nodes: k3s must not start there)."""
    return sorted({ep.name for ep in entry_points(group="kairos")} - set(enabled))


class VPNLab(Closing):
    """N namespaces, each running a kairos node with the VPN.

    :param vpn: options of the ``vpn`` section for every node.
    :param plugins: plugins the nodes run besides tunvpn (e.g. ``("services",)``).
    """

    def __init__(
        self,
        root: Path,
        nodes: int = 3,
        vpn: dict[str, Any] | None = None,
        prefix: str = "kv",
        plugins: Iterable[str] = (),
    ) -> None:
        self.root = Path(root)
        self.plugins = ("tunvpn", *plugins)
        self.size = nodes
        self.vpn_options = {"keepalive_interval": 0.5, "udp_timeout": 2.0, **(vpn or {})}
        self.lab = Lab(unique_prefix(prefix), nodes)
        self.network: LabNetwork | None = None
        self.peer_ids: dict[int, str] = {}

    def start(self, timeout: float = 60.0) -> None:
        """Build the lab, start every node and wait for a full mesh of VPN sessions."""
        self.lab.start()
        self.network = LabNetwork(self.lab, self.root, autoload_plugins=True)
        extra = {"vpn": self.vpn_options, "plugins": {"disabled": other_plugins(self.plugins)}}
        nodes = [self.network.start(i, p2p={"disable_dht": True}, extra=extra) for i in range(1, self.size + 1)]
        self.peer_ids = {node.index: self.network.wait_up(node) for node in nodes}
        self.wait(
            lambda: all(
                len(self.links(i)) == self.size - 1 and all(row.get("vip") for row in self.links(i).values())
                for i in self.peer_ids
            ),
            timeout,
            "a full mesh of sessions",
        )

    def open(self) -> None:
        """:meth:`start` with its default timeout (what ``with`` calls)."""
        self.start()

    def close(self) -> None:
        """Stop the nodes and delete the namespaces."""
        if self.network is not None:
            self.network.close()
        self.lab.close()

    # ----- reading the nodes --------------------------------------------------------------------

    def node(self, index: int) -> LabNode:
        """The lab node ``index`` (1-based)."""
        assert self.network is not None
        return self.network.nodes[index]

    def vpn_bucket(self, index: int) -> dict[str, Any]:
        """The ``vpn`` bucket as node ``index`` sees it."""
        try:
            return self.node(index).client.request("GET", "/api/ledger/vpn")
        except Exception:
            return {}

    def vip(self, index: int) -> str:
        """The VIP node ``index`` claims."""
        return self.vpn_bucket(index)[self.peer_ids[index]]["vip"]

    def links(self, index: int) -> dict[str, Any]:
        """Node ``index``'s published path to each peer (``{peer_id: {path, vip, endpoint}}``)."""
        return self.vpn_bucket(index).get(f"{self.peer_ids[index]}/links") or {}

    def path(self, index: int, to: int) -> str | None:
        """How node ``index`` sends to node ``to`` now: ``direct``, ``punched``, ``relay via <peer>``
        or ``stream`` (None: no session)."""
        return (self.links(index).get(self.peer_ids[to]) or {}).get("path")

    def counters(self, index: int) -> dict[str, int]:
        """Node ``index``'s ``vpn_*`` counters."""
        status = self.node(index).status() or {"counters": {}}
        return {k: v for k, v in status["counters"].items() if k.startswith("vpn_")}

    def vpn_status(self, index: int) -> dict[str, Any]:
        """What ``kairos vpn status --json`` prints on node ``index``."""
        return json.loads(self.vpn_status_text(index, "--json"))

    def vpn_status_text(self, index: int, *options: str) -> str:
        """What ``kairos vpn status`` prints on node ``index`` (for people, unless ``--json``)."""
        socket = str(self.node(index).root / "api.sock")
        result = subprocess.run(
            [sys.executable, "-m", "kairos_core", "vpn", "status", *options, "--socket", socket],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode:
            raise RuntimeError(f"kairos vpn status failed: {result.stderr}")
        return result.stdout

    def wait(self, condition, timeout: float, what: str) -> None:
        """Wait until ``condition()``; on timeout raise with the nodes' recent logs."""
        assert self.network is not None
        self.network.wait_until(condition, timeout, what, tolerate=(KeyError, TypeError), interval=0.2)

    # ----- acting in the namespaces -------------------------------------------------------------

    def run(self, index: int, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run a command in node ``index``'s namespace."""
        return self.lab.run(index, list(argv), timeout=timeout, text=True)

    def popen(self, index: int, *argv: str, **kwargs: Any) -> subprocess.Popen:
        """Start a command in node ``index``'s namespace (killed when the lab closes)."""
        return self.lab.popen(index, list(argv), **kwargs)

    def explain(self, *indexes: int) -> str:
        """What nodes ``indexes`` report (VPN status, recent log): for a failing assertion."""
        parts = []
        for index in indexes:
            try:
                status = json.dumps(self.vpn_status(index), indent=1)
            except Exception as error:  # the explanation must not hide the failure
                status = f"(no status: {error})"
            parts.append(f"--- node {index} vpn status\n{status}\n--- node {index} log\n{self.node(index).log[-3000:]}")
        return "\n".join(parts)

    def ping(self, index: int, vip: str, count: int = 1) -> bool:
        """True if ``count`` pings from node ``index`` to ``vip`` were all answered."""
        result = self.run(index, "ping", "-c", str(count), "-i", "0.2", "-W", "2", vip, timeout=count * 3 + 10)
        return result.returncode == 0 and " 0% packet loss" in result.stdout  # ping exits 0 on any answer

    def block_udp(self, index: int) -> None:
        """Drop every UDP datagram in and out of node ``index``'s underlay, except mDNS."""
        script = (
            f"add table inet {BLOCK_TABLE}\n"
            f"add chain inet {BLOCK_TABLE} input {{ type filter hook input priority 0; policy accept; }}\n"
            f"add chain inet {BLOCK_TABLE} output {{ type filter hook output priority 0; policy accept; }}\n"
            f'add rule inet {BLOCK_TABLE} input iifname "eth0" udp dport != 5353 drop\n'
            f'add rule inet {BLOCK_TABLE} output oifname "eth0" udp dport != 5353 drop\n'
        )
        subprocess.run(self.lab.command(index, ["nft", "-f", "-"]), input=script, text=True, check=True, capture_output=True)

    def unblock_udp(self, index: int) -> None:
        """Undo :meth:`block_udp`."""
        subprocess.run(self.lab.command(index, ["nft", "delete", "table", "inet", BLOCK_TABLE]), capture_output=True)


class NatVPNLab(VPNLab):
    """Node 1 public, the others each behind its own NAT router of ``kinds`` (a
    :class:`kairos_testing.netlab.NatLab`), bootstrapping from node 1 only, mDNS and the DHT off."""

    def __init__(self, root: Path, kinds: list[str], vpn: dict[str, Any] | None = None, prefix: str = "kv") -> None:
        from .netlab import PUBLIC, NatLab

        super().__init__(root, nodes=1 + len(kinds), vpn=vpn, prefix=prefix)
        self.lab = NatLab([PUBLIC, *kinds], unique_prefix(prefix))

    def start(self, timeout: float = 120.0) -> None:
        """Start node 1, then the others with node 1 as their only bootstrap peer; wait for every
        pair to have a VPN session."""
        self.lab.start()
        self.network = LabNetwork(self.lab, self.root, autoload_plugins=True)
        extra = {"vpn": self.vpn_options, "plugins": {"disabled": other_plugins()}}
        quiet = {"disable_mdns": True, "disable_dht": True}
        self.peer_ids[1] = self.network.wait_up(self.network.start(1, p2p=quiet, extra=extra))
        bootstrap = [self.network.multiaddr(1, self.peer_ids[1])]
        #: ``time.monotonic()`` when the NATed nodes were started (bench/nat.py times paths from it)
        self.nated_started_at = time.monotonic()
        nodes = [self.network.start(i, p2p={**quiet, "bootstrap_peers": bootstrap}, extra=extra) for i in range(2, self.size + 1)]
        self.peer_ids.update({node.index: self.network.wait_up(node) for node in nodes})
        #: ``time.monotonic()`` when every NATed node's API answered (bench/nat.py: time to path)
        self.nated_up_at = time.monotonic()
        self.wait(
            lambda: all(
                len(self.links(i)) == self.size - 1 and all(row.get("vip") for row in self.links(i).values())
                for i in self.peer_ids
            ),
            timeout,
            "VPN sessions",
        )

    def transport(self, index: int, peer_id: str) -> str | None:
        """How node ``index``'s libp2p connection to ``peer_id`` runs (``direct``, ``relayed``,
        ``punched``), or None when they are not connected."""
        rows = {row["peer_id"]: row for row in self.node(index).client.request("GET", "/api/peers")}
        return rows.get(peer_id, {}).get("transport")

    def relayed_peers(self, index: int) -> list[str]:
        """Peers node ``index`` is connected to through a relay."""
        return ((self.node(index).status() or {}).get("reachability") or {}).get("relayed_peers", [])
