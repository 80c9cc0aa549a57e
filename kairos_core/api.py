"""The local control API: HTTP over a unix socket (mode 0600) in the state dir.

Only local users who can open the socket (root, or the node's own user) may use it, so it needs no
authentication of its own. ``curl --unix-socket /var/lib/kairos/api.sock http://kairos/api/status``
works as well as ``kairos status``.

Routes (JSON in and out):

- ``GET /api/status`` — this node, the leader, member count, counters
- ``GET /api/peers`` — every known peer and whether it is alive
- ``GET /api/ledger`` — bucket names; ``GET /api/ledger/{bucket}`` — that bucket's items
- ``GET|PUT|DELETE /api/ledger/{bucket}/{key}`` — one key (PUT body: the JSON value)
- ``GET /api/watch[?bucket=B]`` — newline-delimited JSON, one line per change, until closed
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from aiohttp import web

from .errors import KairosError

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1024 * 1024


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda obj: json.dumps(obj, default=str))


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status=status)


class APIServer:
    """Serves one node's API on a unix socket."""

    def __init__(self, node: Node, socket_path: Path) -> None:
        self.node = node
        self.socket_path = Path(socket_path)
        self._runner: web.AppRunner | None = None
        self._watch_tasks: set[asyncio.Task] = set()

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        app.add_routes(
            [
                web.get("/api/status", self.status),
                web.get("/api/peers", self.peers),
                web.get("/api/ledger", self.buckets),
                web.get("/api/ledger/{bucket}", self.items),
                web.get("/api/ledger/{bucket}/{key}", self.get_key),
                web.put("/api/ledger/{bucket}/{key}", self.set_key),
                web.delete("/api/ledger/{bucket}/{key}", self.delete_key),
                web.get("/api/watch", self.watch),
            ]
        )
        return app

    async def start(self) -> None:
        """Bind the socket (replacing a stale one) with mode 0600."""
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        with suppress(FileNotFoundError):
            self.socket_path.unlink()  # left by a node that was killed
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        old_umask = os.umask(0o177)  # the socket is created 0600: no window with looser rights
        try:
            await web.UnixSite(self._runner, str(self.socket_path)).start()
        finally:
            os.umask(old_umask)
        os.chmod(self.socket_path, 0o600)

    async def stop(self) -> None:
        """Close the socket and end open watches."""
        if self._runner is not None:
            for task in list(self._watch_tasks):  # a watch never ends by itself
                task.cancel()
            await self._runner.cleanup()
            self._runner = None
        with suppress(FileNotFoundError):
            self.socket_path.unlink()

    # --- handlers ----------------------------------------------------------------------------
    async def status(self, request: web.Request) -> web.Response:
        return _json(self.node.status())

    async def peers(self, request: web.Request) -> web.Response:
        return _json(self.node.membership.describe())

    async def buckets(self, request: web.Request) -> web.Response:
        return _json(sorted(self.node.ledger.buckets()))

    async def items(self, request: web.Request) -> web.Response:
        return _json(self.node.ledger.items(request.match_info["bucket"]))

    async def get_key(self, request: web.Request) -> web.Response:
        bucket, key = request.match_info["bucket"], request.match_info["key"]
        entry = self.node.ledger.get_entry(bucket, key)
        if entry is None or entry.deleted:
            return _error(404, f"no key {bucket}/{key}")
        return _json(entry_to_dict(entry))

    async def set_key(self, request: web.Request) -> web.Response:
        bucket, key = request.match_info["bucket"], request.match_info["key"]
        try:
            value = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            return _error(400, "the body must be a JSON value")
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"the body exceeds {MAX_REQUEST_BYTES} bytes")
        try:
            entry = self.node.ledger.set(bucket, key, value)
        except KairosError as exc:
            return _error(400, str(exc))
        return _json(entry_to_dict(entry))

    async def delete_key(self, request: web.Request) -> web.Response:
        bucket, key = request.match_info["bucket"], request.match_info["key"]
        try:
            entry = self.node.ledger.delete(bucket, key)
        except KairosError as exc:
            return _error(400, str(exc))
        return _json(entry_to_dict(entry))

    async def watch(self, request: web.Request) -> web.StreamResponse:
        bucket = request.query.get("bucket") or None
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        task = asyncio.current_task()
        self._watch_tasks.add(task)
        try:
            async for update in self.node.ledger.watch(bucket):
                line = json.dumps(asdict(update), default=str) + "\n"
                await response.write(line.encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watch_tasks.discard(task)
        return response


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
            raise KairosError(f"no node is running here: {self.socket_path} does not exist (start one with `kairos run`)")

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call; :class:`KairosError` with the API's message on failure."""
        self._check_socket()
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise KairosError(f"cannot reach the node at {self.socket_path}: {exc}") from None
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
            raise KairosError(f"lost the node at {self.socket_path}: {exc}") from None
