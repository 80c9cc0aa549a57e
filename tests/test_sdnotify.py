"""The systemd notify protocol against a real unix datagram socket standing in for systemd, with
`kairos run` as a real process; the shipped unit checked by systemd-analyze; kairos daemon install."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kairos_core import sdnotify
from kairos_core.daemon import install, shipped
from kairos_core.token import generate_token

KAIROS = str(Path(sys.executable).parent / "kairos")


def node_config(tmp_path: Path, **node) -> Path:
    config = {
        "p2p": {
            "network_token": generate_token().encode(),
            "listen": ["/ip4/127.0.0.1/tcp/0"],
            "disable_mdns": True,
            "disable_dht": True,
        },
        "node": {"state_dir": str(tmp_path / "state"), "hostname": "notified", **node},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def notify_socket(tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(30)
    yield sock, path
    sock.close()


def receive(sock: socket.socket, wanted: str, limit: int = 200) -> list[str]:
    """Datagrams until one holding the line ``wanted``."""
    seen = []
    for _ in range(limit):
        message = sock.recv(4096).decode()
        seen.append(message)
        if wanted in message.split("\n"):
            return seen
    raise AssertionError(f"no {wanted} in {seen}")


def test_notify_sends_one_datagram_and_is_silent_without_a_manager(notify_socket):
    sock, path = notify_socket
    assert sdnotify.notify("READY=1\nSTATUS=up", env={"NOTIFY_SOCKET": str(path)})
    assert sock.recv(4096) == b"READY=1\nSTATUS=up"
    assert not sdnotify.notify("READY=1", env={})  # not under systemd: nothing, no error
    assert not sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": str(path) + ".gone"})  # failed: logged, not raised


def test_notify_reaches_an_abstract_socket():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"kairos-test-{os.getpid()}-{time.monotonic_ns()}"
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert sdnotify.notify("WATCHDOG=1", env={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"WATCHDOG=1"
    finally:
        sock.close()


def test_watchdog_interval_follows_the_environment():
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30 / sdnotify.WATCHDOG_PINGS_PER_PERIOD
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 10
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None  # another process's
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_kairos_run_says_ready_feeds_the_watchdog_and_says_stopping(tmp_path, notify_socket):
    sock, path = notify_socket
    env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "300000"}  # a ping every 0.1 s
    env.pop("WATCHDOG_PID", None)
    process = subprocess.Popen(
        [KAIROS, "run", "-c", str(node_config(tmp_path))], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        first = receive(sock, "READY=1")
        assert len(first) == 1  # nothing before READY
        assert (tmp_path / "state" / "api.sock").exists()  # READY means up: the API answers already
        pings = receive(sock, "WATCHDOG=1")
        receive(sock, "WATCHDOG=1")
        assert all("READY=1" not in message for message in pings)  # READY once
        process.send_signal(signal.SIGTERM)
        receive(sock, "STOPPING=1")
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


def test_daemon_install_writes_the_unit_with_this_kairos(tmp_path):
    written = install(tmp_path, executable=KAIROS, config_file="/etc/kairos/edge.yaml")
    unit = tmp_path / "etc/systemd/system/kairos.service"
    assert written == [unit]
    text = unit.read_text()
    assert f"ExecStart={KAIROS} run -c /etc/kairos/edge.yaml" in text
    for line in (
        "Type=notify",
        "WatchdogSec=60s",
        "StateDirectory=kairos",
        "RuntimeDirectory=kairos",
        "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW CAP_NET_BIND_SERVICE",
        "DeviceAllow=/dev/net/tun rw",
    ):
        assert line in text.splitlines(), line
    script = install(tmp_path, openrc=True, executable=KAIROS)[0]
    assert script == tmp_path / "etc/init.d/kairos" and os.access(script, os.X_OK)
    assert f'command="{KAIROS}"' in script.read_text()
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    # contrib/ holds the same files as the package ships
    root = Path(__file__).resolve().parent.parent
    assert (root / "contrib/systemd/kairos.service").read_text() == shipped("kairos.service")
    assert (root / "contrib/openrc/kairos").read_text() == shipped("kairos.openrc")


def test_daemon_install_through_the_cli(tmp_path):
    result = subprocess.run([KAIROS, "daemon", "install", "--prefix", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "etc/systemd/system/kairos.service").exists()
    bad = subprocess.run(
        [KAIROS, "daemon", "install", "--prefix", str(tmp_path), "--config-file", "relative.yaml"], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "must be absolute" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing (Debian package systemd)")
def test_the_unit_passes_systemd_analyze_verify(tmp_path):
    unit = install(tmp_path, executable=KAIROS)[0]

    def verify(path: Path) -> list[str]:
        result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
        # verify exits 0 on directives it could not parse, and says so on stderr, naming the file
        return [line for line in (result.stdout + result.stderr).splitlines() if path.name in line] + (
            [f"exit {result.returncode}"] if result.returncode else []
        )

    assert verify(unit) == []
    broken = tmp_path / "broken" / "kairos.service"
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace("Type=notify", "Type=notifyy"))
    assert any("notifyy" in line for line in verify(broken))  # the check above can fail
