"""Network tokens: generation, both forms, EdgeVPN/Kairos compatibility, and every malformed case."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kairos_core.cli import main
from kairos_core.errors import TokenError
from kairos_core.token import KEY_ALPHABET, generate_token, parse_token

# Built from the format the reference describes: EdgeVPN `edgevpn -g` (interval 360) and Kairos
# `generate-token` (interval = max int64, i.e. never rotating).
EDGEVPN_YAML = """\
otp:
  dht:
    interval: 360
    key: 3sPZdUqOyY6FQgM0vxS6UZ3UzGhDB8NoZZWwAQzzqmB
    length: 43
  crypto:
    interval: 360
    key: 9nVuJc5b0mWqDGQ2UH03dHkqKqFyy0nDw9FmdSkS4a7
    length: 43
room: Lq5bWk9FaQzXDV7CbnSyIolxqyhvrJMrl0ZY2aJx0oT
rendezvous: f8YxWTZsJ1R3mB2PD1O4xqN8aLcpvQ3Gz6KhUiE0jfs
mdns: TxB2yqWv9lKdPe7NmG4rHs1uCj0ZaF3QoX6iVnYbSkE
max_message_size: 20971520
"""
KAIROS_YAML = EDGEVPN_YAML.replace("interval: 360", "interval: 9223372036854775807")


def run_cli(capsys, *argv, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


def test_generated_token_has_edgevpn_shape():
    token = generate_token()
    doc = yaml.safe_load(base64.b64decode(token.encode()))
    assert set(doc) == {"otp", "room", "rendezvous", "mdns", "max_message_size"}
    for section in ("dht", "crypto"):
        spec = doc["otp"][section]
        assert spec["interval"] == 360 and spec["length"] == 43
        assert len(spec["key"]) == 43 and set(spec["key"]) <= set(KEY_ALPHABET)
    assert doc["max_message_size"] == 20971520
    assert generate_token().room != token.room  # fresh secrets every time


def test_round_trip_base64_and_yaml():
    token = generate_token(interval=60)
    assert parse_token(token.encode()) == token
    assert parse_token(token.to_yaml()) == token
    assert parse_token(token.encode().encode()) == token  # bytes too


@pytest.mark.parametrize("text", [EDGEVPN_YAML, KAIROS_YAML])
def test_reference_tokens_parse_in_both_forms(text):
    from_yaml = parse_token(text)
    from_b64 = parse_token(base64.b64encode(text.encode()).decode())
    assert from_yaml == from_b64
    assert from_yaml.dht.key == "3sPZdUqOyY6FQgM0vxS6UZ3UzGhDB8NoZZWwAQzzqmB"
    assert from_yaml.max_message_size == 20971520


def test_kairos_token_never_rotates_and_still_derives_keys():
    from kairos_core.keys import KeySchedule

    schedule = KeySchedule(parse_token(KAIROS_YAML))
    assert schedule.seal_window() == 0
    assert len(schedule.seal_key(0)) == 32
    # window 0 forever: there is no previous window to announce or look up
    assert schedule.current_rendezvous() == (schedule.rendezvous(0),)
    from kairos_core.seal import Sealer

    assert Sealer(schedule).open(Sealer(schedule).seal(b"x")) == b"x"


def test_base64_wrapped_over_lines_and_urlsafe_parse():
    token = generate_token()
    encoded = token.encode()
    wrapped = "\n".join(encoded[i : i + 60] for i in range(0, len(encoded), 60))
    assert parse_token(wrapped) == token
    urlsafe = base64.urlsafe_b64encode(token.to_yaml().encode()).decode().rstrip("=")
    assert parse_token(urlsafe) == token


def test_all_digit_key_is_read_as_string():
    text = EDGEVPN_YAML.replace("Lq5bWk9FaQzXDV7CbnSyIolxqyhvrJMrl0ZY2aJx0oT", "1234567")
    assert parse_token(text).room == "1234567"


def b64(doc) -> str:
    return base64.b64encode(yaml.safe_dump(doc).encode()).decode()


def good_doc():
    return yaml.safe_load(EDGEVPN_YAML)


def mutated(path, value):
    doc = good_doc()
    node = doc
    for part in path[:-1]:
        node = node[part]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return b64(doc)


MALFORMED = {
    "empty": ("", "empty"),
    "spaces": ("   \n", "empty"),
    "not base64": ("this is *not* a token!", "neither base64 nor YAML"),
    "binary base64": (base64.b64encode(bytes(range(256))).decode(), "binary data"),
    "base64 of a list": (base64.b64encode(b"- a\n- b\n").decode(), "mapping"),
    "bad yaml": ("otp: [unclosed", "not valid YAML"),
    "no otp": (b64({"room": "x"}), "no 'otp'"),
    "otp not mapping": (mutated(["otp"], "x"), "'otp' must be a mapping"),
    "no dht": (mutated(["otp", "dht"], KeyError), "otp.dht"),
    "no crypto key": (mutated(["otp", "crypto", "key"], KeyError), "otp.crypto.key' is missing"),
    "empty key": (mutated(["otp", "dht", "key"], ""), "otp.dht.key' is empty"),
    "interval zero": (mutated(["otp", "dht", "interval"], 0), "must be positive"),
    "interval negative": (mutated(["otp", "crypto", "interval"], -5), "must be positive"),
    "interval string": (mutated(["otp", "dht", "interval"], "soon"), "must be an integer"),
    "interval bool": (mutated(["otp", "dht", "interval"], True), "must be an integer"),
    "room list": (mutated(["room"], ["a"]), "'room' must be a string"),
    "no mdns": (mutated(["mdns"], KeyError), "'mdns' is missing"),
    "tiny max message": (mutated(["max_message_size"], 10), "max_message_size"),
    "megabytes": ("A" * (3 * 1024 * 1024), "too large"),
    # Input that used to escape as RecursionError or ValueError (an "internal error", exit 1).
    "deep yaml": ("otp: " + "[" * 10000, "nested"),
    "deep base64": (base64.b64encode(("otp: " + "[" * 10000).encode()).decode(), "nested"),
    "deep flow mapping": ("{" + "a: {" * 3000, "nested"),
    "nested past the bound": ("otp: " + "[" * 50 + "]" * 50, "nested"),
    "5000-digit integer": (base64.b64encode(("otp: " + "1" * 5000).encode()).decode(), "not valid YAML"),
    "impossible date": ("otp:\n  dht: 2024-13-45\n", "not valid YAML"),
    "interval beyond int64": (mutated(["otp", "dht", "interval"], 2**63), "otp.dht.interval"),
    "huge interval": (mutated(["otp", "dht", "interval"], 10**4000), "otp.dht.interval"),
    "huge length": (mutated(["otp", "crypto", "length"], 10**400), "otp.crypto.length"),
    "huge max message": (mutated(["max_message_size"], 10**400), "max_message_size"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_token_raises_named_error(name):
    text, expected = MALFORMED[name]
    with pytest.raises(TokenError) as exc:
        parse_token(text)
    message = str(exc.value)
    assert expected in message
    assert "\n" not in message
    assert len(message) < 200  # never the whole offending value


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_token_cli_gives_one_line_and_exit_2(name, capsys, monkeypatch):
    text, expected = MALFORMED[name]
    code, out, err = run_cli(capsys, "token", "show", "-", stdin=text, monkeypatch=monkeypatch)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("kairos: error: ")
    assert expected in err
    assert "Traceback" not in err


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=2000), st.binary(max_size=2000)))
def test_parse_never_raises_anything_but_token_error(data):
    try:
        parse_token(data)
    except TokenError:
        pass


def test_show_masks_secrets(capsys):
    token = generate_token()
    code, out, err = run_cli(capsys, "token", "show", token.encode())
    assert code == 0 and err == ""
    assert token.fingerprint in out
    for secret in (token.dht.key, token.crypto.key, token.room, token.rendezvous, token.mdns):
        assert secret not in out
        assert secret[:3] + "…(43 chars)" in out


def test_new_pipes_into_show_as_real_commands():
    kairos = [sys.executable, "-m", "kairos_core"]
    new = subprocess.run([*kairos, "token", "new"], capture_output=True, text=True, check=True)
    show = subprocess.run([*kairos, "token", "show", "-", "--json"], input=new.stdout, capture_output=True, text=True)
    assert show.returncode == 0, show.stderr
    import json

    shown = json.loads(show.stdout)
    assert shown["fingerprint"] == parse_token(new.stdout).fingerprint
    assert shown["otp"]["dht"]["interval"] == 360


def test_new_with_interval_and_yaml_form(capsys):
    code, out, _ = run_cli(capsys, "token", "new", "--interval", "42", "--yaml")
    assert code == 0
    assert parse_token(out).crypto.interval == 42
    code, _, err = run_cli(capsys, "token", "new", "--interval", "0")
    assert code == 2 and "interval" in err.lower()
