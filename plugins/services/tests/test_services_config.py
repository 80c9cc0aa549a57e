"""The ``services`` config section: declared with help, and bad entries reported with their path."""

from __future__ import annotations

import subprocess
import sys

import yaml


def kairos(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kairos_core", *args], capture_output=True, text=True, timeout=60)


def test_bad_entries_are_reported_with_their_path(tmp_path):
    config = tmp_path / "kairos.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "services": {
                    "expose": [
                        {"name": "Bad!", "to": "nowhere"},
                        {"name": "web", "to": "127.0.0.1:0", "protocol": "sctp", "x": 1},
                    ],
                    "connect": [
                        {"listen": "127.0.0.1:99999"},
                        {"name": "web", "listen": "::1:80"},
                        {"name": "web", "listen": "[::1]:81"},
                    ],
                    "side_listen": "x",
                }
            }
        )
    )
    done = kairos("config", "check", str(config))
    assert done.returncode == 2, done.stdout + done.stderr
    out = done.stdout + done.stderr
    for line in (
        "services.expose[0].name: service name 'Bad!'",
        "services.expose[0].to: to 'nowhere'",
        "services.expose[1].to: to '127.0.0.1:0': the port must not be 0",
        "services.expose[1]: unknown key(s) x",
        "services.expose[1].protocol: tcp or udp, not 'sctp'",
        "services.connect[0]: needs name",
        "services.connect[0].listen: listen '127.0.0.1:99999'",
        "services.connect: web given more than once",
        "services.side_listen 'x': expected HOST:PORT",
    ):
        assert line in out
    assert "Traceback" not in out


def test_a_good_section_passes_and_every_option_has_help(tmp_path):
    config = tmp_path / "kairos.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "services": {
                    "expose": [
                        {"name": "web", "to": "127.0.0.1:8080", "description": "the wiki"},
                        {"name": "dns", "to": "[::1]:53", "protocol": "udp"},
                    ],
                    "connect": [{"name": "db", "listen": "127.0.0.1:5432"}],
                    "max_connections_per_peer": 8,
                }
            }
        )
    )
    assert kairos("config", "check", str(config)).returncode == 0
    defaults = kairos("config", "defaults", "--json")
    assert defaults.returncode == 0
    assert '"services"' in defaults.stdout and "(no help)" not in defaults.stdout.split('"services"')[1][:4000]
