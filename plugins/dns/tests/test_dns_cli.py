"""``kairos dns add|rm|list`` against a real ``kairos run`` process (Kairos's ``p2p.dns: true`` in
its config file), checked with ``dig``; and ``kairos config check`` of a bad ``dns`` section."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from importlib.metadata import entry_points

import pytest
import yaml
from dnstools import DIG, NEEDS_DIG

from kairos_core.plugin import APIClient, KairosError
from kairos_testing.localnodes import spawn_kairos, stop_process


def kairos(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kairos_core", *args], capture_output=True, text=True, timeout=60)


def dig_short(port: int, *args: str) -> list[str]:
    done = subprocess.run(
        [DIG or "dig", "@127.0.0.1", "-p", str(port), "+tries=1", "+time=5", "+short", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout.split()


@pytest.fixture
def node(tmp_path):
    token = kairos("token", "new").stdout.strip()
    others = sorted({ep.name for ep in entry_points(group="kairos")} - {"dns"})
    config = {
        "p2p": {
            "network_token": token,
            "listen": ["/ip4/127.0.0.1/tcp/0"],
            "disable_mdns": True,
            "disable_dht": True,
            "dns": True,
        },
        "node": {"state_dir": str(tmp_path), "hostname": "cli0"},
        "plugins": {"disabled": others},
        "dns": {"listen": "127.0.0.1:0", "resolv_conf": "/dev/null"},
    }
    process = spawn_kairos(tmp_path, config)
    socket_path = tmp_path / "api.sock"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                APIClient(socket_path).request("GET", "/api/status")
                break
            except KairosError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "node.log").read_text()) from None
                time.sleep(0.2)
        yield str(socket_path)
    finally:
        stop_process(process)


@pytest.mark.skipif(DIG is None, reason=NEEDS_DIG)
def test_add_list_rm_through_the_cli_are_served(node):
    listing = json.loads(kairos("dns", "list", "--json", "--socket", node).stdout)
    assert listing["server"] is not None, "p2p.dns: true did not turn the server on"
    port = int(listing["server"]["listen"].rpartition(":")[2])
    added = kairos("dns", "add", "web", "A", "10.1.0.9", "--socket", node)
    assert added.returncode == 0 and added.stdout.strip() == "web.kairos. 60 A 10.1.0.9", added.stderr
    assert kairos("dns", "add", "web", "A", "10.1.0.10", "--ttl", "5", "--socket", node).returncode == 0
    assert kairos("dns", "add", "*.apps", "a", "10.1.1.1", "--socket", node).returncode == 0
    assert sorted(dig_short(port, "web.kairos.")) == ["10.1.0.10", "10.1.0.9"]
    assert dig_short(port, "x.apps.kairos.") == ["10.1.1.1"]
    text = kairos("dns", "list", "--socket", node).stdout
    assert "*.apps.kairos." in text and "10.1.0.9 10.1.0.10" in text and f"127.0.0.1:{port}" in text
    bad = kairos("dns", "add", "web", "A", "10.1.0.300", "--socket", node)
    assert bad.returncode != 0 and "not an IP address" in bad.stderr + bad.stdout and "Traceback" not in bad.stderr
    assert kairos("dns", "rm", "web", "A", "10.1.0.9", "--socket", node).returncode == 0
    assert dig_short(port, "web.kairos.") == ["10.1.0.10"]
    removed = json.loads(kairos("dns", "rm", "web", "--json", "--socket", node).stdout)
    assert removed == {"name": "web.kairos.", "removed": ["A"]}
    assert dig_short(port, "web.kairos.") == []
    missing = kairos("dns", "rm", "web", "--socket", node)
    assert missing.returncode == 1 and "no record web.kairos." in missing.stderr + missing.stdout


def test_a_bad_section_is_reported_with_its_paths(tmp_path):
    path = tmp_path / "kairos.yaml"
    path.write_text(yaml.safe_dump({"dns": {"ttl": -1}}))
    done = kairos("config", "check", str(path))
    assert done.returncode == 2 and "dns.ttl: must be between 0 and 86400, not -1" in done.stdout + done.stderr
    path.write_text(yaml.safe_dump({"dns": {"configure_resolver": True, "listen": "127.0.0.1:5353"}}))
    done = kairos("config", "check", str(path))
    assert done.returncode == 2 and "dns.configure_resolver: resolv.conf names no port" in done.stdout + done.stderr
    path.write_text(
        yaml.safe_dump({"dns": {"listen": "localhost:53", "forward": ["1.1.1.1:0", "nowhere"], "domain": "bad domain"}})
    )
    done = kairos("config", "check", str(path))
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    for line in (
        "dns.listen: 'localhost' does not appear",
        "dns.forward[0]: the port must not be 0",
        "dns.forward[1]: 'nowhere'",
        "dns.domain 'bad domain': labels are",
    ):
        assert line in out
    assert "Traceback" not in out
