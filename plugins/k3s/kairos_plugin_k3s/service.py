"""The admin kubeconfig on demand: masters serve it over a libp2p stream, the CLI asks its own node.

The kubeconfig holds the cluster's admin client key, so it is not written to the ledger (unless
``k3s.share_kubeconfig: true``), where every node would keep a copy. Instead:

- Every node serves :data:`PROTOCOL`. A node whose role runs a k3s server answers with the
  kubeconfig k3s wrote; any other node answers with an error. Only admitted peers (token holders)
  can open the stream; every answer is logged with the peer that asked.
- ``kairos get-kubeconfig`` asks the node on its own machine through a unix socket beside the
  API's (:data:`SOCKET_NAME`, mode 0600, so only who may use the API may ask): one JSON line in,
  one JSON line out. The node answers from its own file when it is a master, else from a shared
  copy in the ledger, else asks the masters of the cluster (the init master first).

Every frame and line is bounded, and so is every wait.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cluster_state import MAX_KUBECONFIG_BYTES, clean_kubeconfig
from .kubeconfig import KubeconfigError, check_kubeconfig

if TYPE_CHECKING:
    from kairos_core.plugin import NodeView

    from .member import ClusterMember

log = logging.getLogger(__name__)

PROTOCOL = "/kairos/k3s/kubeconfig/1.0.0"
SOCKET_NAME = "k3s.sock"
# A request is a few bytes of JSON; a reply is the kubeconfig escaped as JSON (at most ~2x) and a
# few fields.
MAX_REQUEST_BYTES = 4096
MAX_REPLY_BYTES = 2 * MAX_KUBECONFIG_BYTES + 4096
# Seconds a peer or a local client has to send its request.
REQUEST_TIMEOUT = 5.0
# Seconds one master has to answer, connection to last byte.
STREAM_TIMEOUT = 10.0
# Seconds the CLI waits for its node, which may ask several masters in turn.
CLIENT_TIMEOUT = 60.0
# Masters asked per request (the init master first), so a request ends within bounded time.
MAX_MASTERS_ASKED = 3


class KubeconfigUnavailable(Exception):
    """No kubeconfig could be had (yet): no master known, none answering, or a bad answer."""


def socket_path(api_socket: Path | str) -> Path:
    """The k3s plugin's local socket, beside the node's API socket."""
    return Path(api_socket).with_name(SOCKET_NAME)


# --- the stream between nodes ------------------------------------------------------------------
async def serve_stream(member: ClusterMember, stream: Any) -> None:
    """Answer one peer's request for the kubeconfig (the handler of :data:`PROTOCOL`)."""
    try:
        try:
            request = await asyncio.wait_for(stream.read_frame(MAX_REQUEST_BYTES), REQUEST_TIMEOUT)
        except Exception as exc:  # silent, oversized or broken: nothing to answer, nothing to alarm about
            member.counters["kubeconfig_bad_requests"] += 1
            log.debug("k3s: kubeconfig request from %s dropped: %s: %s", stream.peer_id, type(exc).__name__, exc)
            return
        try:
            asked = json.loads(request).get("want") == "kubeconfig"
        except (ValueError, AttributeError):
            asked = False
        text = member.own_kubeconfig() if asked else None
        if text is not None:
            member.counters["kubeconfig_served"] += 1
            log.info("k3s: sent the admin kubeconfig to %s", stream.peer_id)
            reply = {"kubeconfig": text}
        else:
            member.counters["kubeconfig_refused"] += 1
            reply = {"error": "bad request" if not asked else "this node has no kubeconfig (it runs no k3s server)"}
        await asyncio.wait_for(stream.write_frame(json.dumps(reply).encode()), STREAM_TIMEOUT)
    finally:
        with suppress(Exception):
            await stream.close()


async def request_kubeconfig(node: NodeView, peer_id: str) -> str:
    """Ask ``peer_id`` for its kubeconfig over :data:`PROTOCOL` from ``node``; :class:`KubeconfigUnavailable`
    on any failure."""
    try:
        return await asyncio.wait_for(_request(node, peer_id), STREAM_TIMEOUT)
    except KubeconfigUnavailable:
        raise
    except TimeoutError:
        raise KubeconfigUnavailable(f"no answer within {STREAM_TIMEOUT:.0f} s") from None
    except Exception as exc:  # no stream (KairosError), a reset stream: this master cannot be asked now
        raise KubeconfigUnavailable(f"{type(exc).__name__}: {exc}") from None


async def _request(node: NodeView, peer_id: str) -> str:
    stream = await node.open_stream(peer_id, PROTOCOL)
    try:
        await stream.write_frame(b'{"want":"kubeconfig"}')
        data = await stream.read_frame(MAX_REPLY_BYTES)
    finally:
        with suppress(Exception):
            await stream.close()
    try:
        reply = json.loads(data)
    except ValueError:
        raise KubeconfigUnavailable("the answer is not JSON") from None
    if not isinstance(reply, dict):
        raise KubeconfigUnavailable("the answer is not a JSON object")
    if "error" in reply:
        raise KubeconfigUnavailable(str(reply["error"])[:200])
    text = clean_kubeconfig(reply.get("kubeconfig"))
    if text is None:
        raise KubeconfigUnavailable("the answer holds no kubeconfig")
    try:
        check_kubeconfig(text)
    except KubeconfigError as exc:
        raise KubeconfigUnavailable(str(exc)) from None
    return text


# --- the local socket the CLI asks -------------------------------------------------------------
class ControlSocket:
    """The unix socket through which ``kairos get-kubeconfig`` asks the running node."""

    def __init__(self, member: ClusterMember, path: Path) -> None:
        self.member = member
        self.path = Path(path)
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Bind the socket (replacing a stale one) with mode 0600."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with suppress(FileNotFoundError):
            self.path.unlink()  # left by a node that was killed
        old_umask = os.umask(0o177)  # created 0600: no window in which others could connect
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=MAX_REQUEST_BYTES)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        """Close the socket and every open connection."""
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            self._server = None
        with suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # a connection handler runs in a task of its own
        self._clients.add(task)
        try:
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
                request = json.loads(line)
            except (ValueError, TimeoutError, ConnectionError):  # too long, not JSON, too slow
                reply: dict[str, Any] = {"error": "bad request"}
            else:
                reply = await self.answer(request)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except ConnectionError:
            pass  # the client went away
        finally:
            self._clients.discard(task)
            writer.close()
            with suppress(Exception):
                await writer.wait_closed()

    async def answer(self, request: Any) -> dict[str, Any]:
        """The reply to one request: ``{"op": "get-kubeconfig", "network_id": optional}``."""
        member = self.member
        if not isinstance(request, dict) or request.get("op") != "get-kubeconfig":
            return {"error": "unknown request"}
        wanted = request.get("network_id")
        if wanted and wanted != member.node.network_id:
            return {"error": f"this node is in network {member.node.network_id!r}, not {wanted!r}"}
        try:
            text, source = await member.fetch_kubeconfig()
        except KubeconfigUnavailable as exc:
            return {"error": f"no kubeconfig: {exc}"}
        return {"kubeconfig": text, "source": source, "server": await member.server_address()}


def ask_node(path: Path, request: dict[str, Any], timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """Send one request to a node's :class:`ControlSocket` and return its reply (for the CLI).

    Raises :class:`KubeconfigUnavailable` when no node answers there or the answer is malformed.
    """
    if not Path(path).exists():
        raise KubeconfigUnavailable(f"no node with the k3s plugin is running here: {path} does not exist")
    data = bytearray()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_REPLY_BYTES:
                    raise KubeconfigUnavailable("the node's answer is too large")
    except OSError as exc:  # socket.timeout included
        raise KubeconfigUnavailable(f"cannot ask the node at {path}: {exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise KubeconfigUnavailable("the node's answer is not JSON") from None
    if not isinstance(reply, dict):
        raise KubeconfigUnavailable("the node's answer is not a JSON object")
    return reply
