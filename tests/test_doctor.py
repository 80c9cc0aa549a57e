"""kairos doctor against real nodes: a lone node, two nodes with different tokens, a healthy pair;
the real CLI's output and exit codes; the pieces (clock offsets, what a node waits for, progress);
the progress `kairos run` shows in a terminal, and its silence elsewhere."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from kairos_core.doctor import FAIL, OK, WARN, ClockOffsets, Progress, diagnose, waiting_for
from kairos_core.localnet import LocalNetwork
from kairos_core.token import generate_token

KAIROS = str(Path(sys.executable).parent / "kairos")


def by_check(results: list[dict]) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for result in results:
        assert result["status"] in (OK, WARN, FAIL)
        assert result["detail"]
        assert (result["status"] == OK) == ("hint" not in result)  # every warning says what to do
        found.setdefault(result["check"], result)
    return found


async def doctor_cli(node, *args: str) -> tuple[int, str]:
    """The real `kairos doctor` against the node's socket (a process: this loop keeps serving)."""
    process = await asyncio.create_subprocess_exec(
        KAIROS,
        "doctor",
        "--socket",
        str(node.config.api_socket),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert b"Traceback" not in err, err
    return process.returncode, out.decode()


async def test_a_lone_node_warns_that_it_has_no_peers(kairos_network):
    # the DHT on (with no bootstrap peer it only ever talks to itself): something could find peers
    net = await kairos_network(1, overrides={"p2p": {"disable_dht": False}})
    node = net.nodes[0]
    checks = by_check(await diagnose(node))
    assert checks["peers"]["status"] == WARN and "no peer alive" in checks["peers"]["detail"]
    assert checks["discovery"]["status"] == OK and "DHT on, found 0 peers" in checks["discovery"]["detail"]
    assert checks["token"]["status"] == OK and node.token.fingerprint in checks["token"]["detail"]
    assert checks["admission"]["status"] == OK
    assert "loopback" in checks["reachability"]["detail"]
    code, out = await doctor_cli(node)
    assert code == 0  # warnings only
    assert any(line.startswith("warn  peers") for line in out.splitlines()), out
    assert "-> start another node" in out


async def test_discovery_off_and_nothing_to_dial_is_a_failure(kairos_network):
    net = await kairos_network(1)  # mDNS, the DHT off, no bootstrap peer
    checks = by_check(await diagnose(net.nodes[0]))
    assert checks["discovery"]["status"] == FAIL and "nothing can find peers" in checks["discovery"]["detail"]
    code, _ = await doctor_cli(net.nodes[0], "--json")
    assert code == 1


async def test_two_tokens_the_refusal_is_explained(tmp_path):
    ours, theirs = LocalNetwork(tmp_path / "a"), LocalNetwork(tmp_path / "b", token=generate_token())
    try:
        stranger = await theirs.add_node(name="stranger")
        address = stranger.addresses()[0]
        node = await ours.add_node(name="lonely", overrides={"p2p": {"bootstrap_peers": [address]}})
        await ours.wait_for(lambda: node.status()["counters"].get("p2p_admission_refused_token", 0) >= 1, 30)
        checks = {}
        for result in await diagnose(node):
            checks.setdefault(result["check"], result)
        admission = checks["admission"]
        assert admission["status"] == FAIL
        assert "another network token" in admission["detail"]
        assert node.token.fingerprint in admission["hint"]
        bootstrap = checks["bootstrap"]
        assert bootstrap["status"] == FAIL and address in bootstrap["detail"]
        assert "network token" in bootstrap["detail"] and "kairos token show" in bootstrap["hint"]
        assert checks["peers"]["status"] == WARN
        code, out = await doctor_cli(node, "--json")
        assert code == 1
        assert [r["status"] for r in json.loads(out) if r["check"] == "admission"] == [FAIL]
        # the stranger saw us hang up on its proof, and says what that usually means
        assert stranger.status()["counters"].get("p2p_admission_refused_hangup", 0) >= 1
        theirs_checks = by_check(await diagnose(stranger))
        assert theirs_checks["admission"]["status"] == WARN
        assert "may hold another network token" in theirs_checks["admission"]["detail"]
    finally:
        await ours.stop()
        await theirs.stop()


async def test_a_healthy_pair_is_all_ok(kairos_network):
    net = await kairos_network(2)
    await net.fully_connected()
    await net.wait_for(lambda: all(n.leader for n in net.nodes) and net.nodes[0].leader == net.nodes[1].leader, 30)
    await net.wait_for(lambda: net.nodes[0].clock_offsets.offsets(), 10)
    for node in net.nodes:
        results = await diagnose(node)
        assert [r for r in results if r["status"] != OK] == []
        checks = by_check(results)
        assert "1 peer clocks compared" in checks["clock"]["detail"]
        assert checks["leader"]["detail"].endswith(f"epoch {node.leader[1]}")
    code, out = await doctor_cli(net.nodes[0])
    assert code == 0
    assert all(line.startswith("ok ") for line in out.splitlines()), out


async def test_a_waiting_plugin_shows(kairos_network):
    net = await kairos_network(1)
    net.nodes[0].set_state("tunvpn", "waiting for a free address in 10.1.0.0/24")
    checks = by_check(await diagnose(net.nodes[0]))
    assert checks["plugins"]["status"] == WARN and "tunvpn waiting for a free address" in checks["plugins"]["detail"]


def test_clock_offsets_take_the_freshest_arrival():
    now = [1_000_000]
    offsets = ClockOffsets(now_ms=lambda: now[0])
    offsets.observe("ahead", 1_000_000 + 8_000 - 5)  # 8 s ahead, arrived after 5 ms
    offsets.observe("ahead", 1_000_000 - 300_000)  # an old entry synced late: not an offset
    offsets.observe("behind", 1_000_000 - 2_000)
    assert offsets.offsets() == {"ahead": 7.995, "behind": -2.0}


def test_waiting_for_and_progress_lines():
    lone = {"members": 0, "leader": None, "is_leader": False, "states": {"tunvpn": "waiting for an address"}}
    assert waiting_for(lone) == ["peers", "a leader", "tunvpn: waiting for an address"]

    class Fake:
        def __init__(self, status):
            self._status = status

        def status(self):
            return self._status

    lines = []
    progress = Progress(lines.append)
    progress(Fake(lone))
    progress(Fake(lone))  # unchanged: no second line
    leading = {
        "members": 1,
        "leader": {"peer_id": "12D3KooWx", "epoch": 2},
        "is_leader": True,
        "states": {"k3s": "waiting for a role\x1b[2J"},
    }
    progress(Fake(leading))
    progress(Fake({**leading, "states": {}}))
    progress(Fake(lone))  # once ready it stays quiet
    assert lines == [
        "kairos: waiting for peers; a leader; tunvpn: waiting for an address\n",
        "kairos: waiting for k3s: waiting for a role\\x1b[2J\n",
        "kairos: ready: 1 peer, leader this node (epoch 2)\n",
    ]
    assert progress.done


def _config(tmp_path: Path) -> Path:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "p2p": {
                    "network_token": generate_token().encode(),
                    "listen": ["/ip4/127.0.0.1/tcp/0"],
                    "disable_mdns": True,
                    "disable_dht": True,
                },
                "node": {"state_dir": str(tmp_path / "state"), "hostname": "progress"},
            }
        )
    )
    return path


def test_kairos_run_in_a_terminal_says_what_it_waits_for(tmp_path):
    primary, secondary = pty.openpty()
    process = subprocess.Popen(
        [KAIROS, "run", "-c", str(_config(tmp_path))], stdin=secondary, stdout=secondary, stderr=secondary, close_fds=True
    )
    os.close(secondary)
    seen = b""
    try:
        deadline = time.monotonic() + 60
        while b"waiting for peers" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 1)
            if ready:
                try:
                    seen += os.read(primary, 4096)
                except OSError:
                    break
        assert b"kairos: waiting for peers" in seen, seen
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        os.close(primary)


def test_kairos_run_without_a_terminal_shows_no_progress(tmp_path):
    process = subprocess.Popen([KAIROS, "run", "-c", str(_config(tmp_path))], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "state" / "api.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # three progress periods: a terminal would have had its line by now
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert b" up on " in err  # it did run and log
    assert b"waiting for" not in out + err


def test_reachability_reports_what_dial_backs_found():
    from kairos_core.doctor import _reachability

    base = {"addresses": ["/ip4/192.168.1.5/tcp/4001/p2p/x"], "members": 0}
    alone = _reachability(
        None, {**base, "reachability": {"reachability": "private", "observed": ["/ip4/203.0.113.7/tcp/4001"], "relays": []}}
    )
    assert alone["status"] == WARN and "203.0.113.7" in alone["detail"] and "bootstrap from a public node" in alone["hint"]
    relayed = _reachability(None, {**base, "reachability": {"reachability": "private", "observed": [], "relays": ["r"]}})
    assert relayed["status"] == OK and "1 relay holding a reservation" in relayed["detail"]
    public = _reachability(None, {**base, "reachability": {"reachability": "public", "observed": [], "relays": []}})
    assert public["status"] == OK and "say public" in public["detail"]
    unknown = _reachability(None, {**base, "reachability": {"reachability": "unknown"}})
    assert unknown["status"] == OK and "no public address" in unknown["detail"]
    assert _reachability(None, {**base, "addresses": []})["status"] == FAIL
