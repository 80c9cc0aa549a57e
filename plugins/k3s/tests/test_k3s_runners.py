"""Service runners with fake systemctl / rc-service / k3s: right calls, idempotent, supervised."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys

import pytest
import yaml

from kairos_plugin_k3s.launch import Join, build_launch
from kairos_plugin_k3s.paths import K3sPaths
from kairos_plugin_k3s.roles import MASTER, WORKER
from kairos_plugin_k3s.runners import OpenRCRunner, ProcessRunner, SystemdRunner, make_runner
from kairos_plugin_k3s.settings import FlagSet
from kairos_plugin_k3s.testing import install_fake_k3s, install_fake_systemctl, read_k3s_calls, read_systemctl_calls

NO_FLAGS = FlagSet(True, (), {}, False, False)


def server_launch(paths, k3s, node_ip="10.1.0.1"):
    return build_launch(MASTER, flags=NO_FLAGS, binary=str(k3s), paths=paths, node_ip=node_ip, interface="edgevpn0")


@pytest.fixture
def world(tmp_path):
    paths = K3sPaths.under(tmp_path / "root")
    k3s = install_fake_k3s(tmp_path / "bin")
    log = tmp_path / "systemctl.jsonl"
    systemctl = install_fake_systemctl(tmp_path / "bin", paths.systemd_dir, log)
    return paths, k3s, systemctl, log


async def test_systemd_runner_writes_the_unit_and_starts_it_once(world):
    paths, k3s, systemctl, log = world
    launch = server_launch(paths, k3s)
    assert await SystemdRunner(paths, str(systemctl)).apply(launch) is True
    assert read_systemctl_calls(log) == [["daemon-reload"], ["enable", "--now", "k3s"]]
    unit = (paths.systemd_dir / "k3s.service").read_text()
    assert f"ExecStart={k3s} server" in unit and f"EnvironmentFile=-{paths.systemd_dir}/k3s.service.env" in unit
    assert yaml.safe_load(paths.config_file.read_text())["flannel-iface"] == "edgevpn0"
    # the unit really ran k3s: the server wrote its token and kubeconfig
    assert paths.node_token.read_text().startswith("K10") and paths.kubeconfig.exists()
    assert read_k3s_calls(paths.root)[0]["argv"][1] == "server"

    # a restarted node (a new runner) with the same launch: no reload, no restart
    assert await SystemdRunner(paths, str(systemctl)).apply(launch) is False
    assert read_systemctl_calls(log)[2:] == [["enable", "--now", "k3s"]]
    runner = SystemdRunner(paths, str(systemctl))
    assert await runner.apply(launch) is False
    assert await runner.apply(launch) is False  # the same runner again: no call at all
    assert len(read_systemctl_calls(log)) == 4

    # a changed launch: reload and restart
    assert await runner.apply(server_launch(paths, k3s, node_ip="10.1.0.9")) is True
    assert read_systemctl_calls(log)[4:] == [["daemon-reload"], ["enable", "k3s"], ["restart", "k3s"]]
    assert read_k3s_calls(paths.root)[-1]["config"]["node-ip"] == "10.1.0.9"


async def test_systemd_runner_reports_a_failing_unit(world):
    paths, k3s, systemctl, log = world
    # an agent without URL/token fails to start, and so does the unit
    launch = build_launch(WORKER, flags=NO_FLAGS, binary=str(k3s), paths=paths, node_ip="10.1.0.2",
                          interface="edgevpn0", join=Join("https://10.1.0.1:6443", "t"))
    launch = dataclasses.replace(launch, env={})
    from kairos_plugin_k3s.runners import RunnerError

    with pytest.raises(RunnerError, match="exited with 1"):
        await SystemdRunner(paths, str(systemctl)).apply(launch)


async def test_openrc_runner(tmp_path):
    paths = K3sPaths.under(tmp_path / "root")
    log = tmp_path / "rc.jsonl"
    recorder = tmp_path / "bin" / "rc"
    recorder.parent.mkdir(parents=True)
    recorder.write_text(f"#!{sys.executable}\nimport json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    recorder.chmod(0o755)
    runner = OpenRCRunner(paths, rc_service=str(recorder), rc_update=str(recorder))
    launch = server_launch(paths, "/usr/local/bin/k3s")
    assert await runner.apply(launch) is True
    script = (paths.openrc_dir / "k3s").read_text()
    assert script.startswith("#!/sbin/openrc-run") and "command=/usr/local/bin/k3s" in script
    assert "command_args=server" in script and (paths.openrc_dir / "k3s").stat().st_mode & 0o111
    assert await runner.apply(launch) is False
    assert await runner.apply(server_launch(paths, "/usr/local/bin/k3s", node_ip="10.1.0.3")) is True
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [["add", "k3s", "default"], ["k3s", "start"], ["add", "k3s", "default"], ["k3s", "restart"]]


async def test_process_runner_starts_restarts_on_change_and_stops(world):
    paths, k3s, _, _ = world
    runner = ProcessRunner(paths)
    try:
        assert await runner.apply(server_launch(paths, k3s)) is True
        first = runner.process
        assert await runner.apply(server_launch(paths, k3s)) is False
        assert runner.process is first
        for _ in range(200):
            if paths.node_token.exists():
                break
            await asyncio.sleep(0.05)
        assert paths.node_token.exists()
        assert await runner.apply(server_launch(paths, k3s, node_ip="10.1.0.7")) is True
        assert runner.process is not first and first.returncode is not None
    finally:
        await runner.stop()
    assert runner.process is None


async def test_process_runner_restarts_a_crashed_k3s(world):
    paths, k3s, _, _ = world
    runner = ProcessRunner(paths)
    launch = build_launch(WORKER, flags=NO_FLAGS, binary=str(k3s), paths=paths, node_ip="10.1.0.2",
                          interface="edgevpn0", join=Join("https://10.1.0.1:6443", "t"))
    launch = dataclasses.replace(launch, env={"K3S_CONFIG_FILE": str(paths.config_file)})  # no URL/token: the agent dies
    try:
        await runner.apply(launch)
        for _ in range(100):
            if runner.starts >= 2:
                break
            await asyncio.sleep(0.1)
        assert runner.starts >= 2 and runner.exits[0] == 1
    finally:
        await runner.stop()


async def test_process_runner_names_a_missing_binary_and_the_ways_out(world, caplog):
    paths, _, _, _ = world
    runner = ProcessRunner(paths)
    missing = str(paths.config_file.parent / "no-such-k3s")
    try:
        with caplog.at_level(logging.ERROR, logger="kairos_plugin_k3s.runners"):
            assert await runner.apply(server_launch(paths, missing)) is True
    finally:
        await runner.stop()
    assert runner.process is None and runner.starts == 1
    message = caplog.records[0].getMessage()
    assert f"{missing} not found" in message and "k3s.enabled: false" in message


def test_make_runner(tmp_path):
    paths = K3sPaths.under(tmp_path)
    assert make_runner("process", paths).name == "process"
    assert make_runner("systemd", paths).name == "systemd"
    assert make_runner("auto", paths).name in ("systemd", "openrc", "process")
    with pytest.raises(ValueError, match="unknown runner"):
        make_runner("upstart", paths)
