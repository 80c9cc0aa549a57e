"""The local control API: HTTP over a unix socket (mode 0600) in the state dir.

Only local users who can open the socket (root, or the node's own user) may use it, so it needs no
authentication of its own. ``curl --unix-socket /var/lib/kairos/api.sock http://kairos/api/status``
works as well as ``kairos status``.

Routes (JSON in and out):

- ``GET /api/status`` — this node, the leader, member count, counters
- ``GET /api/peers`` — every known peer, whether it is alive, and for a connected one its
  ``transport`` (direct, relayed or punched) and ``rtt_ms`` (smoothed round-trip time)
- ``GET /api/ledger`` — bucket names; ``GET /api/ledger/{bucket}`` — that bucket's items
- ``GET|PUT|DELETE /api/ledger/{bucket}/{key}`` — one key (PUT body: the JSON value)
- ``GET /api/watch[?bucket=B]`` — newline-delimited JSON, one line per change, until closed
- ``GET /api/doctor`` — the checks of ``kairos doctor`` (:mod:`.doctor`)
- ``GET /metrics`` — Prometheus text exposition (:mod:`.metrics`); also on ``api.metrics_listen``
  (TCP, off by default), where it is the only route
- ``GET /`` (and ``/dashboard/*``) — the web dashboard (:mod:`.dashboard`); also on
  ``api.http_listen`` (TCP, off by default), where every request needs the dashboard token and
  only the routes the dashboard reads (and ``PUT`` of a ledger key) are served
- ``GET /api/entries/{bucket}`` — that bucket's live entries with owner and version
- ``GET /api/dashboard/login`` — (unix socket only) the dashboard URL with its token
- ``GET /api/revoked`` — the revocations in force here; ``POST /api/revoked/{peer_id}`` (body
  ``{"reason": …}``, optional) — revoke a peer, on the leader only (400 naming the leader
  elsewhere); answers ``{"revocation": …, "written": bool}`` (false: it was revoked already)
- ``POST /api/token/rotate`` — on the leader only: a new network token for every member
  (kairos_core.rotation); answers its fingerprint, the one it replaces, the members and the end
  of the grace window

Bad input is a 400 with a one-line ``{"error": …}``, whatever it is (JSON nested too deeply to
parse included); a 500 means a bug. A watch client that falls more than ``WATCH_CLIENT_BUFFER``
bytes behind is dropped: its stream ends with an ``{"error": "watch dropped: …"}`` line, the
ledger counts it in ``watch_dropped``, and the connection is cut after ``WATCH_CLOSE_GRACE``
seconds if the client still does not read. So a client that never reads pins a bounded amount of
memory, not every update written since it stopped.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from contextlib import suppress
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import httpx

from . import dashboard
from .errors import KairosError, NodeUnreachable
from .plugins import call_hook_sync

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1024 * 1024
# A client that sends nothing for this long is dropped (watches excepted once they started).
IDLE_TIMEOUT = 60.0
# Bytes a watch client may have waiting in our send buffer (beyond what the kernel holds) before
# it is dropped. One update larger than this still goes out to a client that keeps up.
WATCH_CLIENT_BUFFER = 256 * 1024
# Seconds a closing connection gets to flush what it still has to send; then it is cut, so a
# client that never reads cannot hold its buffer (or this server's shutdown) forever.
WATCH_CLOSE_GRACE = 5.0
# Connections the dashboard's TCP listener (api.http_listen) holds at once: a browser tab uses a
# few (the page, its polls, one watch); past this a new one is answered 503 and closed, so
# clients without the token cannot hold the node's sockets by the thousand.
MAX_WEB_CONNECTIONS = 32
# Over TCP (the dashboard's and the metrics listener) a whole request, its head and body, must
# arrive within this once its first byte came: a per-read timeout alone let a client sending one
# byte every minute hold a connection for weeks. (A kept-alive connection may still idle for
# IDLE_TIMEOUT between requests, as browsers expect: closing it sooner races their next request.)
TCP_REQUEST_DEADLINE = 10.0


class _Reply:
    """What a route returns: a status and a JSON body (or bytes of ``content_type``), and any
    further headers."""

    def __init__(
        self, body: Any, status: int = 200, content_type: str | None = None, headers: list[tuple[str, str]] | None = None
    ) -> None:
        self.body = body
        self.status = status
        self.content_type = content_type
        self.headers = headers or []


def _error(status: int, message: str) -> _Reply:
    return _Reply({"error": message}, status)


class APIServer:
    """Serves one node's API on a unix socket.

    HTTP/1.1 parsing is h11's (already loaded by the p2p stack); the server itself is a few
    coroutines on asyncio's unix-socket server — a web framework would cost ~8 MB of RSS on
    every node for six routes.
    """

    def __init__(self, node: Node, socket_path: Path | None, *, metrics_listen: str | None = None) -> None:
        self.node = node
        self.socket_path = Path(socket_path) if socket_path is not None else None
        # api.metrics_listen: a TCP listener that serves GET /metrics and nothing else (no
        # authentication there, so nothing that reads the ledger or changes anything)
        self.metrics_listen = metrics_listen
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()
        self._metrics = None  # built on the first scrape: prometheus_client only when asked for
        # api.http_listen (read at start, beside the unix socket): the dashboard over TCP, every
        # request behind the dashboard token (kairos_core.dashboard)
        self.http_listen: str | None = None
        self._http_server: asyncio.AbstractServer | None = None
        self._dashboard_token: str | None = None
        self._web_connections = 0

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``(host, port)`` the metrics listener is bound to (the port chosen when 0 was asked)."""
        if self.metrics_listen is None or self._server is None:
            return None
        return self._server.sockets[0].getsockname()[:2]

    @property
    def http_address(self) -> tuple[str, int] | None:
        """``(host, port)`` the dashboard's TCP listener is bound to, None when it is off."""
        if self._http_server is None:
            return None
        return self._http_server.sockets[0].getsockname()[:2]

    def dashboard_url(self, *, with_token: bool = True) -> str | None:
        """The dashboard's URL over TCP (with ``?token=`` to log in), None when it is off."""
        address = self.http_address
        if address is None:
            return None
        host, port = address
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}/" + (f"?token={self._dashboard_token}" if with_token else "")

    async def start(self) -> None:
        """Bind the socket (replacing a stale one) with mode 0600, or the metrics listener."""
        if self.metrics_listen is not None:
            from .metrics import parse_listen

            host, port = parse_listen(self.metrics_listen)
            self._server = await asyncio.start_server(functools.partial(self._serve, tcp=True), host=host, port=port)
            return
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with suppress(FileNotFoundError):
            self.socket_path.unlink()  # left by a node that was killed
        old_umask = os.umask(0o177)  # the socket is created 0600: no window with looser rights
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.socket_path))
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)
        await self._start_http()

    async def _start_http(self) -> None:
        """Open ``api.http_listen`` when it is set: the dashboard over TCP, behind its token."""
        listen = self.node.config["api"].get("http_listen") if hasattr(self.node, "config") else None
        if not listen:
            return
        host, port = dashboard.parse_http_listen(listen)
        self._dashboard_token = dashboard.load_token(self.node.config.state_dir)
        self.http_listen = listen
        self._http_server = await asyncio.start_server(functools.partial(self._serve, web=True, tcp=True), host=host, port=port)

    async def stop(self) -> None:
        """Close the socket and every open connection (watches included)."""
        if self._http_server is not None:
            self._http_server.close()
            self._http_server = None
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await asyncio.gather(*self._connections, return_exceptions=True)
            with suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
        if self.socket_path is not None:
            with suppress(FileNotFoundError):
                self.socket_path.unlink()

    # --- connections -------------------------------------------------------------------------
    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, web: bool = False, tcp: bool = False
    ) -> None:
        """One client connection. ``web``: the dashboard's listener; ``tcp``: any TCP listener (the
        dashboard's or the metrics one): at most MAX_WEB_CONNECTIONS at once, each request within
        TCP_REQUEST_DEADLINE. The unix socket (0600, the operator's) has neither limit."""
        task = asyncio.current_task()
        if tcp and self._web_connections >= MAX_WEB_CONNECTIONS:
            with suppress(Exception):
                writer.write(
                    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                    b"connection: close\r\ncontent-length: 41\r\n\r\n"
                    b'{"error": "too many connections at once"}'
                )
                await writer.drain()
            await _close(writer, 1.0)
            return
        self._web_connections += tcp
        self._connections.add(task)
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        try:
            while True:
                request, body = await self._read_request(
                    connection, reader, writer, request_deadline=TCP_REQUEST_DEADLINE if tcp else None
                )
                if request is None:
                    return
                reusable = await self._respond(connection, writer, reader, request, body, web=web)
                if not reusable or connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            if connection.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # say why, then hang up
                with suppress(Exception):
                    await self._send(connection, writer, _error(400, f"not HTTP/1.1: {exc}"))
        except (asyncio.CancelledError, ConnectionError, asyncio.IncompleteReadError, h11.ProtocolError, TimeoutError):
            pass
        finally:
            self._connections.discard(task)
            self._web_connections -= tcp
            await _close(writer, WATCH_CLOSE_GRACE)

    async def _read_request(
        self,
        connection: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request_deadline: float | None = None,
    ) -> tuple[h11.Request | None, bytes]:
        """The next request and its body; ``(None, b"")`` when the client is done. Waiting for a
        request's first byte may take IDLE_TIMEOUT; with ``request_deadline`` the rest of it must
        follow within that many seconds."""
        request, body = None, bytearray()
        loop = asyncio.get_running_loop()
        deadline: float | None = None  # set at the request's first byte (request_deadline)
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                timeout = IDLE_TIMEOUT if deadline is None else max(0.0, deadline - loop.time())
                data = await asyncio.wait_for(reader.read(65536), timeout)
                if data and deadline is None and request_deadline is not None:
                    deadline = loop.time() + request_deadline
                connection.receive_data(data)
                if not data and connection.their_state is h11.IDLE:
                    return None, b""
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_REQUEST_BYTES:
                    await self._send(connection, writer, _error(413, f"the body exceeds {MAX_REQUEST_BYTES} bytes"))
                    return None, b""
            elif isinstance(event, h11.EndOfMessage):
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                return None, b""

    async def _send(self, connection: h11.Connection, writer: asyncio.StreamWriter, reply: _Reply) -> None:
        if reply.content_type is not None:
            payload, content_type = reply.body, reply.content_type
        else:
            payload, content_type = json.dumps(reply.body, default=str).encode(), "application/json"
        headers = [("content-type", content_type), ("content-length", str(len(payload))), *reply.headers]
        writer.write(connection.send(h11.Response(status_code=reply.status, headers=headers)))
        writer.write(connection.send(h11.Data(data=payload)))
        writer.write(connection.send(h11.EndOfMessage()))
        await writer.drain()

    async def _respond(
        self,
        connection: h11.Connection,
        writer: asyncio.StreamWriter,
        reader: asyncio.StreamReader,
        request: h11.Request,
        body: bytes,
        *,
        web: bool = False,
    ) -> bool:
        """Answer one request; False when the connection cannot serve another (a watch ended)."""
        method = request.method.decode()
        url = urlsplit(request.target.decode("ascii", "replace"))
        try:
            parts = [unquote(part, errors="strict") for part in url.path.split("/")[1:]]
        except UnicodeDecodeError:  # never guess a key: "%ED%A0%80" is not text
            await self._send(connection, writer, _error(400, "the path is not valid UTF-8"))
            return True
        if self.metrics_listen is not None and parts != ["metrics"]:
            await self._send(connection, writer, _error(404, "only /metrics is served here"))
            return True
        if web:  # api.http_listen: nothing without the token, and only what the dashboard uses
            refusal = self._web_gate(method, url, request, parts)
            if refusal is not None:
                await self._send(connection, writer, refusal)
                return True
        if method == "GET" and parts == ["api", "doctor"]:
            from .doctor import diagnose

            try:
                reply = _Reply(await diagnose(self.node))
            except Exception as exc:  # a bug: one line to the client and a traceback in the log
                log.exception("API doctor failed")
                reply = _error(500, f"internal error: {type(exc).__name__}: {exc}")
            await self._send(connection, writer, reply)
            return True
        if method == "GET" and parts == ["api", "watch"]:
            bucket = (parse_qs(url.query).get("bucket") or [None])[0]
            await self._watch(connection, writer, reader, bucket)
            return False
        try:
            reply = self._route(method, parts, body)
        except KairosError as exc:
            reply = _error(400, str(exc))
        except Exception as exc:  # a bug: one line to the client and a traceback in the log
            log.exception("API %s %s failed", method, url.path)
            reply = _error(500, f"internal error: {type(exc).__name__}: {exc}")
        await self._send(connection, writer, reply)
        return True

    # --- routes ------------------------------------------------------------------------------
    def _route(self, method: str, parts: list[str], body: bytes) -> _Reply:
        node, ledger = self.node, self.node.ledger
        if parts == ["metrics"]:
            if method != "GET":
                return _error(405, f"{method} is not allowed here")
            if self._metrics is None:
                from .metrics import NodeMetrics

                self._metrics = NodeMetrics(node)
            from .metrics import CONTENT_TYPE

            return _Reply(self._metrics.render(), content_type=CONTENT_TYPE)
        page = dashboard.asset("/".join(parts)) if method == "GET" else None
        if page is not None:
            return _Reply(page[0], content_type=page[1], headers=dashboard.SECURITY_HEADERS)
        if parts[:1] != ["api"]:
            return _error(404, "not found")
        route = parts[1:]
        if method == "GET" and route == ["status"]:
            return _Reply(node.status())
        if method == "GET" and route == ["peers"]:
            return _Reply(node.describe_peers())
        if method == "POST" and route == ["token", "rotate"]:
            return _Reply(node.rotate_token())
        if method == "GET" and route == ["revoked"]:
            return _Reply([record.as_dict() for record in node.revocations.in_force()])
        if method == "POST" and len(route) == 2 and route[0] == "revoked":
            try:
                request = json.loads(body) if body else {}
            except (ValueError, UnicodeDecodeError, RecursionError):
                return _error(400, "the body must be a JSON object")
            reason = request.get("reason", "") if isinstance(request, dict) else None
            if not isinstance(reason, str):
                return _error(400, 'the body must be {"reason": "<text>"}')
            record, written = node.revoke(route[1], reason)
            return _Reply({"revocation": record, "written": written})
        if method == "GET" and route == ["dashboard", "login"]:
            url = self.dashboard_url()
            if url is None:
                return _error(400, "the dashboard is not served over TCP: set api.http_listen (e.g. 127.0.0.1:8480)")
            return _Reply({"url": url, "listen": self.http_listen, "address": list(self.http_address)})
        if method == "GET" and len(route) == 2 and route[0] == "entries":
            entries = (ledger.get_entry(route[1], key) for key in sorted(ledger.items(route[1])))
            return _Reply([entry_to_dict(entry) for entry in entries if entry is not None])
        if method == "GET" and route == ["ledger"]:
            return _Reply(sorted(ledger.buckets()))
        if method == "GET" and len(route) == 2 and route[0] == "ledger":
            return _Reply(ledger.items(route[1]))
        if len(route) == 3 and route[0] == "ledger":
            bucket, key = route[1], route[2]
            if method == "GET":
                entry = ledger.get_entry(bucket, key)
                if entry is None or entry.deleted:
                    return _error(404, f"no key {bucket}/{key}")
                return _Reply(entry_to_dict(entry))
            if method == "PUT":
                try:
                    value = json.loads(body)
                except (ValueError, UnicodeDecodeError):
                    return _error(400, "the body must be a JSON value")
                except RecursionError:  # "[[[[…": the parser recurses once per level
                    return _error(400, "the body is JSON nested too deeply")
                return _Reply(entry_to_dict(ledger.set(bucket, key, value)))
            if method == "DELETE":
                return _Reply(entry_to_dict(ledger.delete(bucket, key)))
            return _error(405, f"{method} is not allowed here")
        if len(route) >= 2 and route[0] == "plugins":
            return self._plugin_route(method, route[1], route[2:], body)
        return _error(404, "not found")

    def _web_gate(self, method: str, url: Any, request: h11.Request, parts: list[str]) -> _Reply | None:
        """Over ``api.http_listen``: None when the request may go on, else the refusal.

        The token comes as ``?token=`` (answered with a redirect that sets the cookie, so it
        leaves the address bar), the cookie, or ``Authorization: Bearer``; a write authenticated
        by the cookie also needs the dashboard's own header (no cross-site form can send it).
        """
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in request.headers}
        expected = self._dashboard_token or ""
        offered = (parse_qs(url.query).get("token") or [None])[0]
        if offered is not None:
            if not dashboard.token_matches(expected, offered):
                return _error(401, "wrong dashboard token (kairos dashboard --url prints the right one)")
            return _Reply(
                {"login": "ok"},
                303,
                headers=[("location", url.path or "/"), ("set-cookie", dashboard.login_cookie(expected, self._http_port()))],
            )
        bearer = dashboard.bearer_token(headers.get("authorization"))
        if not (
            dashboard.token_matches(expected, bearer)
            if bearer is not None
            else dashboard.session_valid(expected, self._http_port(), headers.get("cookie"))
        ):
            return _error(401, "login needed: open the URL `kairos dashboard --url` prints")
        path = "/".join(parts)
        readable = (
            dashboard.asset(path) is not None
            or parts == ["metrics"]
            or parts[:2] in (["api", "ledger"], ["api", "entries"])
            or parts in (["api", "status"], ["api", "peers"], ["api", "watch"], ["api", "doctor"])
        )
        if method == "GET" and readable:
            return None
        if method == "PUT" and len(parts) == 4 and parts[:2] == ["api", "ledger"]:
            from .plugin import CORE_BUCKETS  # here: kairos_core.plugin imports this module

            if parts[2].rsplit("/", 1)[-1] in CORE_BUCKETS:
                # a revocation or a lease written over TCP is final for the whole network: the
                # dashboard's token is not an operator's authority (docs/security.md)
                return _error(403, f"the core bucket {parts[2]!r} is not written over api.http_listen (use the unix socket)")
            if bearer is None and headers.get(dashboard.WRITE_HEADER) != "1":
                return _error(403, f"a write from the browser needs the {dashboard.WRITE_HEADER} header")
            return None
        return _error(403, f"{method} /{path} is not served over api.http_listen (use the unix socket)")

    def _http_port(self) -> int:
        address = self.http_address
        return address[1] if address else 0

    def _plugin_route(self, method: str, name: str, rest: list[str], body: bytes) -> _Reply:
        """``/api/plugins/<name>/…``: the handler a plugin named in ``kairos_api_routes``."""
        handlers: dict[str, Any] = {}
        for table in call_hook_sync(self.node.manager, "kairos_api_routes", node=self.node).results:
            if isinstance(table, dict):
                handlers.update(table)
        handler = handlers.get(name)
        if handler is None:
            return _error(404, f"no plugin serves /api/plugins/{name}")
        try:
            value = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError, RecursionError):
            return _error(400, "the body must be a JSON value")
        return _Reply(handler(method, rest, value))

    async def _watch(
        self,
        connection: h11.Connection,
        writer: asyncio.StreamWriter,
        reader: asyncio.StreamReader,
        bucket: str | None,
    ) -> None:
        headers = [("content-type", "application/x-ndjson")]  # no length: h11 sends it chunked
        writer.write(connection.send(h11.Response(status_code=200, headers=headers)))
        await writer.drain()
        watch = self.node.ledger.watch(bucket)
        # A watch never ends by itself: end it when the client goes away, which only a read shows.
        hung_up = asyncio.ensure_future(reader.read(1))
        update: asyncio.Future | None = None
        try:
            while True:
                update = asyncio.ensure_future(watch.__anext__())
                done, _ = await asyncio.wait({update, hung_up}, return_when=asyncio.FIRST_COMPLETED)
                if hung_up in done:
                    update.cancel()
                    return
                line = watch_line(update.result())
                # Lines are queued on the transport without waiting for the client, so the
                # ledger's watch queue never backs up; the transport's buffer is the one queue,
                # and it is bounded here.
                behind = writer.transport.get_write_buffer_size()
                if behind and behind + len(line) > WATCH_CLIENT_BUFFER:
                    # The watch is closed on the way out (finally), before the connection's
                    # grace to flush: nothing more is queued for this client meanwhile.
                    self._drop_watch(connection, writer, behind)
                    return
                writer.write(connection.send(h11.Data(data=line)))
        except StopAsyncIteration:
            writer.write(connection.send(h11.EndOfMessage()))
            await writer.drain()
        finally:
            hung_up.cancel()
            if update is not None and not update.done():
                # Cancelled mid-wait (the API stopping): the close below would end this read
                # with StopAsyncIteration that nobody takes, logged as an error at exit.
                update.cancel()
            with suppress(Exception):
                await watch.aclose()

    def _drop_watch(self, connection: h11.Connection, writer: asyncio.StreamWriter, behind: int) -> None:
        """End the stream of a watch client that stopped reading: count it and say why, as the
        last line (the connection then closes, within ``WATCH_CLOSE_GRACE``)."""
        self.node.ledger.count("watch_dropped")
        log.warning("API watch client dropped: %d bytes behind (limit %d)", behind, WATCH_CLIENT_BUFFER)
        reason = {"error": f"watch dropped: the client fell more than {WATCH_CLIENT_BUFFER} bytes behind"}
        writer.write(connection.send(h11.Data(data=(json.dumps(reason) + "\n").encode())))
        writer.write(connection.send(h11.EndOfMessage()))


async def _close(writer: asyncio.StreamWriter, grace: float) -> None:
    """Close after flushing for at most ``grace`` seconds, then cut: a peer that never reads must
    not keep the connection (and what it has not read) alive."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), grace)
    except TimeoutError:
        writer.transport.abort()
        with suppress(Exception):
            await writer.wait_closed()
    except Exception:  # the peer reset the connection: it is closed, which is all we wanted
        pass


def watch_line(update: Any) -> bytes:
    """One line of a watch stream: the update as JSON, never an exception.

    The record is built field by field (``dataclasses.asdict`` deep-copies the value and ran out
    of stack at ~500 levels); a value that still cannot be encoded (nested past what json can
    walk, stored before values had a depth bound) is replaced by an ``error``, so one bad value
    does not end the stream.
    """
    record = {field.name: getattr(update, field.name) for field in fields(update)}
    try:
        return (json.dumps(record, default=str) + "\n").encode()
    except RecursionError:
        problem = "nested too deeply to encode"
    except (ValueError, TypeError) as exc:  # a circular structure from a plugin's update
        problem = f"cannot be encoded: {exc}"
    record["value"] = None
    record["error"] = f"value not shown: {problem}"
    return (json.dumps(record, default=str) + "\n").encode()


def entry_to_dict(entry: Any) -> dict[str, Any]:
    """A ledger entry as the API shows it (signature omitted)."""
    return {
        "bucket": entry.bucket,
        "key": entry.key,
        "value": None if entry.deleted else entry.value,
        "owner": entry.owner,
        "version": list(entry.version),
        "deleted": entry.deleted,
    }


class APIClient:
    """A small synchronous client for the CLI."""

    def __init__(self, socket_path: Path, timeout: float = 10.0) -> None:
        self.socket_path = Path(socket_path)
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket_path)), base_url="http://kairos", timeout=timeout
        )

    def _check_socket(self) -> None:
        if not self.socket_path.exists():
            raise NodeUnreachable(f"no node is running here: {self.socket_path} does not exist (start one with `kairos run`)")

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call; :class:`KairosError` with the API's message on failure,
        :class:`NodeUnreachable` (exit code 3) when no node answers at the socket."""
        self._check_socket()
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise NodeUnreachable(f"cannot reach the node at {self.socket_path}: {exc}") from None
        data = response.json() if response.content else None
        if response.status_code >= 400:
            message = data.get("error") if isinstance(data, dict) else response.text
            raise KairosError(message or f"HTTP {response.status_code}")
        return data

    def stream(self, path: str, **kwargs: Any):
        """Yield one decoded JSON object per line of a streaming route."""
        self._check_socket()
        try:
            with self._client.stream("GET", path, timeout=None, **kwargs) as response:
                for line in response.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.TransportError as exc:
            raise NodeUnreachable(f"lost the node at {self.socket_path}: {exc}") from None
