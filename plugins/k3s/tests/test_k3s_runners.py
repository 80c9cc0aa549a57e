"""Service runners with fake systemctl / rc-service / k3s: right calls, idempotent, supervised."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from kairos_plugin_k3s.launch import Join, build_launch
from kairos_plugin_k3s.paths import K3sPaths
from kairos_plugin_k3s.roles import MASTER, WORKER
from kairos_plugin_k3s.runners import OpenRCRunner, ProcessRunner, RunnerError, SystemdRunner, env_text, make_runner
from kairos_plugin_k3s.settings import FlagSet
from kairos_testing.k3s import (
    install_fake_k3s,
    install_fake_systemctl,
    process_alive,
    read_k3s_calls,
    read_systemctl_calls,
)

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
    launch = build_launch(
        WORKER,
        flags=NO_FLAGS,
        binary=str(k3s),
        paths=paths,
        node_ip="10.1.0.2",
        interface="edgevpn0",
        join=Join("https://10.1.0.1:6443", "t"),
    )
    launch = dataclasses.replace(launch, env={})
    from kairos_plugin_k3s.runners import RunnerError

    with pytest.raises(RunnerError, match="exited with 1"):
        await SystemdRunner(paths, str(systemctl)).apply(launch)


async def test_openrc_runner(tmp_path):
    paths = K3sPaths.under(tmp_path / "root")
    log = tmp_path / "rc.jsonl"
    recorder = tmp_path / "bin" / "rc"
    recorder.parent.mkdir(parents=True)
    recorder.write_text(
        f"#!{sys.executable}\nimport json, sys\nopen({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
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
    launch = build_launch(
        WORKER,
        flags=NO_FLAGS,
        binary=str(k3s),
        paths=paths,
        node_ip="10.1.0.2",
        interface="edgevpn0",
        join=Join("https://10.1.0.1:6443", "t"),
    )
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


HOSTILE = [
    "$(touch {pwned})",
    "`touch {pwned}`",
    "x; touch {pwned}",
    "x && touch {pwned} #",
    "$(touch {pwned})'",
    "'$(touch {pwned})'",
    '"$(touch {pwned})"',
    "\\$(touch {pwned})",
    "${{X:-$(touch {pwned})}}",
    "$HOME",
    "it's",
    'say "hi"',
    "a\\b",
    "",
    " spaced  out ",
    "*",
    "!x",
    "~root",
    "K10ab::server:cd",
]


def source_with_sh(env_file, *names):
    """What ``sh`` sees after sourcing ``env_file`` as the OpenRC script does: the values of ``names``."""
    values = " ".join(f'"${name}"' for name in names)  # names are plain identifiers
    script = f'set -o allexport; [ -f "$1" ] && . "$1"; set +o allexport; printf "%s\\0" {values}'
    done = subprocess.run(["sh", "-c", script, "sh", str(env_file)], capture_output=True, timeout=10)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().split("\0")[:-1]


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")
@pytest.mark.parametrize("template", HOSTILE)
def test_env_files_never_let_sh_run_a_value(tmp_path, template):
    pwned = tmp_path / "pwned"
    value = template.format(pwned=pwned)
    env_file = tmp_path / "k3s.env"
    env_file.write_text(env_text({"K3S_TOKEN": value, "K3S_URL": "https://10.1.0.1:6443"}))
    assert source_with_sh(env_file, "K3S_TOKEN", "K3S_URL") == [value, "https://10.1.0.1:6443"]
    assert not pwned.exists()
    # systemd reads the same file; the fake systemctl parses it the way systemd does (shell words)
    from kairos_testing.fakes.systemctl import read_env

    assert read_env(env_file)["K3S_TOKEN"] == value


@pytest.mark.skipif(shutil.which("sh") is None, reason="needs sh")
async def test_the_openrc_env_file_holds_a_hostile_token_inert(tmp_path):
    paths = K3sPaths.under(tmp_path / "root")
    recorder = tmp_path / "bin" / "rc"
    recorder.parent.mkdir(parents=True)
    recorder.write_text("#!/bin/sh\nexit 0\n")
    recorder.chmod(0o755)
    pwned = tmp_path / "pwned"
    token = f"K10ab::server:$(touch {pwned})`touch {pwned}`"
    launch = build_launch(
        WORKER,
        flags=NO_FLAGS,
        binary="/usr/local/bin/k3s",
        paths=paths,
        node_ip="10.1.0.2",
        interface="edgevpn0",
        join=Join("https://10.1.0.1:6443", "K10ab::server:cd"),
    )
    # build_launch itself refuses such a token; a runner must still write it inert
    launch = dataclasses.replace(launch, env={**launch.env, "K3S_TOKEN": token})
    assert await OpenRCRunner(paths, rc_service=str(recorder), rc_update=str(recorder)).apply(launch) is True
    env_file = paths.config_dir / "k3s-agent.env"
    script = (paths.openrc_dir / "k3s-agent").read_text()
    assert f". {env_file}" in script  # the file the init script sources
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    assert source_with_sh(env_file, "K3S_TOKEN") == [token]
    assert not pwned.exists()


@pytest.mark.parametrize(
    "env, problem",
    [
        ({"BAD NAME": "x"}, "is not a valid name"),
        ({"X;touch /tmp/p;Y": "x"}, "is not a valid name"),
        ({"K3S_TOKEN": "two\nlines"}, "one line of text"),
        ({"K3S_TOKEN": "nul\x00"}, "one line of text"),
    ],
)
def test_env_files_refuse_what_no_reader_reads_alike(env, problem):
    with pytest.raises(RunnerError, match=problem):
        env_text(env)


def test_a_join_token_that_is_not_plain_never_makes_a_launch(tmp_path):
    with pytest.raises(ValueError, match="not a k3s token"):
        build_launch(
            WORKER,
            flags=NO_FLAGS,
            binary="k3s",
            paths=K3sPaths.under(tmp_path),
            node_ip="10.1.0.2",
            interface=None,
            join=Join("https://10.1.0.1:6443", "$(touch /tmp/pwned)"),
        )


def test_make_runner(tmp_path):
    paths = K3sPaths.under(tmp_path)
    assert make_runner("process", paths).name == "process"
    assert make_runner("systemd", paths).name == "systemd"
    assert make_runner("auto", paths).name in ("systemd", "openrc", "process")
    with pytest.raises(ValueError, match="unknown runner"):
        make_runner("upstart", paths)


async def wait_until(condition, timeout=10.0):
    # polls a condition (no assertion on how long it took: the bound only keeps a failure short)
    for _ in range(int(timeout / 0.05)):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


async def test_process_runner_kills_a_k3s_that_ignores_sigterm(world, monkeypatch):
    paths, k3s, _, _ = world
    monkeypatch.setattr("kairos_plugin_k3s.runners.STOP_TIMEOUT", 0.5)
    runner = ProcessRunner(paths)
    launch = server_launch(paths, k3s)
    launch = dataclasses.replace(launch, env={**launch.env, "FAKE_K3S_IGNORE_TERM": "1"})
    try:
        await runner.apply(launch)
        assert await wait_until(lambda: read_k3s_calls(paths.root))  # SIGTERM is ignored from here on
    finally:
        await runner.stop()
    assert not process_alive(read_k3s_calls(paths.root)[0]["pid"])


async def test_process_runner_kills_k3s_when_its_stop_is_cancelled(world):
    # what the node's shutdown does when kairos_shutdown runs out of time: cancel the stop
    paths, k3s, _, _ = world
    runner = ProcessRunner(paths)
    launch = server_launch(paths, k3s)
    launch = dataclasses.replace(launch, env={**launch.env, "FAKE_K3S_IGNORE_TERM": "1"})
    await runner.apply(launch)
    try:
        assert await wait_until(lambda: read_k3s_calls(paths.root))
        pid = read_k3s_calls(paths.root)[0]["pid"]
        stopping = asyncio.get_running_loop().create_task(runner.stop())
        await wait_until(lambda: runner.process is None)  # SIGTERM sent, waiting for the exit
        assert process_alive(pid)
        stopping.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stopping
        assert await wait_until(lambda: not process_alive(pid)), "k3s survived the cancelled stop"
    finally:
        await runner.stop()
        for call in read_k3s_calls(paths.root):  # never leave one behind, even when this failed
            if process_alive(call["pid"]):
                os.kill(call["pid"], signal.SIGKILL)
