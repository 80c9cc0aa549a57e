"""kairos-plugin-kubevip: one highly available API address (EIP) for a k3s cluster, through kube-vip."""

from .plugin import KubeVipPlugin, plugin

__version__ = "0.1.0"

__all__ = ["KubeVipPlugin", "plugin", "__version__"]
