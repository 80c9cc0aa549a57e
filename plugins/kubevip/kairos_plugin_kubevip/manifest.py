"""The kube-vip manifests: a DaemonSet with its RBAC, or a static pod.

kube-vip runs on the masters in control-plane mode with ARP: the elected instance (a Kubernetes
lease, 5 s long, renewed every 3 s, retried every second) holds the EIP as a /32 on the given
interface and answers ARP for it, so the API on port 6443 stays at one address when a master dies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

NAMESPACE = "kube-system"
SERVICE_ACCOUNT = "kube-vip"
LEASE_NAME = "plndr-cp-lock"
API_PORT = 6443
# kube-vip's leader election: short, so the EIP moves within seconds of a master failing.
LEASE_SECONDS = 5
RENEW_DEADLINE_SECONDS = 3
RETRY_PERIOD_SECONDS = 1


@dataclass(frozen=True)
class KubeVipSpec:
    """What the manifest says."""

    eip: str
    interface: str
    image: str = "ghcr.io/kube-vip/kube-vip"
    version: str = "v0.8.7"
    port: int = API_PORT

    @property
    def image_ref(self) -> str:
        """``image:version`` (an image that already names a tag or digest is kept)."""
        last = self.image.rsplit("/", 1)[-1]
        return self.image if (":" in last or "@" in self.image) else f"{self.image}:{self.version}"


def container_env(spec: KubeVipSpec) -> list[dict[str, Any]]:
    """kube-vip's settings, as its container environment."""
    settings = {
        "vip_arp": "true",
        "port": str(spec.port),
        "vip_interface": spec.interface,
        "vip_cidr": "32",
        "cp_enable": "true",
        "cp_namespace": NAMESPACE,
        "svc_enable": "false",
        "vip_leaderelection": "true",
        "vip_leasename": LEASE_NAME,
        "vip_leaseduration": str(LEASE_SECONDS),
        "vip_renewdeadline": str(RENEW_DEADLINE_SECONDS),
        "vip_retryperiod": str(RETRY_PERIOD_SECONDS),
        "address": spec.eip,
    }
    env: list[dict[str, Any]] = [{"name": name, "value": value} for name, value in settings.items()]
    # The node name lets kube-vip tell which master holds the lease.
    env.append({"name": "vip_nodename", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
    return env


def container(spec: KubeVipSpec) -> dict[str, Any]:
    """The kube-vip container."""
    return {
        "name": "kube-vip",
        "image": spec.image_ref,
        "imagePullPolicy": "IfNotPresent",
        "args": ["manager"],
        "env": container_env(spec),
        "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}},
    }


def rbac() -> list[dict[str, Any]]:
    """ServiceAccount, ClusterRole and ClusterRoleBinding kube-vip needs for its lease and nodes."""
    role_name = "system:kube-vip-role"
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": role_name, "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["services", "services/status", "nodes", "endpoints"],
                    "verbs": ["list", "get", "watch", "update"],
                },
                {
                    "apiGroups": ["coordination.k8s.io"],
                    "resources": ["leases"],
                    "verbs": ["list", "get", "watch", "update", "create"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "system:kube-vip-binding"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
            "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}],
        },
    ]


def daemonset(spec: KubeVipSpec) -> dict[str, Any]:
    """kube-vip on every control-plane node."""
    labels = {"app.kubernetes.io/name": "kube-vip-ds"}
    control_plane = [
        {"matchExpressions": [{"key": "node-role.kubernetes.io/master", "operator": "Exists"}]},
        {"matchExpressions": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]},
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "kube-vip-ds", "namespace": NAMESPACE, "labels": labels},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "affinity": {
                        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": control_plane}}
                    },
                    "containers": [container(spec)],
                    "hostNetwork": True,
                    "serviceAccountName": SERVICE_ACCOUNT,
                    "tolerations": [
                        {"effect": "NoSchedule", "operator": "Exists"},
                        {"effect": "NoExecute", "operator": "Exists"},
                    ],
                },
            },
        },
    }


def static_pod(spec: KubeVipSpec, kubeconfig: str = "/etc/rancher/k3s/k3s.yaml") -> dict[str, Any]:
    """kube-vip as a static pod, reaching the API with the server's admin kubeconfig."""
    pod_container = container(spec)
    pod_container["volumeMounts"] = [{"name": "kubeconfig", "mountPath": "/etc/kubernetes/admin.conf", "readOnly": True}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kube-vip", "namespace": NAMESPACE},
        "spec": {
            "containers": [pod_container],
            "hostNetwork": True,
            "hostAliases": [{"ip": "127.0.0.1", "hostnames": ["kubernetes"]}],
            "volumes": [{"name": "kubeconfig", "hostPath": {"path": kubeconfig, "type": "FileOrCreate"}}],
        },
    }


def render(documents: list[dict[str, Any]], extra: str = "") -> str:
    """Documents as one multi-document YAML text (``extra``: YAML appended as-is, e.g. fetched RBAC)."""
    text = "# Written by the kairos kubevip plugin.\n" + yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False)
    if extra.strip():
        text += "---\n" + extra.strip() + "\n"
    return text
