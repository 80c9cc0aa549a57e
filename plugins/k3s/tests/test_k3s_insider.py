"""An insider — another node holding the token — forging the cluster's join data, on in-process nodes.

The worker runs under the OpenRC runner with a fake ``rc-service`` that, like ``openrc-run``,
sources the env file with the real ``sh`` on every (re)start: a forged ``$(…)`` token that reached
the file would run there.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kairos_core.ledger import Entry, Version
from kairos_plugin_k3s import CLUSTER_INIT, MASTER, WORKER, K3sPlugin
from kairos_plugin_k3s.cluster_state import KUBECONFIG_KEY, MASTER_IP_KEY, TOKEN_KEY, cluster_bucket, own_key, role_key
from kairos_testing.k3s import FakeVPN

pytestmark = pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")

EVIL_IP = "203.0.113.66"
EVIL_TOKEN = "K10" + "ee" * 32 + "::server:evil"


def install_fake_openrc(bin_dir: Path, env_file: Path, log: Path, seen: Path) -> Path:
    """An ``rc-service``/``rc-update`` stand-in: logs its arguments; ``start``/``restart`` source
    ``env_file`` with ``sh`` under allexport, as the init script does, and record what k3s would get."""
    script = bin_dir / "rc"
    bin_dir.mkdir(parents=True, exist_ok=True)
    script.write_text(
        "#!/bin/sh\n"
        f"echo \"$*\" >> '{log}'\n"
        'case "$2" in start|restart)\n'
        f"  set -o allexport; [ -f '{env_file}' ] && . '{env_file}'; set +o allexport\n"
        f"  printf '%s %s\\n' \"$K3S_URL\" \"$K3S_TOKEN\" >> '{seen}' ;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    return script


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def files_containing(root: Path, needles: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            text = path.read_bytes().decode(errors="replace")
            found += [f"{path}: {needle}" for needle in needles if needle in text]
    return found


async def rounds_pass(net, plugin, nodes, count=3):
    base = {n: plugin.member(n).counters["rounds"] for n in nodes}
    await net.wait_for(lambda: all(plugin.member(n).counters["rounds"] >= base[n] + count for n in nodes))


async def test_an_insider_cannot_redirect_joiners_nor_run_code_through_the_token(kairos_network, k3s_kit, tmp_path):
    pwned = tmp_path / "pwned"
    shell_token = f"$(touch {pwned})"
    worker_root = k3s_kit.root("hand")
    rc_log, seen = tmp_path / "rc.log", tmp_path / "seen.log"
    rc = install_fake_openrc(tmp_path / "rcbin", worker_root / "etc/rancher/k3s/k3s-agent.env", rc_log, seen)

    net = await kairos_network(0)
    plugin = K3sPlugin()
    vpn = FakeVPN()
    boss = await net.add_node(
        plugins=[plugin, vpn], name="boss", overrides=k3s_kit.overrides("boss", p2p={"role": MASTER, "minimum_nodes": 2})
    )
    hand = await net.add_node(
        plugins=[plugin, vpn],
        name="hand",
        overrides=k3s_kit.overrides(
            "hand",
            p2p={"role": WORKER, "minimum_nodes": 2},
            k3s={"runner": "openrc", "rc_service": str(rc), "rc_update": str(rc)},
        ),
    )
    await net.fully_connected()
    await net.wait_for(lambda: plugin.member(hand).launch is not None and lines(seen), timeout=30)
    boss_vip = boss.ledger.get("vpn", boss.peer_id)["vip"].split("/")[0]
    token = (k3s_kit.root("boss") / "var/lib/rancher/k3s/server/node-token").read_text().strip()
    assert lines(seen) == [f"https://{boss_vip}:6443 {token}"]
    rc_calls = lines(rc_log)

    # The insider: a node with the token but none of the plugins (so no bucket policy of its own),
    # never the leader. It writes what it likes into its own ledger and lets replication carry it.
    mole = await net.add_node(name="mole", overrides={"election": {"eligible": False}})
    await net.fully_connected()
    bucket = cluster_bucket(boss.network_id)

    async def forge(address: str) -> None:
        writes = [
            (bucket, own_key(mole.peer_id, MASTER_IP_KEY), address),  # its own key: allowed, but not a master's
            (bucket, own_key(mole.peer_id, TOKEN_KEY), shell_token),
            (bucket, own_key(mole.peer_id, KUBECONFIG_KEY), "clusters: []\n"),
            (bucket, role_key(mole.peer_id, mole.peer_id, 99), {"role": CLUSTER_INIT, "epoch": 99, "leader": mole.peer_id}),
            (boss.network_id, MASTER_IP_KEY, address),  # the keys earlier versions read, in the open bucket
            (boss.network_id, TOKEN_KEY, shell_token),
        ]
        for write in writes:
            mole.ledger.set(*write)
        before = hand.ledger.counters["rejected_policy"]
        # in the init master's name and under its keys, and the worker's VPN address: the policies refuse them
        for key, value in ((own_key(boss.peer_id, MASTER_IP_KEY), address), (own_key(boss.peer_id, TOKEN_KEY), EVIL_TOKEN)):
            mole.ledger.set(bucket, key, value)
        mole.ledger.set("vpn", hand.peer_id, {"vip": f"{address}/24"})
        await net.wait_for(lambda: all(hand.ledger.get(b, k) == v for b, k, v in writes[:3] + writes[4:]), timeout=20)
        await net.wait_for(lambda: hand.ledger.counters["rejected_policy"] >= before + 3, timeout=20)
        await rounds_pass(net, plugin, [n for n in (boss, hand) if n.host is not None])

    await forge(EVIL_IP)
    member = plugin.member(hand)
    assert member.role == WORKER and member.state.init_master() == boss.peer_id
    assert hand.ledger.get(bucket, own_key(boss.peer_id, MASTER_IP_KEY)) == boss_vip  # the forged write never landed
    assert hand.ledger.get("vpn", hand.peer_id)["vip"] != f"{EVIL_IP}/24"
    assert lines(rc_log) == rc_calls and lines(seen) == [f"https://{boss_vip}:6443 {token}"]  # no restart
    assert member.launch.env["K3S_URL"] == f"https://{boss_vip}:6443" and member.launch.env["K3S_TOKEN"] == token
    assert member.state.rejected["untrusted_writer"] == 3  # ip-master, token and kubeconfig of the mole, once each
    assert member.state.ignored >= 1  # the role the mole assigned itself
    assert not pwned.exists()
    assert files_containing(worker_root, [EVIL_IP, EVIL_TOKEN, "touch"]) == []

    # With the init master down, joiners keep its join data: nothing else counts.
    await boss.stop()
    await forge("203.0.113.77")
    assert lines(rc_log) == rc_calls and len(lines(seen)) == 1
    assert member.launch.env["K3S_URL"] == f"https://{boss_vip}:6443"
    assert member.state.rejected["untrusted_writer"] == 6  # the new versions, once each
    assert not pwned.exists()
    assert files_containing(worker_root, [EVIL_IP, "203.0.113.77", EVIL_TOKEN, "touch"]) == []


async def test_a_remote_entry_under_the_init_masters_key_is_refused_by_every_node(kairos_network, k3s_kit):
    net = await kairos_network(0)
    plugin = K3sPlugin()
    for name, hint in (("boss", MASTER), ("hand", WORKER)):
        await net.add_node(plugins=[plugin], name=name, overrides=k3s_kit.overrides(name, p2p={"role": hint, "minimum_nodes": 2}))
    await net.fully_connected()
    boss, hand = net.nodes
    key = own_key(boss.peer_id, TOKEN_KEY)
    await net.wait_for(lambda: hand.ledger.get(cluster_bucket("kairos"), key) is not None, timeout=30)
    from kairos_core.identity import Identity

    mole = Identity.generate()
    forged = Entry.signed(
        mole, cluster_bucket("kairos"), key, EVIL_TOKEN, Version(hand.ledger.clock.now_ms() + 1, 0, mole.peer_id)
    )
    for node in (boss, hand):
        assert node.ledger.apply_remote([forged]) == []
        assert node.ledger.counters["rejected_policy"] >= 1
        assert node.ledger.get(cluster_bucket("kairos"), key) != EVIL_TOKEN
