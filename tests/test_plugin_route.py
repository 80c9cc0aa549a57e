"""PluginRoute: a plugin's local-API route served by the node's real API server and called as a
plugin's command calls it, over the real unix socket."""

from __future__ import annotations

import asyncio
import json

import click
import pytest
from kairos_testing.fakenode import FakeNode

from kairos_core.api import APIServer
from kairos_core.plugin import KairosError, PluginRoute, cli_commands_hook
from kairos_core.plugins import make_plugin_manager

ROUTE = PluginRoute("echo")


def answer(node, method, rest, body):
    if method == "GET" and not rest:
        return {"peer_id": node.peer_id}
    if method == "POST" and rest == ["say"]:
        return {"said": body}
    raise ROUTE.unknown(method, rest)


class Echo:
    """A plugin as a module is one: its hooks are attributes (``api_routes_hook`` makes the hook)."""

    kairos_api_routes = staticmethod(ROUTE.api_routes_hook(answer))


@pytest.fixture
async def served(tmp_path):
    node = FakeNode(manager=make_plugin_manager(autoload=False, extra_plugins=[Echo()]))
    server = APIServer(node, tmp_path / "api.sock")
    await server.start()
    yield node, str(server.socket_path)
    await server.stop()
    await node.aclose()


async def test_request_reaches_the_handler_with_the_node_and_the_body(served):
    node, socket = served
    assert ROUTE.path == "/api/plugins/echo"
    assert await asyncio.to_thread(ROUTE.request, None, socket, "GET") == {"peer_id": node.peer_id}
    said = await asyncio.to_thread(ROUTE.request, None, socket, "POST", "/say", {"text": "hi\x1b"})
    assert said == {"said": {"text": "hi\x1b"}}


async def test_an_unknown_route_is_a_one_line_error(served):
    _, socket = served
    with pytest.raises(KairosError, match=r"^DELETE /api/plugins/echo/a/b: no such route$"):
        await asyncio.to_thread(ROUTE.request, None, socket, "DELETE", "/a/b")


async def test_ask_prints_json_or_the_line_and_returns_the_answer(served, capsys):
    node, socket = served
    answer = await asyncio.to_thread(ROUTE.ask, None, socket, True, "GET")
    assert json.loads(capsys.readouterr().out) == answer == {"peer_id": node.peer_id}
    await asyncio.to_thread(ROUTE.ask, None, socket, False, "POST", "/say", "x", lambda done: f"said {done['said']}")
    assert capsys.readouterr().out == "said x\n"
    await asyncio.to_thread(ROUTE.ask, None, socket, False, "GET")  # no say: prints nothing
    assert capsys.readouterr().out == ""


def test_the_commands_hook_imports_and_adds_the_named_commands():
    group = click.Group("kairos")
    hook = cli_commands_hook("kairos_core.cli:status", "kairos_core.cli:peers")
    assert hasattr(hook, "kairos_impl")  # marked as a hook implementation
    hook(group)
    assert sorted(group.commands) == ["peers", "status"]
    with pytest.raises(ModuleNotFoundError):
        cli_commands_hook("no_such_module:x")(group)


def test_serve_builds_the_table_kairos_api_routes_returns():
    node = object()
    ((name, call),) = ROUTE.serve(node, lambda n, method, rest, body: (n, method, rest, body)).items()
    assert name == "echo" and call("GET", ["a"], None) == (node, "GET", ["a"], None)
