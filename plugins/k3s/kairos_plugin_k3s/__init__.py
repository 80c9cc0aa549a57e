"""kairos-plugin-k3s: self-assembling k3s clusters over the kairos p2p network.

The leader assigns roles through the ledger (fenced by its epoch), every node runs k3s on the VPN
through a service runner, and other plugins extend it through the hooks in :mod:`.hookspecs`.
"""

from .plugin import K3sPlugin, plugin
from .roles import CLUSTER_INIT, MASTER, MASTER_HA, WORKER

__version__ = "0.1.0"

__all__ = ["CLUSTER_INIT", "MASTER", "MASTER_HA", "WORKER", "K3sPlugin", "plugin", "__version__"]
