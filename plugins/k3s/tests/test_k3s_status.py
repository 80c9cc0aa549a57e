"""What k3s waits for shows in ``kairos status`` (issue #16, item 9): a role, the VPN address."""

from __future__ import annotations

import asyncio
import json

from kairos_core.cli import main
from kairos_core.plugin import hookimpl
from kairos_plugin_k3s import K3sPlugin
from kairos_testing.k3s import FakeVPN


class VPNWithoutAddress(FakeVPN):
    """A VPN that declares its section but has no address for this node (yet)."""

    @hookimpl
    def kairos_startup(self, node):
        """Publish nothing."""


def status(capsys, node) -> tuple[str, dict]:
    """``kairos status`` of ``node``: the plain output and the JSON."""
    outputs = []
    for extra in ([], ["--json"]):
        capsys.readouterr()
        try:
            main(["status", "--socket", str(node.config.api_socket), *extra])
        except SystemExit as exc:
            assert exc.code in (0, None)
        outputs.append(capsys.readouterr().out)
    return outputs[0], json.loads(outputs[1])


async def test_status_says_k3s_waits_for_a_role_then_for_the_vpn_address(kairos_network, k3s_kit, capsys):
    net = await kairos_network(0)
    plugin = K3sPlugin()
    # Alone, with minimum_nodes 2, the leader assigns no role.
    node = await net.add_node(plugins=[plugin], name="lone", overrides=k3s_kit.overrides("lone", p2p={"minimum_nodes": 2}))
    await net.wait_for(lambda: plugin.member(node) and plugin.member(node).waiting_for == "a role")
    plain, data = await asyncio.to_thread(status, capsys, node)
    assert "k3s:         waiting for a role" in plain
    assert data["states"] == {"k3s": "waiting for a role"}

    # A fixed worker needs no role from the leader, but its VPN address never comes.
    worker = await net.add_node(
        plugins=[K3sPlugin(), VPNWithoutAddress()], name="worker", overrides=k3s_kit.overrides("worker", p2p={"role": "worker"})
    )
    await net.wait_for(lambda: worker.status()["states"].get("k3s") == "waiting for the VPN address")
    plain, _ = await asyncio.to_thread(status, capsys, worker)
    assert "k3s:         waiting for the VPN address" in plain
