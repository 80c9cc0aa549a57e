"""Two network namespaces joined by a veth, each able to run a static-key forwarder.

For tests and ``bench/vpn.py``: :class:`NamespacePair` builds ``<prefix>-a`` / ``<prefix>-b``
(underlay ``10.<n>.0.1/24`` ⇄ ``10.<n>.0.2/24``), :meth:`NamespacePair.start_forwarder` runs
``python -m kairos_plugin_tunvpn`` inside one of them (VPN ``10.<n+1>.0.1/24`` ⇄ ``.2``), and
:meth:`NamespacePair.close` kills what it started and deletes both namespaces — call it from a
``finally`` or a fixture so it also runs when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from .netlab import Closing, checked, delete_namespace, list_namespaces

SECRET_HEX = "6b6169726f732d74756e76706e2d746573742d7365637265742d3332627974"
PORT = 5555


def netns_missing() -> str | None:
    """Why namespaces cannot be used here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


class NamespacePair(Closing):
    """Namespaces ``a`` and ``b`` joined by a veth; each side may run one forwarder."""

    def __init__(self, prefix: str | None = None, octet: int | None = None) -> None:
        pid = os.getpid()
        self.prefix = prefix or f"tv{pid % 100000}"
        self.octet = octet if octet is not None else 100 + pid % 50 * 2
        self.ns = {"a": f"{self.prefix}-a", "b": f"{self.prefix}-b"}
        self.underlay = {"a": f"10.{self.octet}.0.1", "b": f"10.{self.octet}.0.2"}
        self.vip = {"a": f"10.{self.octet + 1}.0.1", "b": f"10.{self.octet + 1}.0.2"}
        self.processes: list[subprocess.Popen] = []
        self.forwarders: dict[str, subprocess.Popen] = {}

    def open(self) -> None:
        """Create both namespaces and the veth between them."""
        for side in "ab":
            self.ip("netns", "add", self.ns[side])
            self.ip("-n", self.ns[side], "link", "set", "lo", "up")
        self.ip("link", "add", "veth-a", "netns", self.ns["a"], "type", "veth", "peer", "name", "veth-b", "netns", self.ns["b"])
        for side in "ab":
            self.ip("-n", self.ns[side], "addr", "add", f"{self.underlay[side]}/24", "dev", f"veth-{side}")
            self.ip("-n", self.ns[side], "link", "set", f"veth-{side}", "up")

    def close(self) -> None:
        """Stop every process started here and delete the namespaces (idempotent)."""
        for proc in self.processes:
            if proc.poll() is None:
                try:
                    if proc.stdin:
                        proc.stdin.close()
                    proc.wait(timeout=3)
                except Exception:
                    proc.kill()
                    proc.wait(timeout=3)
        self.processes.clear()
        self.forwarders.clear()
        for ns in self.ns.values():
            if ns in list_namespaces():
                delete_namespace(ns)

    @staticmethod
    def ip(*args: str) -> None:
        """Run ``ip`` with ``args``; :class:`~.netlab.LabError` (a RuntimeError) with its message on failure."""
        checked(["ip", *args])

    def run(self, side: str, *argv: str, timeout: float = 60.0, check: bool = False) -> subprocess.CompletedProcess:
        """Run a command inside namespace ``side`` and wait for it."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns[side], *argv], capture_output=True, text=True, timeout=timeout, check=check
        )

    def popen(self, side: str, *argv: str, **kwargs: Any) -> subprocess.Popen:
        """Start a command inside namespace ``side``; it is stopped by :meth:`close`."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[side], *argv], **kwargs)
        self.processes.append(proc)
        return proc

    def forwarder_config(self, side: str, **options: Any) -> dict[str, Any]:
        """The JSON config of the forwarder of ``side`` talking to the other side."""
        other = "b" if side == "a" else "a"
        config = {
            "name": "kvpn0",
            "address": f"{self.vip[side]}/24",
            "mtu": 1420,
            "bind": [self.underlay[side], PORT],
            "secret": SECRET_HEX,
            "local_id": side,
            "peers": [{"id": other, "vip": self.vip[other], "endpoint": [self.underlay[other], PORT]}],
        }
        config.update(options)
        return config

    def start_forwarder(self, side: str, **options: Any) -> dict[str, Any]:
        """Run the forwarder of ``side`` and wait until it forwards; returns its ready line."""
        proc = self.popen(
            side,
            sys.executable,
            "-m",
            "kairos_plugin_tunvpn",
            json.dumps(self.forwarder_config(side, **options)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = proc.stdout.readline()
        ready = json.loads(line) if line else {"ready": False, "error": "forwarder exited"}
        if not ready.get("ready"):
            raise RuntimeError(f"forwarder {side} did not start: {ready}")
        self.forwarders[side] = proc
        return ready

    def counters(self, side: str) -> dict[str, int]:
        """The counters of the forwarder of ``side``."""
        proc = self.forwarders[side]
        proc.stdin.write("counters\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    def wait_ping(self, side: str, target: str, seconds: float = 10.0) -> bool:
        """Ping ``target`` from ``side`` until it answers or ``seconds`` pass."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.run(side, "ping", "-c", "1", "-W", "1", target).returncode == 0:
                return True
        return False
