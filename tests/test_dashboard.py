"""The dashboard's TCP listener (api.http_listen) on real nodes: off by default, nothing without the
token, the token compared and kept 0600, the cookie login, which routes it serves, writes; the
dashboard at / of the unix socket without a token; ``kairos dashboard --url``."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys

import httpx
import pytest

from kairos_core import dashboard
from kairos_core.api import APIClient
from kairos_core.errors import KairosError


async def kairos_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kairos_core", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


async def test_off_by_default(kairos_network):
    net = await kairos_network(1)
    node = net.nodes[0]
    assert node.config["api"]["http_listen"] == ""
    assert node.api.http_address is None and node.api.dashboard_url() is None
    assert not (node.config.state_dir / dashboard.TOKEN_FILE).exists()  # no token made for nothing
    code, out, err = await kairos_cli("dashboard", "--url", "--socket", str(node.config.api_socket))
    assert code != 0 and "api.http_listen" in err and "Traceback" not in err


async def test_the_unix_socket_serves_the_dashboard_without_a_token(kairos_network):
    net = await kairos_network(1)
    node = net.nodes[0]
    transport = httpx.AsyncHTTPTransport(uds=str(node.config.api_socket))
    async with httpx.AsyncClient(transport=transport, base_url="http://kairos") as client:
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert b"/dashboard/app.js" in page.content
        assert "script-src 'self'" in page.headers["content-security-policy"]
        script = await client.get("/dashboard/app.js")
        assert script.status_code == 200 and b"textContent" in script.content and b"innerHTML" not in script.content
        assert (await client.get("/dashboard/nothing.js")).status_code == 404
        node.ledger.set("b", "k", {"x": 1})
        entries = (await client.get("/api/entries/b")).json()
        assert entries == [
            {
                "bucket": "b",
                "key": "k",
                "value": {"x": 1},
                "owner": node.peer_id,
                "version": list(node.ledger.get_entry("b", "k").version),
                "deleted": False,
            }
        ]


async def test_the_tcp_listener_needs_the_token(kairos_network):
    net = await kairos_network(1, overrides={"api": {"http_listen": "127.0.0.1:0"}})
    node = net.nodes[0]
    host, port = node.api.http_address
    assert host == "127.0.0.1" and port > 0
    token_file = node.config.state_dir / dashboard.TOKEN_FILE
    assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 32

    code, out, err = await kairos_cli("dashboard", "--url", "--socket", str(node.config.api_socket))
    assert code == 0, err
    assert out.strip() == f"http://127.0.0.1:{port}/?token={token}"
    code, out, _ = await kairos_cli("dashboard", "--socket", str(node.config.api_socket))
    assert code == 0 and out.strip() == f"http://127.0.0.1:{port}/" and token not in out

    wrong = token[:-1] + ("A" if token[-1] != "A" else "B")
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
        # no token: 401 everywhere, the page included
        for path in ("/", "/api/status", "/api/ledger", "/metrics", "/dashboard/app.js"):
            assert (await client.get(path)).status_code == 401, path
        assert (await client.put("/api/ledger/b/k", content=b"1")).status_code == 401
        # a wrong token, in each of the three places it may come
        assert (await client.get("/", params={"token": wrong})).status_code == 401
        assert (await client.get("/api/status", headers={"authorization": f"Bearer {wrong}"})).status_code == 401
        assert (await client.get("/api/status", headers={"cookie": f"{dashboard.cookie_name(port)}={wrong}"})).status_code == 401
        assert (await client.get("/api/status", headers={"cookie": 'garbage="\\'})).status_code == 401
        # the right one
        status = await client.get("/api/status", headers={"authorization": f"Bearer {token}"})
        assert status.status_code == 200 and status.json()["peer_id"] == node.peer_id
    assert node.ledger.get("b", "k") is None

    # a browser: ?token= once, then the cookie
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as browser:
        login = await browser.get("/", params={"token": token})
        assert login.status_code == 303 and login.headers["location"] == "/"
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        # the cookie is a session of this port, never the token (browsers send it to every port)
        assert token not in cookie and cookie.startswith(dashboard.cookie_name(port) + "=")
        page = await browser.get("/")
        assert page.status_code == 200 and b"/dashboard/app.js" in page.content
        assert (await browser.get("/api/peers")).status_code == 200
        # a write on the cookie alone (what a cross-site form could send) is refused ...
        refused = await browser.put("/api/ledger/b/k", content=b'"v"')
        assert refused.status_code == 403 and dashboard.WRITE_HEADER in refused.json()["error"]
        assert node.ledger.get("b", "k") is None
        # ... the dashboard's own write, with its header, goes through
        written = await browser.put("/api/ledger/b/k", content=b'"v"', headers={dashboard.WRITE_HEADER: "1"})
        assert written.status_code == 200 and node.ledger.get("b", "k") == "v"
        # what the dashboard does not use is not served over TCP, token or not
        for method, path in (
            ("POST", "/api/token/rotate"),
            ("POST", f"/api/revoked/{node.peer_id}"),
            ("DELETE", "/api/ledger/b/k"),
            ("GET", "/api/dashboard/login"),
            ("GET", "/api/revoked"),
        ):
            response = await browser.request(method, path, headers={dashboard.WRITE_HEADER: "1"})
            assert response.status_code == 403, (method, path)
        assert node.ledger.get("b", "k") == "v"
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as script:
        written = await script.put("/api/ledger/b/k2", content=b"2", headers={"authorization": f"Bearer {token}"})
        assert written.status_code == 200 and node.ledger.get("b", "k2") == 2
        # the core's buckets are not written over TCP even with the token: a revocation written
        # there would be final for the whole network (found in review: PUT went through)
        revocation = {"peer": "12D3KooWvictim", "by": node.peer_id, "epoch": 1, "at": 1.0}
        for bucket, key, value in (
            ("revoked", f"12D3KooWvictim:{node.peer_id}", revocation),
            ("leader", f"99:{node.peer_id}", {"state": "held"}),
            ("nodes", node.peer_id, {"hostname": "forged"}),
            ("rotation", f"x:{node.peer_id}", {}),
        ):
            refused = await script.put(
                f"/api/ledger/{bucket}/{key}", content=json.dumps(value).encode(), headers={"authorization": f"Bearer {token}"}
            )
            assert refused.status_code == 403 and bucket in refused.json()["error"], bucket
        assert node.ledger.get("revoked", f"12D3KooWvictim:{node.peer_id}") is None
        assert (node.ledger.get("nodes", node.peer_id) or {}).get("hostname") != "forged"

    await node.stop()
    with pytest.raises(OSError):  # the listener closed with the node
        await asyncio.open_connection(host, port)


async def test_the_tcp_listener_holds_a_bounded_number_of_connections(kairos_network):
    from kairos_core.api import MAX_WEB_CONNECTIONS

    net = await kairos_network(1, overrides={"api": {"http_listen": "127.0.0.1:0"}})
    node = net.nodes[0]
    host, port = node.api.http_address
    idle = [await asyncio.open_connection(host, port) for _ in range(MAX_WEB_CONNECTIONS)]
    try:
        for _ in range(50):  # until the server has taken every one of them
            if node.api._web_connections == MAX_WEB_CONNECTIONS:
                break
            await asyncio.sleep(0.05)
        reader, writer = await asyncio.open_connection(host, port)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer
        # the unix socket is not affected
        client = APIClient(node.config.api_socket)
        assert (await asyncio.to_thread(client.request, "GET", "/api/status"))["peer_id"] == node.peer_id
    finally:
        for _, idle_writer in idle:
            idle_writer.close()
    token = (node.config.state_dir / dashboard.TOKEN_FILE).read_text().strip()
    for _ in range(100):  # the slots free as the connections close
        if node.api._web_connections == 0:
            break
        await asyncio.sleep(0.05)
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}") as client:
        response = await client.get("/api/status", headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 200


async def test_the_token_is_kept_across_restarts(tmp_path):
    first = dashboard.load_token(tmp_path)
    assert dashboard.load_token(tmp_path) == first
    assert stat.S_IMODE(os.stat(tmp_path / dashboard.TOKEN_FILE).st_mode) == 0o600
    (tmp_path / dashboard.TOKEN_FILE).write_text("short\n")  # damaged: a new one, not a weak one
    assert dashboard.load_token(tmp_path) not in (first, "short")
    assert dashboard.token_matches(first, first) and not dashboard.token_matches(first, first[:-1])
    assert not dashboard.token_matches(first, None) and not dashboard.token_matches(first, "\udcff")


async def test_a_bad_http_listen_is_one_clear_error(kairos_network):
    with pytest.raises(KairosError, match="api.http_listen"):
        await kairos_network(1, overrides={"api": {"http_listen": "localhost"}})


def test_parse_http_listen():
    assert dashboard.parse_http_listen("8480") == ("127.0.0.1", 8480)
    assert dashboard.parse_http_listen("[::1]:8480") == ("::1", 8480)
    assert dashboard.parse_http_listen("0.0.0.0:8480") == ("0.0.0.0", 8480)
    for bad in ("host:", "h:99999", "nothing"):
        with pytest.raises(KairosError, match="api.http_listen"):
            dashboard.parse_http_listen(bad)


def test_a_session_cookie_is_good_for_its_port_and_its_time_only():
    token, port, now = "t" * 43, 8123, 1_800_000_000.0
    value = dashboard.session_cookie(token, port, now=now)
    header = f"{dashboard.cookie_name(port)}={value}"
    assert dashboard.session_valid(token, port, header, now=now + 60)
    assert not dashboard.session_valid(token, port, header, now=now + dashboard.SESSION_SECONDS + 1)  # expired
    assert not dashboard.session_valid(token, 8124, header, now=now)  # another listener's
    assert not dashboard.session_valid(token, 8124, f"{dashboard.cookie_name(8124)}={value}", now=now)
    assert not dashboard.session_valid("u" * 43, port, header, now=now)  # the token file was replaced
    expires = value.split(".")[0]
    for forged in (token, f"{int(expires) + 3600}.{value.split('.')[1]}", "garbage", "", "1.2.3"):
        assert not dashboard.session_valid(token, port, f"{dashboard.cookie_name(port)}={forged}", now=now), forged
