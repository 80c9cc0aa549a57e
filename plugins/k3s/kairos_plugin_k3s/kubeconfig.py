"""The admin kubeconfig, rewritten so it works from any node of the network.

A k3s server writes ``server: https://127.0.0.1:6443``; from another machine the API is at the
master's VPN address or the EIP.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import yaml

from .launch import server_url


class KubeconfigError(ValueError):
    """The text is not a kubeconfig."""


def check_kubeconfig(text: str) -> dict[str, Any]:
    """The parsed kubeconfig; :class:`KubeconfigError` unless it is YAML with well-formed clusters."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KubeconfigError(f"the kubeconfig is not YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("clusters"), list):
        raise KubeconfigError("the kubeconfig has no clusters")
    for item in data["clusters"]:
        if not isinstance(item.get("cluster") if isinstance(item, dict) else None, dict):
            raise KubeconfigError("a cluster entry of the kubeconfig is malformed")
    return data


def rewrite_kubeconfig(text: str, address: str, port: int | None = None) -> str:
    """``text`` with every cluster's server pointed at ``address``.

    :param address: IP address or host name of the API server.
    :param port: the API port; default: keep each cluster's own port (6443 when it has none).
    """
    data = check_kubeconfig(text)
    for item in data["clusters"]:
        cluster = item["cluster"]
        try:
            old_port = urlsplit(str(cluster.get("server") or "")).port
            cluster["server"] = server_url(address, port or old_port or 6443)
        except ValueError as exc:  # a bad --address, or a server URL with a bad port
            raise KubeconfigError(str(exc)) from None
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
