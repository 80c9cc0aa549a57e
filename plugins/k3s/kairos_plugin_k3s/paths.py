"""Where k3s and its service manager keep their files, all under one root prefix (tests use a temp dir)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class K3sPaths:
    """The files the k3s plugin reads and writes. ``root`` is ``/`` on a real machine."""

    root: Path

    @classmethod
    def under(cls, root: str | Path) -> "K3sPaths":
        """Paths below ``root`` (empty string: the real file system)."""
        return cls(Path(root) if str(root) else Path("/"))

    def at(self, absolute: str) -> Path:
        """``absolute`` (a path like ``/etc/x``) below the root."""
        return self.root / absolute.lstrip("/")

    @property
    def relocated(self) -> bool:
        """Whether the root is not ``/``: k3s must then be told where its directories are."""
        return self.root != Path("/")

    @property
    def config_dir(self) -> Path:
        """``/etc/rancher/k3s``."""
        return self.at("/etc/rancher/k3s")

    @property
    def config_file(self) -> Path:
        """k3s's own config file, read by server and agent alike."""
        return self.config_dir / "config.yaml"

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig a server writes."""
        return self.config_dir / "k3s.yaml"

    @property
    def data_dir(self) -> Path:
        """k3s's data directory."""
        return self.at("/var/lib/rancher/k3s")

    @property
    def node_token(self) -> Path:
        """The token a server writes for nodes that join it."""
        return self.data_dir / "server" / "node-token"

    @property
    def manifests_dir(self) -> Path:
        """Manifests a server applies on its own (auto-deploy)."""
        return self.data_dir / "server" / "manifests"

    @property
    def pod_manifests_dir(self) -> Path:
        """Static pods the kubelet of this node runs without the API."""
        return self.data_dir / "agent" / "pod-manifests"

    @property
    def systemd_dir(self) -> Path:
        """Unit files."""
        return self.at("/etc/systemd/system")

    @property
    def openrc_dir(self) -> Path:
        """Init scripts."""
        return self.at("/etc/init.d")

    @property
    def log_dir(self) -> Path:
        """Where a directly supervised k3s logs."""
        return self.at("/var/log")
