"""The ``kairos`` command at first contact (issue #16, item 9), through the real entry point.

- Exit codes are distinct and documented: 1 the operation failed (a missing key), 2 bad usage or
  config, 3 no node reachable; ``--json`` turns an error into one JSON object on stdout.
- ``kairos --version`` and ``kairos version --json`` name the core's and the plugins' versions.
- ``kairos peers`` shows whole peer ids, in a narrow terminal too, and counts "1 peer", "2 peers".
- ``kairos status`` says when a lone node has no members, and what each plugin waits for
  (``NodeView.set_state``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import pytest

from kairos_core import __version__
from kairos_core.api import APIClient
from kairos_core.cli import main
from kairos_core.errors import (
    EXIT_FAILED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ConfigError,
    KairosError,
    NodeUnreachable,
    TokenError,
)
from kairos_core.plugin import hookimpl


def kairos(*argv: str, cwd=None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in its own process (no installed plugin: the core alone)."""
    env = {**os.environ, "KAIROS_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("KAIROS_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "kairos_core", *argv], capture_output=True, text=True, timeout=60, env=env, cwd=cwd
    )


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` in this process: its exit code, stdout and stderr."""
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_the_codes_are_distinct_and_belong_to_the_error_classes():
    assert (EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE) == (1, 2, 3)
    assert KairosError.exit_code == EXIT_FAILED
    assert ConfigError.exit_code == TokenError.exit_code == EXIT_USAGE
    assert NodeUnreachable.exit_code == EXIT_UNREACHABLE and issubclass(NodeUnreachable, KairosError)


def test_no_node_is_exit_3_plain_and_as_json(tmp_path):
    socket = tmp_path / "api.sock"
    for argv in (["status"], ["peers"], ["leader"], ["ledger", "list"]):
        result = kairos(*argv, "--socket", str(socket))
        assert result.returncode == EXIT_UNREACHABLE, result
        assert result.stderr.startswith("kairos: error: no node is running here") and result.stderr.count("\n") == 1
        result = kairos(*argv, "--json", "--socket", str(socket))
        assert result.returncode == EXIT_UNREACHABLE and result.stderr == ""
        error = json.loads(result.stdout)
        assert error["exit_code"] == EXIT_UNREACHABLE and error["error"].startswith("no node is running here")


def test_a_socket_nobody_listens_on_is_exit_3(tmp_path):
    import socket as sockets

    path = tmp_path / "api.sock"
    listener = sockets.socket(sockets.AF_UNIX)
    listener.bind(str(path))
    listener.close()  # the file stays, nobody accepts
    with pytest.raises(NodeUnreachable, match="cannot reach the node"):
        APIClient(path).request("GET", "/api/status")


def test_a_bad_config_and_bad_usage_are_exit_2(tmp_path):
    config = tmp_path / "kairos.yaml"
    config.write_text("p2p:\n  minimum_nodes: many\n")
    result = kairos("-c", str(config), "status")
    assert result.returncode == EXIT_USAGE and "p2p.minimum_nodes" in result.stderr
    result = kairos("-c", str(config), "status", "--json")
    error = json.loads(result.stdout)
    assert result.returncode == error["exit_code"] == EXIT_USAGE and "p2p.minimum_nodes" in error["error"]
    result = kairos("status", "--no-such-option")
    assert result.returncode == EXIT_USAGE and "--no-such-option" in result.stderr
    result = kairos("status", "--no-such-option", "--json")
    assert result.returncode == EXIT_USAGE and json.loads(result.stdout)["exit_code"] == EXIT_USAGE
    result = kairos("token", "show", "not-a-token", "--json")
    assert result.returncode == EXIT_USAGE and json.loads(result.stdout)["exit_code"] == EXIT_USAGE


def test_a_missing_plugin_section_says_what_to_install(tmp_path):
    config = tmp_path / "kairos.yaml"
    config.write_text("vpn:\n  cidr: 10.1.0.0/24\np2p:\n  k3s:\n    enabled: true\n")
    result = kairos("-c", str(config), "status")
    assert result.returncode == EXIT_USAGE
    assert "vpn: unknown section (install kairos-plugin-tunvpn, which provides it)" in result.stderr
    assert "install kairos-plugin-k3s" in result.stderr
    problem = ConfigError("config: 1 problem: bogus: unknown section", ["bogus: unknown section"]).problems
    assert problem == ["bogus: unknown section"]  # no hint for what no known plugin provides


def test_help_documents_the_exit_codes():
    result = kairos("--help")
    assert result.returncode == 0
    for line in ("1  the operation failed", "2  bad usage or input", "3  no node is running here"):
        assert line in result.stdout


def test_version_flag_and_version_json():
    result = kairos("--version")
    assert result.returncode == 0 and result.stdout.splitlines()[0] == f"kairos-core {__version__}"
    result = kairos("version", "--json")
    assert result.returncode == 0 and json.loads(result.stdout) == {"kairos-core": __version__, "plugins": []}


def test_version_lists_the_installed_plugins(capsys):
    # In this process the installed plugins load (the subprocesses above load none).
    code, out, _ = run_main(capsys, "--version")
    data_code, data, _ = run_main(capsys, "version", "--json")
    assert code == data_code == 0
    listed = json.loads(data)
    assert out.splitlines()[0] == f"kairos-core {__version__}" == f"kairos-core {listed['kairos-core']}"
    for row in listed["plugins"]:
        assert f"{row['distribution'] or row['name']} {row['version'] or '?'} (plugin {row['name']})" in out


class Waiting:
    """A plugin that waits for something, and says so through the node."""

    @hookimpl
    def kairos_startup(self, node):
        node.set_state("waiter", "waiting for a sign")


async def test_missing_key_is_exit_1_and_status_shows_a_lone_node_and_plugin_states(kairos_network, capsys, monkeypatch):
    net = await kairos_network(1, plugins=[Waiting()])
    node = net.nodes[0]
    socket = str(node.config.api_socket)
    code, out, err = await asyncio.to_thread(run_main, capsys, "ledger", "get", "nothing", "here", "--socket", socket)
    assert code == EXIT_FAILED and "no key nothing/here" in err
    code, out, err = await asyncio.to_thread(run_main, capsys, "ledger", "get", "nothing", "here", "--json", "--socket", socket)
    assert code == EXIT_FAILED and err == "" and json.loads(out) == {"error": "no key nothing/here", "exit_code": 1}

    await net.wait_for(lambda: node.is_leader)
    code, out, _ = await asyncio.to_thread(run_main, capsys, "status", "--socket", socket)
    assert code == 0
    assert "members:     none yet (this node alone)" in out and "0 alive" not in out
    assert "waiter:      waiting for a sign" in out
    assert re.search(r"^ledger:      \d+ entries \(fingerprint [0-9a-f]{16}\)$", out, re.M), out
    code, out, _ = await asyncio.to_thread(run_main, capsys, "status", "--json", "--socket", socket)
    assert json.loads(out)["states"] == {"waiter": "waiting for a sign"}
    node.set_state("waiter", None)
    code, out, _ = await asyncio.to_thread(run_main, capsys, "status", "--socket", socket)
    assert "waiter" not in out


async def test_peers_shows_whole_ids_and_counts_right(kairos_network, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # a narrow terminal: rich would cut the ids to fit
    net = await kairos_network(2)
    a, b = net.nodes
    await net.fully_connected()
    socket = str(a.config.api_socket)
    await net.wait_for(lambda: b.peer_id in a.members())
    code, out, _ = await asyncio.to_thread(run_main, capsys, "peers", "--socket", socket)
    assert code == 0 and re.search(r"^\s*1 peer\s*$", out, re.M), out
    assert b.peer_id in out  # whole, on one line
    code, out, _ = await asyncio.to_thread(run_main, capsys, "status", "--socket", socket)
    assert "members:     1 alive besides this node, 1 connected" in out

    rows = [
        {
            "peer_id": f"12D3KooW{'x' * 44}{i}",
            "hostname": f"h{i}",
            "alive": True,
            "connected": True,
            "last_seen_s": 1.0,
            "addresses": [f"/ip4/127.0.0.1/tcp/{4000 + i}/p2p/12D3KooW{'x' * 44}{i}"],
        }
        for i in range(2)
    ]
    monkeypatch.setattr(APIClient, "request", lambda self, method, path, **kw: rows)
    code, out, _ = await asyncio.to_thread(run_main, capsys, "peers", "--socket", socket)
    assert code == 0 and "2 peers" in out
    assert all(row["peer_id"] in out for row in rows)
