"""Real ``kairos run`` processes inside a :class:`~kairos_testing.netlab.Lab`, for tests and benchmarks.

Each node gets a config file and a state dir under ``root``, listens on its namespace's address,
and is observed through its local API socket (unix sockets live on the file system, so the test
process reaches them from outside the namespace).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from kairos_core.api import APIClient
from kairos_core.errors import KairosError
from .netlab import Lab
from kairos_core.token import NetworkToken, generate_token

P2P_PORT = 4001


_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime + stime


class LabNode:
    """One ``kairos run`` process in one namespace."""

    def __init__(self, index: int, root: Path, process: subprocess.Popen, config_path: Path) -> None:
        self.index = index
        self.root = root
        self.process = process
        self.config_path = config_path
        self.client = APIClient(root / "api.sock", timeout=5.0)

    @property
    def log(self) -> str:
        """What the node printed so far."""
        path = self.root / "node.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def status(self) -> dict[str, Any] | None:
        """The node's status, or None while its API is not up."""
        try:
            return self.client.request("GET", "/api/status")
        except KairosError:
            return None

    def alive_peers(self) -> set[str]:
        """Peer ids this node counts as alive (empty while its API is not up)."""
        try:
            return {row["peer_id"] for row in self.client.request("GET", "/api/peers") if row["alive"]}
        except KairosError:
            return set()

    @property
    def peer_id(self) -> str | None:
        """Its peer id, once its API answers."""
        status = self.status()
        return status["peer_id"] if status else None


class LabNetwork:
    """Start, observe and kill node processes in a lab."""

    def __init__(self, lab: Lab, root: Path, token: NetworkToken | None = None, *, autoload_plugins: bool = False) -> None:
        self.lab = lab
        self.root = Path(root)
        self.token = token or generate_token()
        #: let nodes load installed plugins (block the unwanted ones with ``plugins.disabled``)
        self.autoload_plugins = autoload_plugins
        self.nodes: dict[int, LabNode] = {}

    def multiaddr(self, index: int, peer_id: str) -> str:
        """The address other nodes dial node ``index`` at."""
        return f"/ip4/{self.lab.address(index)}/tcp/{P2P_PORT}/p2p/{peer_id}"

    def start(
        self,
        index: int,
        *,
        token: NetworkToken | None = None,
        p2p: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> LabNode:
        """Start ``kairos run`` as node ``index`` of the lab."""
        root = self.root / f"node{index}"
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "p2p": {
                "network_token": (token or self.token).encode(),
                "listen": [f"/ip4/{self.lab.address(index)}/tcp/{P2P_PORT}"],
                **(p2p or {}),
            },
            "node": {
                "state_dir": str(root),
                "hostname": f"lab{index}",
                "log_level": os.environ.get("KAIROS_LAB_LOG_LEVEL", "info"),
            },
            **(extra or {}),
        }
        config_path = root / "kairos.yaml"
        config_path.write_text(yaml.safe_dump(config))
        log = open(root / "node.log", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.autoload_plugins:
            env.pop("KAIROS_DISABLE_PLUGIN_AUTOLOAD", None)
        else:
            env["KAIROS_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        process = self.lab.popen(
            index,
            [sys.executable, "-m", "kairos_core", "-v", "run", "-c", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        node = self.nodes[index] = LabNode(index, root, process, config_path)
        return node

    def wait_up(self, node: LabNode, timeout: float = 30.0) -> str:
        """Wait until the node's API answers; returns its peer id."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise RuntimeError(f"node {node.index} exited with {node.process.returncode}:\n{node.log[-3000:]}")
            peer_id = node.peer_id
            if peer_id:
                return peer_id
            time.sleep(0.05)
        raise TimeoutError(f"node {node.index} did not come up:\n{node.log[-3000:]}")

    def wait_until(
        self, condition, timeout: float, what: str, *, tolerate: tuple[type[BaseException], ...] = (), interval: float = 0.1
    ) -> None:
        """Poll ``condition()`` until true; ``TimeoutError`` with every node's recent log otherwise.

        ``tolerate``: exceptions that mean "not yet" (e.g. a ``KeyError`` while a node's status
        lacks a field it will have once it is up).
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                if condition():
                    return
            except tolerate:
                pass
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- node {node.index}\n{node.log[-2500:]}" for node in self.nodes.values())
                raise TimeoutError(f"{what} not reached within {timeout} s\n{logs}")
            time.sleep(interval)

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a node's process."""
        self.nodes[index].process.send_signal(sig)

    def close(self) -> None:
        """Stop every node that still runs (the lab kills anything left anyway)."""
        for node in self.nodes.values():
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes.values():
            try:
                node.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()
