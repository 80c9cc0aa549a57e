"""The dashboard in a real browser (headless Chromium driven by Selenium) against a real network:
three ``kairos run`` processes on loopback (no namespaces: the browser, its driver and the nodes
share the host's loopback), node 1 serving the dashboard on api.http_listen.

Checked: the login URL of ``kairos dashboard --url`` logs the browser in; the summary counts 3
members; the drawn graph has the 3 members and the 3 links, each labelled with its transport and
RTT (and the VPN's path where one is known); a hostname that is HTML shows as text
(no element made of it, its script never runs); ledger writes made on other nodes appear in the
ledger view without a reload, and a write from the dashboard's form reaches the other nodes.
Screenshots go to the test's tmp dir; the first load time is printed (not asserted).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kairos_core.api import APIClient
from kairos_core.errors import KairosError
from kairos_core.token import generate_token
from kairos_plugin_tunvpn.addressing import Claim

selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install selenium)")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None, reason="needs the Debian packages chromium and chromium-driver"),
]

XSS_HOSTNAME = '<img src=x onerror="window.__xss=1">'


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Nodes:
    """``kairos run`` processes on loopback, each with its state dir under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.token = generate_token()
        self.processes: list[subprocess.Popen] = []
        self.clients: list[APIClient] = []
        self.ports: list[int] = []

    def start(self, hostname: str, bootstrap: list[str], api: dict | None = None) -> APIClient:
        index = len(self.processes)
        state = self.root / f"node{index}"
        state.mkdir(parents=True)
        port = free_port()
        config = {
            "p2p": {
                "network_token": self.token.encode(),
                "listen": [f"/ip4/127.0.0.1/tcp/{port}"],
                "disable_mdns": True,
                "disable_dht": True,
                "bootstrap_peers": bootstrap,
            },
            "node": {"state_dir": str(state), "hostname": hostname},
            "api": api or {},
        }
        (state / "kairos.yaml").write_text(yaml.safe_dump(config))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "KAIROS_DISABLE_PLUGIN_AUTOLOAD": "1"}
        with open(state / "node.log", "ab") as log:
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "kairos_core", "run", "-c", str(state / "kairos.yaml")],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            )
        client = APIClient(state / "api.sock", timeout=5.0)
        self.clients.append(client)
        self.ports.append(port)
        return client

    def logs(self) -> str:
        return "\n".join(
            f"--- node{i}\n{(self.root / f'node{i}' / 'node.log').read_text(errors='replace')[-2000:]}"
            for i in range(len(self.processes))
        )

    def wait(self, condition, what: str, timeout: float = 90.0):
        deadline = time.monotonic() + timeout
        while True:
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"a node exited ({process.returncode}) while waiting for {what}\n{self.logs()}")
            try:
                result = condition()
                if result:
                    return result
            except (KairosError, KeyError, TypeError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not reached in {timeout} s\n{self.logs()}")
            time.sleep(0.2)

    def peer_id(self, index: int) -> str:
        return self.wait(lambda: self.clients[index].request("GET", "/api/status")["peer_id"], f"node{index} up")

    def multiaddr(self, index: int) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.ports[index]}/p2p/{self.peer_id(index)}"

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def short_id(peer_id: str) -> str:
    return peer_id[-6:]


def text(driver, selector: str) -> list[str]:
    """The text of every element matching ``selector``, read in one go (the page redraws its tables
    and graph every few seconds, so element handles go stale)."""
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent)", selector)


def link_pairs(nodes_bucket: dict) -> set[frozenset]:
    return {
        frozenset((peer, other)) for peer, entry in nodes_bucket.items() for other in entry.get("neighbours", []) if other != peer
    }


@pytest.fixture
def network(tmp_path):
    nodes = Nodes(tmp_path / "nodes")
    yield nodes
    nodes.stop()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_the_dashboard_in_chromium(network, browser, tmp_path):
    http_port = free_port()
    first = network.start("alpha", [], api={"http_listen": f"127.0.0.1:{http_port}"})
    seed = network.multiaddr(0)
    network.start("beta", [seed])
    second = network.multiaddr(1)
    network.start(XSS_HOSTNAME, [seed, second])
    ids = [network.peer_id(i) for i in range(3)]
    # the network is whole: node 1 sees both others alive, and the 3 entries vouch for 3 links
    network.wait(lambda: sum(row["alive"] for row in first.request("GET", "/api/peers")) == 2, "2 peers alive")
    network.wait(lambda: len(link_pairs(first.request("GET", "/api/ledger/nodes"))) == 3, "3 links announced")

    # What tunvpn publishes, written by each node through its API in tunvpn's own format (a running
    # tunvpn needs TUN devices in namespaces; its tests check what it writes): address claims and
    # node 1's paths to the others, one over UDP, one relayed by beta (tunvpn names the relay by
    # its peer id; the graph by its hostname).
    vips = ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
    for index, vip in enumerate(vips):
        claim = Claim(ids[index], ipaddress.IPv4Address(vip), 5000 + index, (int(time.time() * 1000), 0))
        network.clients[index].request("PUT", f"/api/ledger/vpn/{ids[index]}", content=json.dumps(claim.to_value()))
    paths = {
        ids[1]: {"path": "udp", "vip": vips[1], "endpoint": "127.0.0.1:5001"},
        ids[2]: {"path": f"relay via {ids[1]}", "vip": vips[2], "endpoint": None},
    }
    first.request("PUT", f"/api/ledger/vpn/{ids[0]}%2Flinks", content=json.dumps(paths))

    url = subprocess.run(
        [sys.executable, "-m", "kairos_core", "dashboard", "--url", "--socket", str(tmp_path / "nodes" / "node0" / "api.sock")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert url.startswith(f"http://127.0.0.1:{http_port}/?token=")
    wait = WebDriverWait(browser, 30, poll_frequency=0.1)

    started = time.monotonic()
    browser.get(url)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
    wall_ms = (time.monotonic() - started) * 1000
    in_page_ms = float(browser.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
    print(
        json.dumps(
            {
                "dashboard_first_load_ms": round(wall_ms, 1),
                "in_page_ms": round(in_page_ms, 1),
                "note": "driver.get() of the login URL (303 + cookie) until the first data is drawn; "
                "3 kairos run processes + chromium on the 2 shared cores",
            }
        )
    )
    assert "?token" not in browser.current_url  # the redirect took the token out of the address bar
    assert browser.get_cookie(f"kairos_dashboard_{http_port}")["httpOnly"] is True
    browser.execute_script("window.__loadedOnce = true")  # gone if the page ever reloads

    wait.until(lambda d: text(d, "#summary-members") == ["3"])
    assert text(browser, "#summary-hostname") == ["alpha"]
    assert text(browser, "#summary-peer-id") == [ids[0]]
    # the leader may be elected after the page first drew: it shows it by its next refresh
    network.wait(lambda: first.request("GET", "/api/status")["leader"] is not None, "a leader")
    leader = first.request("GET", "/api/status")["leader"]
    wait.until(lambda d: text(d, "#summary-leader") not in (["none yet"], []))
    # the epochs table, from the leases in the ledger: its newest row is the leader now
    wait.until(lambda d: text(d, "#leader-history tbody tr:first-child td")[:1] == [str(leader["epoch"])])
    assert short_id(leader["peer_id"]) in text(browser, "#leader-history tbody tr:first-child td")[1]
    browser.save_screenshot(str(tmp_path / "summary.png"))

    browser.find_element(By.CSS_SELECTOR, 'nav a[data-page="peers"]').click()
    wait.until(lambda d: len(text(d, "#graph g.member")) == 3 and len(text(d, "#graph line.link")) == 3)
    drawn = browser.execute_script(
        "return [...document.querySelectorAll('#graph line.link')]"
        ".map((l) => [l.getAttribute('data-a'), l.getAttribute('data-b')])"
    )
    assert {frozenset(pair) for pair in drawn} == {
        frozenset(pair) for pair in ((ids[0], ids[1]), (ids[0], ids[2]), (ids[1], ids[2]))
    }
    assert sorted(text(browser, "#graph .member-label")) == sorted(["alpha", "beta", XSS_HOSTNAME])
    # Each link's label: the connection's kind and its RTT — node 1's two links measured by node 1,
    # the third (beta to the third node) as those two published it in their `nodes` entries — then
    # the VPN's path where it knows one (node 1's two).
    rtt_label = re.compile(r"direct · \d+(\.\d)? ms( · vpn (relay via beta|udp))?")
    wait.until(lambda d: len(labels := text(d, "#graph .link-label")) == 3 and all(rtt_label.fullmatch(t) for t in labels))
    labels = text(browser, "#graph .link-label")
    assert sorted(label.rsplit(" · ", 1)[-1] for label in labels if "vpn" in label) == ["vpn relay via beta", "vpn udp"], labels
    rtts = browser.execute_script(
        "return [...document.querySelectorAll('#graph .link-label')].map((t) => Number(t.getAttribute('data-rtt-ms')))"
    )
    assert all(0 < rtt < 1000 for rtt in rtts), rtts  # loopback: well under a second each
    # the hostname that is HTML is text: in the graph, in the peers table, and nowhere an element
    assert XSS_HOSTNAME in text(browser, "#peers tbody td")
    assert text(browser, "#peers tbody td").count("auto") == 2  # p2p.role of both peers: none set
    # the rtt column: the table is drawn from its own poll, which may lag the graph's (a CI run
    # found one of the two cells still empty here)
    wait.until(lambda d: sum(bool(rtt_label.fullmatch("direct · " + cell)) for cell in text(d, "#peers tbody td")) == 2)
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0
    assert browser.execute_script("return window.__xss === undefined")
    browser.save_screenshot(str(tmp_path / "peers.png"))

    browser.find_element(By.CSS_SELECTOR, 'nav a[data-page="ledger"]').click()
    # written on node 2: the bucket appears in the list through the watch stream, no reload
    network.clients[1].request("PUT", "/api/ledger/dash/first", content=json.dumps({"from": "beta"}))
    wait.until(
        lambda d: d.execute_script(
            "const a = document.querySelector('#buckets a[data-bucket=\"dash\"]'); if (a) a.click(); return !!a"
        )
    )
    wait.until(lambda d: text(d, '#entries tr[data-key="first"]'))
    # written on node 3 while the bucket is open: its row appears, with its owner, no reload
    network.clients[2].request("PUT", "/api/ledger/dash/second", content=json.dumps(XSS_HOSTNAME))
    cells = wait.until(lambda d: text(d, '#entries tr[data-key="second"] td'))
    assert cells[1] == XSS_HOSTNAME and cells[3] == json.dumps(XSS_HOSTNAME)
    assert browser.execute_script("return window.__loadedOnce === true")

    # a write from the dashboard's form (over TCP, on the cookie and the dashboard's header)
    form = browser.find_element(By.ID, "set-form")
    for name, typed in (("bucket", "dash"), ("key", "from-browser"), ("value", '{"n": 1}')):
        field = form.find_element(By.NAME, name)
        field.clear()
        field.send_keys(typed)
    form.find_element(By.TAG_NAME, "button").click()
    wait.until(lambda d: text(d, "#set-result") == ["written"])
    wait.until(lambda d: text(d, '#entries tr[data-key="from-browser"]'))
    network.wait(
        lambda: network.clients[2].request("GET", "/api/ledger/dash/from-browser")["value"] == {"n": 1},
        "the browser's write on node 3",
        timeout=30,
    )
    assert browser.execute_script("return document.querySelectorAll('img').length") == 0
    browser.save_screenshot(str(tmp_path / "ledger.png"))

    browser.find_element(By.CSS_SELECTOR, 'nav a[data-page="vpn"]').click()
    wait.until(lambda d: sorted(set(text(d, "#vips tbody td")) & set(vips)) == vips)
    links = browser.execute_script(
        "return [...document.querySelectorAll('#vpn-links tbody tr')].map((r) => [...r.children].map((c) => c.textContent))"
    )
    assert sorted(links) == sorted(
        [["alpha", "beta", "udp", vips[1], "127.0.0.1:5001"], ["alpha", XSS_HOSTNAME, f"relay via {ids[1]}", vips[2], "–"]]
    )
    browser.save_screenshot(str(tmp_path / "vpn.png"))
    browser.find_element(By.CSS_SELECTOR, 'nav a[data-page="plugins"]').click()
    assert browser.find_element(By.ID, "page-plugins").is_displayed()
    assert "ledger_applied" in text(browser, "#counters tbody td")
    browser.save_screenshot(str(tmp_path / "plugins.png"))
    assert browser.find_element(By.ID, "error").is_displayed() is False
    print(f"screenshots in {tmp_path}")
