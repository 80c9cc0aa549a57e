"""`kairos demo` as a user runs it: a real subprocess whose nodes answer `kairos status --socket`,
whose narration says each change once with its timings, and which removes its state on SIGTERM."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

KAIROS = [sys.executable, "-c", "import sys; from kairos_core.cli import main; main(sys.argv[1:])"]


def _read_until(process, pattern, timeout=120.0):
    """Lines of the demo's stdout up to the first that matches ``pattern``.

    A thread reads the lines (select() on the pipe would miss lines already in the file's buffer).
    """
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = process.lines.get(timeout=1.0)
        except queue.Empty:
            if process.poll() is not None and process.lines.empty():
                break
            continue
        if line is None:
            break
        lines.append(line.rstrip("\n"))
        if re.search(pattern, line):
            return lines
    raise AssertionError("demo output so far:\n" + "\n".join(lines))


def _pump(stream, into):
    for line in stream:
        into.put(line)
    into.put(None)


@pytest.fixture
def demo(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KAIROS_DISABLE_PLUGIN_AUTOLOAD": "1"}
    # stderr to a file: a pipe nobody reads would stall the demo once it filled
    with open(tmp_path / "stderr", "w+") as stderr:
        process = subprocess.Popen([*KAIROS, "demo", "-n", "3"], stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        process.stderr_file = tmp_path / "stderr"
        process.lines = queue.Queue()
        reader = threading.Thread(target=_pump, args=(process.stdout, process.lines), daemon=True)
        reader.start()
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)


def test_the_demo_can_be_inspected_narrates_once_and_cleans_up_on_sigterm(demo):
    lines = _read_until(demo, r"running; Ctrl-C to stop")
    text = "\n".join(lines)
    root = Path(re.search(r"state in (\S+)", text).group(1))
    sockets = re.findall(r"kairos status --socket (\S+)", text)
    assert len(sockets) == 3 and root.is_dir()
    # the nodes answer the CLI while the demo runs (the stopped leader's socket is gone)
    answers = [
        subprocess.run([*KAIROS, "status", "--json", "--socket", path], capture_output=True, text=True, timeout=60)
        for path in sockets
    ]
    alive = [json.loads(answer.stdout) for answer in answers if answer.returncode == 0]
    assert len(alive) == 2, [answer.stderr for answer in answers]
    assert {status["peer_id"] for status in alive} <= set(re.findall(r"node\d is (\S+)", text))
    assert all(answer.returncode == 3 for answer in answers if answer.returncode != 0)  # no node there
    # timings and the epoch are explained; the stopped leader is said to have left once
    assert re.search(r"fail-over took \d+\.\d\d s", text)
    assert "the epoch counts leaders" in text
    stopped = re.search(r"stopping the leader (node\d)", text).group(1)
    about_it = [match.group(1) for line in lines if (match := re.search(rf" s {stopped} (joined|left|updated)\b", line))]
    assert about_it == ["joined", "left"], text
    assert re.search(rf"{stopped} left \(first seen by node\d, \d+\.\d\d s after it stopped\)", text)

    demo.send_signal(signal.SIGTERM)
    demo.wait(timeout=60)
    out = "\n".join(_read_until(demo, r"^stopped", timeout=30))
    err = demo.stderr_file.read_text()
    assert demo.returncode == 0, err
    assert "the nodes are down" in out and "Traceback" not in err
    assert not root.exists()
