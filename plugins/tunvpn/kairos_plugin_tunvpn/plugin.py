"""kairos hooks of the tunvpn plugin: the ``vpn`` config section and bucket policy, the VPN's lifecycle, ``kairos vpn``.

The hooks live on :class:`TunVPNPlugin`; this module exposes those of a default instance, which is
what the ``tunvpn`` entry point registers. Tests register their own instance, built with a fake
data plane, so that many nodes can share one process.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from kairos_core.plugin import OWNER_KEYED, LedgerUpdate, NodeView, PeerEvent, Section, WritePolicy, hookimpl

from .metrics import declare as declare_metrics
from .vpn import BUCKET, SECTION, VPN, VPNConfigError, VPNSettings

log = logging.getLogger("kairos.vpn")


class TunVPNPlugin:
    """The tunvpn hooks; ``vpn_options`` are passed to every :class:`VPN` it starts (tests)."""

    def __init__(self, **vpn_options: Any) -> None:
        self.vpn_options = vpn_options
        self.running: "weakref.WeakKeyDictionary[Any, VPN]" = weakref.WeakKeyDictionary()

    def vpn_of(self, node: NodeView) -> VPN | None:
        """The running VPN of ``node``, or None (not started, disabled, or no TUN available)."""
        return self.running.get(node)

    @hookimpl
    def kairos_config_schema(self) -> list[Section]:
        """Declare the ``vpn`` section (Kairos users may write it as ``p2p.vpn``)."""
        return [SECTION]

    @hookimpl
    def kairos_config_problems(self, config: Any) -> list[str]:
        """What the schema cannot say of the ``vpn`` section (a CIDR that does not parse, an address
        outside it…); types and ranges it checked already."""
        try:
            VPNSettings.from_config(config["vpn"])
        except VPNConfigError as exc:
            return [str(exc)]
        return []

    @hookimpl
    def kairos_ledger_policies(self) -> dict[str, WritePolicy]:
        """The ``vpn`` bucket is owner-keyed: a node claims a VIP (``<peer id>``) and publishes its
        links (``<peer id>/links``) under its own id only, so nobody claims in another's name."""
        return {BUCKET: OWNER_KEYED}

    @hookimpl
    async def kairos_startup(self, node: NodeView) -> None:
        """Claim a VIP, create the TUN device and start the data plane.

        Without /dev/net/tun or CAP_NET_ADMIN one error line is logged and the node runs on
        without the VPN. (A bad ``vpn`` section is refused with the config, by
        :meth:`kairos_config_problems`; the check here only guards configs built by hand.)
        """
        declare_metrics(node)  # HELP texts of the vpn_* counters on /metrics
        try:
            settings = VPNSettings.from_config(node.config["vpn"])
        except VPNConfigError as exc:
            log.error("vpn disabled: %s", exc)
            return
        if not settings.create:
            return
        vpn = VPN(node, settings, **self.vpn_options)
        if await vpn.start():
            self.running[node] = vpn

    @hookimpl
    async def kairos_shutdown(self, node: NodeView) -> None:
        """Stop the data plane and remove the device and its routes."""
        vpn = self.running.pop(node, None)
        if vpn is not None:
            await vpn.stop()

    @hookimpl
    def on_peer(self, node: NodeView, event: PeerEvent) -> None:
        """A peer joined, left or changed its addresses: revisit sessions and endpoints."""
        vpn = self.running.get(node)
        if vpn is not None:
            vpn.wake()

    @hookimpl
    def on_ledger_update(self, node: NodeView, update: LedgerUpdate) -> None:
        """A VIP claim (or a node entry) changed: revisit addresses."""
        vpn = self.running.get(node)
        if vpn is not None and update.bucket in (BUCKET, "nodes"):
            vpn.wake()

    @hookimpl
    def kairos_cli_commands(self, cli: Any) -> None:
        """Add ``kairos vpn status``."""
        from .commands import vpn_group

        cli.add_command(vpn_group)


default_plugin = TunVPNPlugin()
kairos_config_schema = default_plugin.kairos_config_schema
kairos_config_problems = default_plugin.kairos_config_problems
kairos_ledger_policies = default_plugin.kairos_ledger_policies
kairos_startup = default_plugin.kairos_startup
kairos_shutdown = default_plugin.kairos_shutdown
on_peer = default_plugin.on_peer
on_ledger_update = default_plugin.on_ledger_update
kairos_cli_commands = default_plugin.kairos_cli_commands
vpn_of = default_plugin.vpn_of
