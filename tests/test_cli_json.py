"""--json on the commands that print data, and errors under --json as one JSON object on stdout."""

from __future__ import annotations

import json

import pytest

from kairos_core.cli import main
from kairos_core.token import parse_token


def run(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_token_new_version_and_config_defaults_print_json(capsys):
    code, out, _ = run(capsys, "token", "new", "--json")
    token = json.loads(out)
    assert code == 0 and parse_token(token["token"]).fingerprint == token["fingerprint"]
    code, out, _ = run(capsys, "version", "--json")
    assert code == 0 and "kairos-core" in json.dumps(json.loads(out))
    code, out, _ = run(capsys, "config", "defaults", "--json")
    assert code == 0 and "p2p" in {section["name"] for section in json.loads(out)}


def test_config_check_json_lists_problems_with_the_exit_code(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("p2p:\n  loglevel: loud\n  bogus: 1\n")
    code, out, err = run(capsys, "config", "check", "--json", str(path))
    report = json.loads(out)
    assert code == 2 and err == ""
    assert report["ok"] is False and report["exit_code"] == 2
    assert set(report["problems"]) == {"p2p.loglevel: 'loud' is not one of debug, info, warning, error", "p2p.bogus: unknown key"}


def test_an_error_under_json_is_one_object_on_stdout(capsys, tmp_path):
    code, out, err = run(capsys, "status", "--json", "--socket", str(tmp_path / "none.sock"))
    assert code == 3 and err == ""
    error = json.loads(out)
    assert set(error) == {"error", "exit_code"} and error["exit_code"] == 3
    code, out, err = run(capsys, "config", "check", "--json", str(tmp_path / "missing.yaml"))
    assert code == 2 and json.loads(out)["exit_code"] == 2 and err == ""
