"""Test helpers for the k3s plugin and plugins that extend it (the ``k3s_kit`` fixture).

- :func:`install_fake_k3s` / :func:`install_fake_systemctl`: executables standing in for k3s and
  systemctl (see ``fakes/``), so a whole cluster can assemble in one process without root.
- :class:`FakeVPN`: a minimal VPN plugin that owns the ``vpn`` section and bucket (owner-keyed)
  and publishes a virtual IP per node in the ledger, as tunvpn does.
- The ``k3s_kit`` fixture bundles them: ``k3s_kit.overrides("n1")`` is the config of one node
  (its own root, the fake binary, the process runner, fast reconciliation).
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from kairos_core.plugin import OWNER_KEYED, hookimpl

FAKES = Path(__file__).parent / "fakes"


def _wrapper(target: Path, script: Path, env: dict[str, str] | None = None) -> Path:
    lines = [f"#!{sys.executable}", "import os, runpy"]
    for name, value in (env or {}).items():
        lines.append(f"os.environ[{name!r}] = {value!r}")
    lines.append(f"runpy.run_path({str(script)!r}, run_name='__main__')")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("\n".join(lines) + "\n")
    target.chmod(0o755)
    return target


def install_fake_k3s(bin_dir: Path) -> Path:
    """Put an executable ``k3s`` (the fake) in ``bin_dir``; returns its path."""
    return _wrapper(Path(bin_dir) / "k3s", FAKES / "k3s.py")


def install_fake_systemctl(bin_dir: Path, unit_dir: Path, log: Path) -> Path:
    """Put an executable ``systemctl`` in ``bin_dir`` that logs to ``log`` and runs units of ``unit_dir``."""
    return _wrapper(
        Path(bin_dir) / "systemctl",
        FAKES / "systemctl.py",
        {"FAKE_SYSTEMCTL_LOG": str(log), "FAKE_SYSTEMCTL_UNIT_DIR": str(unit_dir)},
    )


def read_k3s_calls(root: Path) -> list[dict[str, Any]]:
    """What the fake k3s recorded under ``root``: one dict per start."""
    path = Path(root) / "etc/rancher/k3s/fake-k3s-calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_systemctl_calls(log: Path) -> list[list[str]]:
    """The argument lists the fake systemctl was called with."""
    if not Path(log).exists():
        return []
    return [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, dead and not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # the state follows the parenthesised command name, which may itself hold spaces or ")"
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


class FakeVPN:
    """Declares the ``vpn`` section and publishes ``vpn/<peer_id> = {"vip": ...}`` at startup."""

    _numbers = itertools.count(1)

    def __init__(self, interface: str = "edgevpn0", vip: str | None = None) -> None:
        self.interface = interface
        self.vip = vip

    @hookimpl
    def kairos_config_defaults(self):
        """The ``vpn`` section as tunvpn names it."""
        return {"vpn": {"enable": True, "interface": self.interface}}

    @hookimpl
    def kairos_ledger_policies(self):
        """The ``vpn`` bucket is owner-keyed, as tunvpn registers it."""
        return {"vpn": OWNER_KEYED}

    @hookimpl
    def kairos_startup(self, node):
        """Publish this node's virtual IP."""
        vip = self.vip or f"10.1.0.{next(self._numbers) % 254 + 1}/24"
        node.ledger.set("vpn", node.peer_id, {"vip": vip})


class K3sKit:
    """Fake executables in a temp dir, and node configs that use them."""

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.bin_dir = self.base / "bin"
        self.k3s = install_fake_k3s(self.bin_dir)

    def root(self, name: str) -> Path:
        """The file-system root of node ``name``."""
        return self.base / "roots" / name

    def overrides(self, name: str, *, k3s: dict[str, Any] | None = None, **sections: dict[str, Any]) -> dict[str, Any]:
        """Config overrides for one node that runs the fake k3s as a child process under its own root."""
        result: dict[str, Any] = {
            "k3s": {
                "root": str(self.root(name)),
                "binary": str(self.k3s),
                "runner": "process",
                "reconcile_interval": 0.2,
                **(k3s or {}),
            },
        }
        result.update(sections)
        return result

    def calls(self, name: str) -> list[dict[str, Any]]:
        """The fake k3s's recorded starts on node ``name``."""
        return read_k3s_calls(self.root(name))

    def running(self) -> list[int]:
        """The pids of every fake k3s started under this kit that still runs (should be none once
        the nodes stopped)."""
        roots = self.base / "roots"
        names = [path.name for path in roots.iterdir()] if roots.is_dir() else []
        return [call["pid"] for name in names for call in self.calls(name) if process_alive(call["pid"])]


@pytest.fixture
def k3s_kit(tmp_path) -> K3sKit:
    """Fake k3s in a temp dir and per-node config overrides (see :class:`K3sKit`)."""
    return K3sKit(tmp_path / "k3s-kit")
