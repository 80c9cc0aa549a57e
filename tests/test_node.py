"""Whole nodes in one event loop on loopback: real libp2p hosts, real sqlite, real unix sockets."""

from __future__ import annotations

import asyncio
import json

import pytest

from kairos_core.api import APIClient
from kairos_core.plugins import hookimpl

pytestmark = pytest.mark.slow


class Recorder:
    """A test plugin that records every event hook."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, str]] = []
        self.updates: list = []
        self.leaders: list[tuple[str, int]] = []
        self.lifecycle: list[str] = []

    @hookimpl
    def on_peer(self, node, event):
        self.peers.append((event.kind, event.peer_id))

    @hookimpl
    async def on_ledger_update(self, node, update):
        self.updates.append(update)

    @hookimpl
    def on_leader_elected(self, node, leader, epoch):
        self.leaders.append((leader, epoch))

    @hookimpl
    def kairos_startup(self, node):
        self.lifecycle.append(f"startup {node.peer_id}")

    @hookimpl
    async def kairos_shutdown(self, node):
        node.ledger.set("goodbye", node.peer_id, True)  # the ledger still works during shutdown
        self.lifecycle.append(f"shutdown {node.peer_id}")


def agreed_on(nodes) -> str | None:
    """The ledger fingerprint every node shows, or None while they differ."""
    fingerprints = {node.status()["ledger_fingerprint"] for node in nodes}
    return fingerprints.pop() if len(fingerprints) == 1 else None


async def test_nodes_join_replicate_and_elect(kairos_network):
    recorders = [Recorder() for _ in range(3)]
    net = await kairos_network(0)
    for recorder in recorders:
        await net.add_node(plugins=[recorder])
    a, b, c = net.nodes
    await net.fully_connected()
    # joined, never left; "updated" may come too (an entry rewritten once its reachability is known)
    assert {kind for r in recorders for kind, _ in r.peers} - {"updated"} == {"joined"}
    assert {peer for kind, peer in recorders[0].peers} == {b.peer_id, c.peer_id}

    a.ledger.set("apps", "web", {"replicas": 3})
    await net.wait_for(lambda: all(n.ledger.get("apps", "web") == {"replicas": 3} for n in net.nodes))
    await asyncio.sleep(0.1)
    for node, recorder in zip(net.nodes, recorders):
        mine = [u for u in recorder.updates if u.bucket == "apps"]
        assert [(u.key, u.value, u.owner, u.local) for u in mine] == [("web", {"replicas": 3}, a.peer_id, node is a)]

    await net.wait_for(lambda: all(n.leader for n in net.nodes) and len({n.leader for n in net.nodes}) == 1, timeout=20)
    leader = a.leader
    await net.wait_for(lambda: all(r.leaders for r in recorders), timeout=10)
    await asyncio.sleep(0.2)
    for recorder in recorders:
        assert recorder.leaders == [leader]
    assert sum(n.is_leader for n in net.nodes) == 1
    # three nodes are below gossipsub's D_lo: each has both others in its mesh (status reports it)
    await net.wait_for(lambda: all(n.status()["gossip_mesh"] == 2 for n in net.nodes), timeout=10)
    # once the ledgers agree, so do their fingerprints; a write moves the writer's first
    await net.wait_for(lambda: agreed_on(net.nodes) is not None, timeout=20)
    agreed = agreed_on(net.nodes)
    a.ledger.set("apps", "db", {"replicas": 1})
    assert a.status()["ledger_fingerprint"] != agreed
    await net.wait_for(lambda: agreed_on(net.nodes) not in (None, agreed), timeout=20)


async def test_hook_lifecycle_on_real_nodes(kairos_network):
    recorder = Recorder()
    net = await kairos_network(1)
    node = await net.add_node(plugins=[recorder])
    await net.fully_connected()
    await asyncio.sleep(1.5)  # a gossipsub heartbeat: the mesh is grafted
    await node.stop()
    assert recorder.lifecycle == [f"startup {node.peer_id}", f"shutdown {node.peer_id}"]
    await net.wait_for(lambda: net.nodes[0].ledger.get("goodbye", node.peer_id) is True)


async def test_leader_fail_over_and_left_event(kairos_network):
    recorders = [Recorder() for _ in range(4)]
    net = await kairos_network(0)
    for recorder in recorders:
        await net.add_node(plugins=[recorder])
    await net.fully_connected()
    await net.wait_for(lambda: len({n.leader for n in net.nodes}) == 1 and net.nodes[0].leader, timeout=20)
    old_leader, old_epoch = net.nodes[0].leader
    victim = next(n for n in net.nodes if n.peer_id == old_leader)
    await victim.stop()
    survivors = net.running()
    await net.wait_for(
        lambda: all(n.leader and n.leader[0] != old_leader for n in survivors) and len({n.leader for n in survivors}) == 1,
        timeout=20,
    )
    new_leader, new_epoch = survivors[0].leader
    assert new_epoch > old_epoch
    watching = [recorder for node, recorder in zip(net.nodes, recorders) if node is not victim]
    # Hooks are delivered from a queue after the state they report changed, so wait for them.
    await net.wait_for(
        lambda: all(("left", old_leader) in r.peers and r.leaders and r.leaders[-1] == (new_leader, new_epoch) for r in watching),
        timeout=10,
    )
    await asyncio.sleep(0.2)
    for recorder in watching:
        assert recorder.leaders[-1] == (new_leader, new_epoch)  # nothing older arrived after it
        assert len(recorder.leaders) == len(set(recorder.leaders))  # once per (leader, epoch)


async def test_late_joiner_catches_up_through_anti_entropy(kairos_network):
    net = await kairos_network(2)
    a = net.nodes[0]
    for index in range(300):
        a.ledger.set("bulk", f"k{index}", index)
    a.ledger.delete("bulk", "k7")
    late = await net.add_node()
    await net.wait_for(lambda: len(late.ledger.items("bulk")) == 299, timeout=20)
    assert late.ledger.get("bulk", "k299") == 299 and late.ledger.get("bulk", "k7") is None


async def test_garbage_gossip_is_dropped_and_counted(kairos_network):
    net = await kairos_network(2)
    a, b = net.nodes
    await net.fully_connected()
    await a.host.publish(a.schedule.topic, b"\x01" + b"garbage" * 10)
    await a.host.publish(a.schedule.topic, b"short")
    await net.wait_for(lambda: sum(v for k, v in b.replicator.counters.items() if k.startswith("gossip_dropped")) >= 2)
    a.ledger.set("still", "works", 1)
    await net.wait_for(lambda: b.ledger.get("still", "works") == 1)


async def test_node_with_another_token_stays_out(kairos_network, tmp_path):
    from kairos_core.p2p import AdmissionError
    from kairos_testing import LocalNetwork

    net = await kairos_network(2)
    outsider_net = LocalNetwork(tmp_path / "outsiders")
    outsider = await outsider_net.add_node()
    try:
        with pytest.raises(AdmissionError):
            await outsider.connect(net.nodes[0].host.addresses())
        outsider.ledger.set("evil", "x", 1)
        await asyncio.sleep(0.5)
        assert all(outsider.peer_id not in n.members() for n in net.nodes)
        assert all(n.ledger.get("evil", "x") is None for n in net.nodes)
    finally:
        await outsider_net.stop()


async def test_local_api_and_cli_against_a_running_node(kairos_network, capsys):
    from kairos_core.cli import main

    net = await kairos_network(2)
    a, b = net.nodes
    await net.fully_connected()
    socket = a.config.api_socket
    assert oct(socket.stat().st_mode & 0o777) == "0o600"
    client = APIClient(socket)
    status = await asyncio.to_thread(client.request, "GET", "/api/status")
    assert status["peer_id"] == a.peer_id and status["members"] == 1
    peers = await asyncio.to_thread(client.request, "GET", "/api/peers")
    assert [p["peer_id"] for p in peers if p["alive"]] == [b.peer_id]

    def cli(*argv):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--socket", str(socket)])
            raise SystemExit(0)
        out, err = capsys.readouterr()
        return exc.value.code, out, err

    code, out, err = await asyncio.to_thread(cli, "ledger", "set", "cfg", "color", '{"name": "blue"}')
    assert code == 0, err
    await net.wait_for(lambda: b.ledger.get("cfg", "color") == {"name": "blue"})
    code, out, _ = await asyncio.to_thread(cli, "ledger", "get", "cfg", "color")
    assert json.loads(out) == {"name": "blue"}
    code, out, _ = await asyncio.to_thread(cli, "ledger", "list", "cfg", "--json")
    assert json.loads(out) == {"color": {"name": "blue"}}
    code, out, err = await asyncio.to_thread(cli, "ledger", "set", "cfg", "huge", json.dumps("x" * 70000))
    assert code == 1 and "max_value_size" in err and err.count("\n") == 1  # refused: the operation failed
    code, _, _ = await asyncio.to_thread(cli, "ledger", "delete", "cfg", "color")
    assert code == 0
    await net.wait_for(lambda: b.ledger.get("cfg", "color") is None)
    code, _, err = await asyncio.to_thread(cli, "ledger", "get", "cfg", "color")
    assert code == 1 and "no key cfg/color" in err
    code, out, _ = await asyncio.to_thread(cli, "peers", "--json")
    assert [row["peer_id"] for row in json.loads(out)] == [b.peer_id]
    code, out, _ = await asyncio.to_thread(cli, "status", "--json")
    assert json.loads(out)["network_id"] == "kairos"


async def test_ledger_watch_streams_changes(kairos_network):
    net = await kairos_network(1)
    node = net.nodes[0]
    client = APIClient(node.config.api_socket)
    received = []

    def watch():
        for update in client.stream("/api/watch", params={"bucket": "w"}):
            received.append(update)
            if len(received) == 2:
                return

    watcher = asyncio.create_task(asyncio.to_thread(watch))
    await asyncio.sleep(0.3)
    node.ledger.set("other", "x", 0)
    node.ledger.set("w", "a", 1)
    node.ledger.delete("w", "a")
    await asyncio.wait_for(watcher, 10)
    assert [(u["key"], u["value"], u["deleted"]) for u in received] == [("a", 1, False), ("a", None, True)]


async def test_hook_kairos_leader_eligible(kairos_network):
    class NeverLead:
        @hookimpl
        def kairos_leader_eligible(self, node):
            return False

    class Abstains:
        @hookimpl
        def kairos_leader_eligible(self, node):
            return None

    net = await kairos_network(0)
    vetoed = await net.add_node(plugins=[NeverLead(), Abstains()])
    other = await net.add_node(plugins=[Abstains()])
    await net.fully_connected()
    assert not vetoed.leader_eligible() and other.leader_eligible()
    await net.wait_for(lambda: vetoed.leader and other.leader, timeout=20)
    assert vetoed.leader[0] == other.peer_id == other.leader[0]
    await net.wait_for(lambda: other.members().get(vetoed.peer_id, {}).get("eligible") is False)


async def test_sub_keys_of_a_node_entry_are_not_members(kairos_network):
    recorder = Recorder()
    net = await kairos_network(0)
    a = await net.add_node()
    b = await net.add_node(plugins=[recorder])
    await net.fully_connected()
    a.ledger.set("nodes", f"{a.peer_id}/plugin-data", {"network_id": "kairos", "hostname": "phantom"})
    await net.wait_for(lambda: b.ledger.get("nodes", f"{a.peer_id}/plugin-data") is not None)
    await asyncio.sleep(0.2)
    assert set(b.members()) == {a.peer_id}
    assert [peer for kind, peer in recorder.peers if kind == "joined"] == [a.peer_id]


async def test_a_restarted_node_does_not_count_departed_peers_alive(kairos_network):
    net = await kairos_network(3)
    a, b, c = net.nodes
    await net.fully_connected()
    await c.stop()
    await a.stop()
    restarted = await net.add_node(overrides={"node": {"state_dir": str(a.config.state_dir)}}, connect=False)
    assert restarted.peer_id == a.peer_id
    assert restarted.members() == {}  # b and c are remembered from disk, not alive until heard from
    await restarted.connect(b.host.addresses())
    await net.wait_for(lambda: set(restarted.members()) == {b.peer_id})


async def test_a_plugin_that_hangs_in_shutdown_cannot_keep_the_node_from_stopping(kairos_network):
    import threading

    from kairos_core import node as node_module

    class Hangs:
        @hookimpl
        async def kairos_shutdown(self, node):
            await asyncio.sleep(60)

        @hookimpl
        def kairos_startup(self, node):
            raise RuntimeError("broken plugin")  # isolated: the node starts anyway

    net = await kairos_network(0)
    node = await net.add_node(plugins=[Hangs()])
    node_module.SHUTDOWN_HOOK_TIMEOUT, saved = 0.3, node_module.SHUTDOWN_HOOK_TIMEOUT
    try:
        await asyncio.wait_for(node.stop(), 10)
    finally:
        node_module.SHUTDOWN_HOOK_TIMEOUT = saved
    assert node.host is None and node._stopped.is_set()
    # this node's libp2p thread (named after its peer id) is gone; other tests' nodes may still be unwinding theirs
    assert not [t for t in threading.enumerate() if t.name == f"kairos-p2p-{node.peer_id[-8:]}" and t.is_alive()]


async def test_an_admission_that_races_shutdown_is_ignored(kairos_network):
    # kairos demo printed an AttributeError traceback when a peer was admitted while the node stopped
    net = await kairos_network(2)
    a, b = net.nodes
    await net.fully_connected()
    await a.stop()
    await a._peer_admitted(b.peer_id)  # the asyncio side of an admission that arrives late
    assert a.host is None


async def test_the_lease_is_renewed_by_heartbeats_not_ledger_rewrites(kairos_network):
    """Real hosts: a 2 s lease stays with its leader for five leases on every node, while nobody
    rewrites its ledger entry — the renewals are the signed heartbeats on their own topic."""
    net = await kairos_network(0)
    for _ in range(3):
        await net.add_node(overrides={"election": {"lease_seconds": 2.0}})
    await net.fully_connected()
    await net.wait_for(lambda: all(n.leader for n in net.nodes) and len({n.leader for n in net.nodes}) == 1, timeout=20)
    (leader,) = {n.leader for n in net.nodes}
    await asyncio.sleep(1.0)  # the confirmed entry has reached everyone

    def lease_versions(node):
        return {key: tuple(node.ledger.get_entry("leader", key).version) for key in node.ledger.items("leader")}

    stored = [lease_versions(n) for n in net.nodes]
    for _ in range(20):  # 10 s: five leases
        await asyncio.sleep(0.5)
        assert {n.leader for n in net.nodes} == {leader}
    assert [lease_versions(n) for n in net.nodes] == stored
    followers = [n for n in net.nodes if n.peer_id != leader[0]]
    sent = next(n for n in net.nodes if n.peer_id == leader[0]).status()["counters"]["heartbeats_sent"]
    accepted = [n.status()["counters"]["election_heartbeats_accepted"] for n in followers]
    assert sent >= 8 and all(count >= sent - 3 for count in accepted), (sent, accepted)
