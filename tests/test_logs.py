"""Logs of `kairos run`: text or JSON lines, the level from flags or config, SIGHUP re-reading
the config, and peers' strings kept inert in both formats."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kairos_core import logs
from kairos_core.eventlog import on_peer
from kairos_core.events import PeerEvent
from kairos_core.token import generate_token

KAIROS = str(Path(sys.executable).parent / "kairos")
EVIL_HOST = "web\x1b]52;c;cm0gLXJmIH4=\x07\n2030-01-01 00:00:00,000 ERROR forged"
RAW_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # any but the newline that ends a line


def record_lines(fmt: str, emit) -> list[str]:
    """What ``emit(logger)`` logs through a stream handler with the formatter of ``fmt``."""
    import io

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter(fmt))
    logger = logging.getLogger("kairos.events")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        emit()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    return stream.getvalue().splitlines()


def test_json_lines_carry_fields_and_keep_peer_strings_inert():
    lines = record_lines("json", lambda: on_peer(node=None, event=PeerEvent("joined", "12D3KooWpeer", {"hostname": EVIL_HOST})))
    assert len(lines) == 1  # the newline in the hostname did not start a line
    assert not RAW_CONTROL.search(lines[0])
    doc = json.loads(lines[0])
    assert set(doc) == {"time", "level", "logger", "message", "peer"}
    assert doc["level"] == "info" and doc["logger"] == "kairos.events" and doc["peer"] == "12D3KooWpeer"
    assert doc["message"].startswith("peer joined 12D3KooWpeer (web\x1b]52")  # the text, intact once decoded
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["time"])


def test_text_lines_are_escaped():
    lines = record_lines("text", lambda: on_peer(node=None, event=PeerEvent("joined", "12D3KooWpeer", {"hostname": EVIL_HOST})))
    assert len(lines) == 1 and not RAW_CONTROL.search(lines[0])
    assert "\\x1b]52" in lines[0] and "\\x0a2030" in lines[0]


def test_json_keeps_the_traceback_in_one_line():
    def emit():
        try:
            raise ValueError("boom\x1b[2J")
        except ValueError:
            logging.getLogger("kairos.events").exception("failed", extra={"bucket": "b", "epoch": 3})

    lines = record_lines("json", emit)
    assert len(lines) == 1 and not RAW_CONTROL.search(lines[0])
    doc = json.loads(lines[0])
    assert doc["bucket"] == "b" and doc["epoch"] == 3 and doc["level"] == "error"
    assert "ValueError: boom" in doc["exception"]


def test_unknown_format_and_level_are_refused():
    with pytest.raises(ValueError):
        logs.formatter("xml")
    with pytest.raises(ValueError):
        logs.level_of("loud")
    assert logs.level_of("WARNING") == logging.WARNING


def write_config(path: Path, state: Path, **node) -> None:
    token = path.with_suffix(".token")
    if not token.exists():
        token.write_text(generate_token().encode())
    path.write_text(
        yaml.safe_dump(
            {
                "p2p": {
                    "network_token": token.read_text(),
                    "listen": ["/ip4/127.0.0.1/tcp/0"],
                    "disable_mdns": True,
                    "disable_dht": True,
                },
                "node": {"state_dir": str(state), "hostname": "logger", **node},
            }
        )
    )


class Run:
    """`kairos run` as a process, its stderr read line by line."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([KAIROS, "run", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._partial = b""

    def read_until(self, predicate, timeout: float = 60) -> str:
        import select

        deadline = time.monotonic() + timeout
        fd = self.process.stderr.fileno()
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            chunk = os.read(fd, 65536) if ready else b""
            if ready and not chunk:
                break  # the process ended
            self._partial += chunk
            *complete, self._partial = self._partial.split(b"\n")
            for raw in complete:
                line = raw.decode()
                self.lines.append(line)
                if predicate(line):
                    return line
        raise AssertionError(f"no such line in {self.lines}")

    def stop(self) -> None:
        if self.process.stderr.closed:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        rest = self.process.stderr.read()
        self.process.stderr.close()
        self.lines += [line for line in (self._partial + rest).decode().split("\n") if line]
        self._partial = b""


def test_kairos_run_log_format_json_and_log_level_flags(tmp_path):
    config = tmp_path / "config.yaml"
    write_config(config, tmp_path / "state", log_level="error")
    run = Run("-c", str(config), "--log-format", "json", "--log-level", "info")  # the flags win over the config
    try:
        up = json.loads(run.read_until(lambda line: " up on " in line))
        assert up["level"] == "info" and up["logger"] == "kairos_core.node" and up["peer"].startswith("12D3KooW")
        run.stop()
        assert run.lines and all(json.loads(line)["message"] for line in run.lines if line)
    finally:
        run.stop()


def test_the_config_sets_the_format_and_sighup_rereads_the_level(tmp_path):
    config, state = tmp_path / "config.yaml", tmp_path / "state"
    write_config(config, state, log_level="warning", log_format="text")
    run = Run("-c", str(config))
    try:
        deadline = time.monotonic() + 60
        while not (state / "api.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        write_config(config, state, log_level="info", log_format="json")
        run.process.send_signal(signal.SIGHUP)
        reloaded = json.loads(run.read_until(lambda line: "reload:" in line))
        assert reloaded["level"] == "info" and "re-read" in reloaded["message"]
        assert not any(" up on " in line for line in run.lines)  # at warning, before the reload: not logged
        # a broken config keeps the running settings, and says so
        config.write_text("node: [unclosed")
        run.process.send_signal(signal.SIGHUP)
        warning = json.loads(run.read_until(lambda line: "reload:" in line and "not applied" in line))
        assert warning["level"] == "warning"
        assert run.process.poll() is None  # still running
    finally:
        run.stop()
