"""Real ``kairos run`` processes on loopback with this plugin loaded, for its tests and benchmark.

No root and no namespaces: each node listens on its own 127.0.0.1 port, the first is every other
node's bootstrap peer, and the other plugins are disabled (so no TUN device and no k3s).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from kairos_core.plugin import APIClient, KairosError

OTHER_PLUGINS = ["tunvpn", "k3s", "kubevip"]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free on 127.0.0.1 now (for TCP, or UDP with ``socket.SOCK_DGRAM``)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalNode:
    def __init__(self, index: int, root: Path, process: subprocess.Popen[bytes], port: int) -> None:
        self.index = index
        self.root = root
        self.process = process
        self.socket = root / "api.sock"
        self.client = APIClient(self.socket, timeout=10.0)
        self.peer_id: str | None = None
        self.port = port

    @property
    def log(self) -> str:
        path = self.root / "node.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.client.request(method, path, **kwargs)

    def counters(self) -> dict[str, int]:
        counters: dict[str, int] = self.api("GET", "/api/status")["counters"]
        return counters

    def alive_peers(self) -> set[str]:
        try:
            return {row["peer_id"] for row in self.api("GET", "/api/peers") if row["alive"]}
        except KairosError:
            return set()


def spawn_kairos(root: Path, config: dict[str, Any], *options: str) -> subprocess.Popen[bytes]:
    """``kairos [options] run`` of ``config`` (written to ``root/kairos.yaml``), in a session of its
    own, its output in ``root/node.log``, plugins loaded from their entry points."""
    config_path = root / "kairos.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "KAIROS_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONUNBUFFERED"] = "1"
    with open(root / "node.log", "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "kairos_core", *options, "run", "-c", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def stop_process(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Send ``sig`` (if it still runs) and wait; killed when it has not ended after ``timeout`` s."""
    if process.poll() is None:
        process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class LocalNodes:
    """Start ``kairos run`` processes on loopback; ``close()`` stops them all."""

    def __init__(self, root: Path, token: str) -> None:
        self.root = Path(root)
        self.token = token
        self.nodes: list[LocalNode] = []

    def start(self, services: dict[str, Any] | None = None) -> LocalNode:
        index = len(self.nodes)
        root = self.root / f"node{index}"
        root.mkdir(parents=True, exist_ok=True)
        bootstrap = []
        if self.nodes:
            first = self.nodes[0]
            bootstrap = [f"/ip4/127.0.0.1/tcp/{first.port}/p2p/{first.peer_id}"]
        port = free_port()
        config = {
            "p2p": {
                "network_token": self.token,
                "listen": [f"/ip4/127.0.0.1/tcp/{port}"],
                "disable_mdns": True,
                "disable_dht": True,
                "bootstrap_peers": bootstrap,
            },
            "node": {"state_dir": str(root), "hostname": f"svc{index}", "log_level": "info"},
            "plugins": {"disabled": OTHER_PLUGINS},
            "services": services or {},
        }
        node = LocalNode(index, root, spawn_kairos(root, config, "-v"), port)
        self.nodes.append(node)
        node.peer_id = self._wait_up(node)
        return node

    def _wait_up(self, node: LocalNode, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise RuntimeError(f"node {node.index} exited with {node.process.returncode}:\n{node.log[-3000:]}")
            try:
                peer_id: str = node.api("GET", "/api/status")["peer_id"]
                return peer_id
            except KairosError:
                time.sleep(0.1)
        raise TimeoutError(f"node {node.index} did not come up:\n{node.log[-3000:]}")

    def wait_until(self, condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- node {n.index}\n{n.log[-2500:]}" for n in self.nodes)
                raise TimeoutError(f"{what} not reached within {timeout} s\n{logs}")
            time.sleep(0.1)

    def wait_mesh(self, timeout: float = 60.0) -> None:
        """Until every running node counts every other running node alive."""
        running = [n for n in self.nodes if n.process.poll() is None]
        self.wait_until(
            lambda: all(n.alive_peers() >= {m.peer_id for m in running if m is not n} for n in running), timeout, "a full mesh"
        )

    def stop(self, node: LocalNode, sig: int = signal.SIGTERM) -> None:
        if node.process.poll() is None:
            stop_process(node.process, sig)

    def close(self) -> None:
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes:
            stop_process(node.process)
