"""Peer-supplied text never reaches the operator's terminal raw: CLI tables, plain and JSON
output, and log lines escape control characters (OSC 52 clipboard writes, title changes, forged
log lines)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from kairos_testing.fakenode import FakeNode

from kairos_core.api import APIServer
from kairos_core.cli import main, setup_logging
from kairos_core.eventlog import on_peer
from kairos_core.events import PeerEvent
from kairos_core.untrusted import EscapingFormatter, escape_control

CLIPBOARD = "\x1b]52;c;cm0gLXJmIH4=\x07"  # OSC 52: write "rm -rf ~" to the clipboard
TITLE = "\x1b]0;pwned\x1b\\"  # OSC 0 ended by ST: retitle the window
CSI = "\x9b2J"  # the one-byte C1 CSI: clear the screen on terminals that honour C1
EVIL_HOST = f"web{CLIPBOARD}{TITLE}{CSI}\n2030-01-01 00:00:00 INFO kairos.events: forged"
RAW_CONTROLS = ("\x1b", "\x07", "\x9b")


def assert_no_raw_controls(text: str) -> None:
    for char in RAW_CONTROLS:
        assert char not in text, f"raw {char!r} reached the terminal: {text!r}"


def test_escape_control_makes_every_control_character_visible():
    assert escape_control("plain text, ünïcode, 日本, back\\slash") == "plain text, ünïcode, 日本, back\\slash"
    assert escape_control("a\x1b]52;c;x\x07b") == "a\\x1b]52;c;x\\x07b"
    assert escape_control("line\nfeed\rtab\t\x00\x7f\x9b") == "line\\x0afeed\\x0dtab\\x09\\x00\\x7f\\x9b"
    assert escape_control("\u202eevil\u2028\u2066") == "\\u202eevil\\u2028\\u2066"
    assert escape_control("lone \ud800") == "lone \\ud800"  # printable now: no UnicodeEncodeError
    assert escape_control(12) == "12"


def untrusted_node() -> FakeNode:
    """A node whose peers, leader and own status carry hostile text; the ledger is real."""
    node = FakeNode(hostname=EVIL_HOST, network_id=f"kairos{TITLE}")
    node.token_fingerprint = "0123"
    node.set_leader(f"12D3KooWpeer{CLIPBOARD}", 3)
    node.advertised = [f"/ip4/1.2.3.4/tcp/1{CSI}"]
    node.count("dropped_frames")
    node.add_peer("12D3KooWpeer", {"hostname": EVIL_HOST, "addresses": [f"/ip4/1.2.3.4/tcp/1{TITLE}", "/ip4/5.6.7.8/tcp/2"]})
    node.neighbour_ids.add("12D3KooWpeer")
    node.add_peer("12D3KooWother", {"hostname": "[bold red]markup[/]", "addresses": []}, last_seen_s=None)
    return node


@pytest.fixture
async def served(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps cells at the terminal width
    node = untrusted_node()
    server = APIServer(node, tmp_path / "api.sock")
    await server.start()
    yield node, str(server.socket_path)
    await server.stop()
    await node.aclose()


async def run_cli(capsys, *argv: str) -> tuple[str, str]:
    capsys.readouterr()
    try:
        await asyncio.to_thread(main, list(argv))
    except SystemExit as exc:
        assert exc.code in (0, None), capsys.readouterr()
    captured = capsys.readouterr()
    return captured.out, captured.err


async def test_peers_status_and_leader_escape_peer_strings(served, capsys):
    _, socket = served
    out, _ = await run_cli(capsys, "peers", "--socket", socket)
    assert_no_raw_controls(out)
    assert "\\x1b]52;c;cm0gLXJmIH4=\\x07" in out and "\\x0a2030-01-01" in out and "\\x9b2J" in out
    assert "[bold red]markup[/]" in out  # shown as written, not taken as rich markup
    assert "forged" not in [line.split(" ", 1)[0] for line in out.splitlines()]
    out, _ = await run_cli(capsys, "status", "--socket", socket)
    assert_no_raw_controls(out)
    assert len([line for line in out.splitlines() if line.startswith("peer id:")]) == 1
    assert "INFO kairos.events: forged" not in [line[:28] for line in out.splitlines()]
    out, _ = await run_cli(capsys, "leader", "--socket", socket)
    assert_no_raw_controls(out)
    assert out == "12D3KooWpeer\\x1b]52;c;cm0gLXJmIH4=\\x07 epoch 3\n"


async def test_json_output_is_escaped_by_json_and_round_trips(served, capsys):
    _, socket = served
    out, _ = await run_cli(capsys, "peers", "--socket", socket, "--json")
    assert_no_raw_controls(out)
    assert {peer["peer_id"]: peer for peer in json.loads(out)}["12D3KooWpeer"]["hostname"] == EVIL_HOST
    out, _ = await run_cli(capsys, "status", "--socket", socket, "--json")
    assert_no_raw_controls(out)
    assert json.loads(out)["hostname"] == EVIL_HOST
    out, _ = await run_cli(capsys, "leader", "--socket", socket, "--json")
    assert_no_raw_controls(out)
    assert json.loads(out)["peer_id"] == f"12D3KooWpeer{CLIPBOARD}"


async def test_ledger_list_escapes_buckets_and_keys(served, capsys):
    node, socket = served
    node.ledger.set(f"apps{TITLE}", f"web{CLIPBOARD}\nforged\tline", f"value{CSI}\x1b[2J")
    out, _ = await run_cli(capsys, "ledger", "list", "--socket", socket)
    assert_no_raw_controls(out)
    assert out == "apps\\x1b]0;pwned\\x1b\\\n"
    out, _ = await run_cli(capsys, "ledger", "list", f"apps{TITLE}", "--socket", socket)
    assert_no_raw_controls(out)
    assert out.count("\n") == 1  # the newline in the key does not start a second row
    key, value = out.rstrip("\n").split("\t")
    assert key == "web\\x1b]52;c;cm0gLXJmIH4=\\x07\\x0aforged\\x09line"
    assert json.loads(value) == f"value{CSI}\x1b[2J"
    for command in (
        ["ledger", "list", f"apps{TITLE}", "--json"],
        ["ledger", "get", f"apps{TITLE}", f"web{CLIPBOARD}\nforged\tline"],
    ):
        out, _ = await run_cli(capsys, *command, "--socket", socket)
        assert_no_raw_controls(out)


async def test_an_error_naming_a_peer_string_stays_one_escaped_line(served, capsys):
    _, socket = served
    with pytest.raises(SystemExit) as exc:
        await asyncio.to_thread(main, ["ledger", "get", "b", f"k{CLIPBOARD}\nkairos: forged", "--socket", socket])
    err = capsys.readouterr().err
    assert exc.value.code == 1  # a missing key: the operation failed
    assert_no_raw_controls(err)
    assert err.count("\n") == 1 and err.startswith("kairos: error: no key b/k\\x1b]52")


def test_log_lines_escape_peer_strings_and_cannot_be_forged(capsys, monkeypatch):
    monkeypatch.setattr(logging.root, "handlers", [])  # pytest's own handlers would stop basicConfig
    monkeypatch.setattr(logging.root, "level", logging.root.level)
    setup_logging(logging.INFO)
    handler = logging.root.handlers[0]
    assert isinstance(handler.formatter, EscapingFormatter)
    on_peer(node=None, event=PeerEvent("joined", "12D3KooWpeer", {"hostname": EVIL_HOST}))
    err = capsys.readouterr().err
    assert_no_raw_controls(err)
    assert err.count("\n") == 1, err
    assert "peer joined 12D3KooWpeer (web\\x1b]52;c;cm0gLXJmIH4=\\x07" in err and "\\x0a2030-01-01" in err


def test_tracebacks_keep_their_lines_but_lose_escapes(capsys):
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("test_untrusted_text")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            raise ValueError(f"bad {CLIPBOARD}")
        except ValueError:
            log.exception("failed for %s", EVIL_HOST)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    err = capsys.readouterr().err
    assert_no_raw_controls(err)
    lines = err.splitlines()
    assert lines[0].startswith("ERROR failed for web\\x1b]52") and lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: bad \\x1b]52;c;cm0gLXJmIH4=\\x07"


def test_ledger_watch_reports_a_dropped_stream_and_fails(capsys, monkeypatch, tmp_path):
    from kairos_core.api import APIClient

    def stream(self, path, **kwargs):
        yield {"bucket": "b", "key": f"k{CLIPBOARD}", "value": 1}
        yield {"error": f"watch dropped: the client fell more than 262144 bytes behind{TITLE}"}

    monkeypatch.setattr(APIClient, "stream", stream)
    with pytest.raises(SystemExit) as exc:
        main(["ledger", "watch", "--socket", str(tmp_path / "api.sock")])
    captured = capsys.readouterr()
    assert exc.value.code == 1
    assert json.loads(captured.out)["key"] == f"k{CLIPBOARD}"  # escaped by json.dumps
    assert_no_raw_controls(captured.out + captured.err)
    assert captured.err.startswith("kairos: error: watch dropped: the client fell more than 262144 bytes behind\\x1b")
