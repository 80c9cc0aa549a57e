"""The kairos hooks of the kubevip plugin; the entry point ``kubevip`` is :data:`plugin`.

It implements the k3s plugin's hooks (optional: without k3s it loads and does nothing): the EIP
becomes a TLS SAN of every master, the address joining nodes dial, and ``ip-master``; masters get
the kube-vip manifest before k3s starts.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from kairos_core.plugin import Option, Section, hookimpl
from kairos_plugin_k3s.runners import write_if_changed

from .manifest import KubeVipSpec, daemonset, rbac, render, static_pod

if TYPE_CHECKING:
    from kairos_core.plugin import NodeView

log = logging.getLogger(__name__)

SECTION = "kubevip"
MANIFEST_NAME = "kubevip.yaml"
MARK = "# Written by the kairos kubevip plugin."
FETCH_TIMEOUT = 10.0
MAX_FETCH_BYTES = 1024 * 1024

#: The ``kubevip`` section: top-level ``kubevip:`` as provider-kairos reads it (or ``p2p.kubevip``).
#: Every key of Kairos's ``kubevip`` block is declared with its Kairos meaning.
SCHEMA = Section(
    SECTION,
    Option(
        "enable",
        bool,
        True,
        "Use kube-vip when an EIP is set; false turns it off even with an EIP (Kairos: on when eip is set "
        "and enable is not false).",
        aliases=("enabled",),  # the spelling newer Kairos releases use, `enable` staying valid
    ),
    Option(
        "eip", str, "", "The virtual address of the Kubernetes API (an address of the LAN, not of the VPN); empty = no kube-vip."
    ),
    Option("interface", str, "", "The interface kube-vip announces the EIP on; empty = the interface of the default route."),
    Option(
        "static_pod",
        bool,
        False,
        "Run kube-vip as a static pod (the kubelet's pod-manifests dir) instead of a DaemonSet, as Kairos does.",
    ),
    Option("version", str, "v0.8.7", "The kube-vip image's tag."),
    Option("image", str, "ghcr.io/kube-vip/kube-vip", "The kube-vip image."),
    Option(
        "manifest_url",
        str,
        "",
        "A URL (https://, http:// or file://) of an RBAC manifest to use instead of the built-in one "
        "(Kairos: the same; empty = the built-in one).",
    ),
    Option(
        "args",
        list,
        [],
        "Kairos passed these flags to `kube-vip manifest`, which older releases ran to write the manifest.",
        item_type=str,
        no_effect="this plugin writes kube-vip's manifest itself (no `kube-vip manifest` command runs): use "
        "kubevip.interface, static_pod, version and image",
    ),
    help="kube-vip: a virtual IP for the Kubernetes API on the masters.",
    aliases=(f"p2p.{SECTION}",),
)
CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {SECTION: SCHEMA.defaults()}

_SERVER_ROLES = ("master", "master/clusterinit", "master/ha")


def default_route_interface(route_table: Path = Path("/proc/net/route")) -> str:
    """The interface of the IPv4 default route, or ``eth0`` when there is none."""
    try:
        for line in route_table.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 2 and fields[1] == "00000000":
                return fields[0]
    except OSError:
        pass
    return "eth0"


class KubeVipPlugin:
    """kube-vip for the masters of the k3s cluster."""

    def __init__(self) -> None:
        self._fetched: dict[str, str] = {}

    @staticmethod
    def eip(node: NodeView) -> str | None:
        """The EIP when kube-vip is on, else None."""
        settings = SCHEMA.read(node.config[SECTION])
        eip = settings.eip.strip()
        return eip if settings.enable and eip else None

    def spec(self, node: NodeView) -> KubeVipSpec | None:
        """The manifest's settings for ``node``, or None when kube-vip is off."""
        eip = self.eip(node)
        if eip is None:
            return None
        settings = SCHEMA.read(node.config[SECTION])
        return KubeVipSpec(
            eip=eip.split("/")[0],
            interface=settings.interface or default_route_interface(),
            image=settings.image,
            version=settings.version,
        )

    @hookimpl
    def kairos_config_schema(self) -> list[Section]:
        """Section ``kubevip``."""
        return [SCHEMA]

    @hookimpl
    def kairos_config_problems(self, config: Mapping[str, Mapping[str, Any]]) -> list[str]:
        """What the schema cannot say: an EIP that is not an IP address, a manifest URL of a scheme
        the plugin cannot fetch."""
        section = config[SECTION]
        problems = []
        eip = section["eip"]
        if eip:
            try:
                ipaddress.ip_interface(eip)
            except ValueError:
                problems.append(f"kubevip.eip: {eip!r} is not an IP address")
        url = section["manifest_url"]
        if url and not url.startswith(("https://", "http://", "file://")):
            problems.append(f"kubevip.manifest_url: only https://, http:// and file:// URLs are supported, not {url!r}")
        return problems

    @hookimpl(optionalhook=True)
    def k3s_tls_sans(self, node: NodeView) -> list[str]:
        """The EIP, so the API certificate is valid there."""
        eip = self.eip(node)
        return [eip.split("/")[0]] if eip else []

    @hookimpl(optionalhook=True)
    def k3s_server_address(self, node: NodeView) -> str | None:
        """Joining masters and agents dial the EIP."""
        eip = self.eip(node)
        return eip.split("/")[0] if eip else None

    @hookimpl(optionalhook=True)
    async def k3s_before_start(self, node: NodeView, role: str, paths: Any) -> None:
        """Write the manifest on masters (and remove a stale one when kube-vip was turned off)."""
        daemon_file = paths.manifests_dir / MANIFEST_NAME
        pod_file = paths.pod_manifests_dir / MANIFEST_NAME
        spec = self.spec(node) if role in _SERVER_ROLES else None
        if spec is None:
            _remove_ours(daemon_file, pod_file)
            return
        settings = SCHEMA.read(node.config[SECTION])
        if settings.static_pod:
            # A static pod belongs in the kubelet's pod-manifests dir: a Pod in server/manifests
            # would be an ordinary API object, created only once the API is already up.
            text = render([static_pod(spec, str(paths.kubeconfig))])
            target, other = pod_file, daemon_file
        else:
            extra = await self._rbac_override(settings.manifest_url)
            documents = ([] if extra else rbac()) + [daemonset(spec)]
            text = render(documents, extra)
            target, other = daemon_file, pod_file
        if write_if_changed(target, text, 0o600):
            log.info("kube-vip manifest for %s written to %s", spec.eip, target)
        _remove_ours(other)

    async def _rbac_override(self, url: str) -> str:
        if not url:
            return ""
        if url not in self._fetched:
            try:
                self._fetched[url] = await asyncio.to_thread(_fetch, url)
            except Exception as exc:  # an unreachable URL must not keep the master down
                log.error("kubevip.manifest_url %s: %s; using the built-in RBAC", url, exc)
                return ""
        return self._fetched[url]


def _fetch(url: str) -> str:
    if not url.startswith(("https://", "http://", "file://")):
        raise ValueError("only https://, http:// and file:// URLs are supported")
    with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as response:  # noqa: S310 -- scheme checked above
        data: bytes = response.read(MAX_FETCH_BYTES + 1)
    if len(data) > MAX_FETCH_BYTES:
        raise ValueError("the manifest is larger than 1 MiB")
    import yaml

    text = data.decode()
    list(yaml.safe_load_all(text))  # must be YAML
    return text


def _remove_ours(*files: Path) -> None:
    for path in files:
        try:
            if path.read_text().startswith(MARK):
                path.unlink()
        except (FileNotFoundError, UnicodeDecodeError):
            pass


plugin = KubeVipPlugin()
