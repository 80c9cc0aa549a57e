"""A node that stops stops the k3s it started as a child (k3s.runner: process), also when the
node's shutdown runs out of time: no k3s outlives its node."""

from __future__ import annotations

import os
import signal

from kairos_plugin_k3s import K3sPlugin
from kairos_testing.k3s import process_alive

MASTER = {"p2p": {"role": "master", "minimum_nodes": 1}, "auto": {"enable": False}}


def started_pids(kit, name):
    return [call["pid"] for call in kit.calls(name)]


async def run_and_stop(net, kit, name, **k3s):
    plugin = K3sPlugin()
    node = await net.add_node(plugins=[plugin], name=name, overrides=kit.overrides(name, k3s=k3s, **MASTER))
    await net.wait_for(lambda: plugin.member(node) and plugin.member(node).launch and kit.calls(name), timeout=30)
    pids = started_pids(kit, name)
    assert pids and all(process_alive(pid) for pid in pids[-1:])
    try:
        await node.stop()
        return [pid for pid in started_pids(kit, name) if process_alive(pid)]
    finally:
        for pid in started_pids(kit, name):  # a failing run leaves nothing behind either
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_a_stopped_node_leaves_no_k3s_running(kairos_network, k3s_kit):
    net = await kairos_network(0)
    assert await run_and_stop(net, k3s_kit, "plain") == []


async def test_k3s_is_killed_when_the_shutdown_hook_times_out(kairos_network, k3s_kit, monkeypatch):
    # A k3s slow to stop (it ignores SIGTERM) and a shutdown budget shorter than its grace: the
    # hook is cancelled mid-stop, which used to leave k3s running after its node had gone.
    monkeypatch.setattr("kairos_core.node.SHUTDOWN_HOOK_TIMEOUT", 0.3)
    net = await kairos_network(0)
    left = await run_and_stop(net, k3s_kit, "stubborn", env={"FAKE_K3S_IGNORE_TERM": "1"})
    assert left == [], f"k3s {left} survived its node's stop"
