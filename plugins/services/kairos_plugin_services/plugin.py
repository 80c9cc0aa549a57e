"""The kairos hooks of the services plugin (entry point ``services``, this module).

The module keeps one :class:`~.relay.Services` per running node, keyed by the node object's id,
so several nodes in one process (tests) each have their own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kairos_core.plugin import KairosError, PluginRoute, cli_commands_hook, NodeView, Option, Section, WritePolicy, hookimpl

from .catalog import BUCKET, PROTOCOLS, ServicesPolicy, UsageError, check_name, parse_hostport
from .relay import Services

SECTION = "services"
#: ``/api/plugins/services``: served here, called by the commands (``cli.py``)
ROUTE = PluginRoute("services")

SERVICES = Section(
    SECTION,
    Option(
        "expose",
        list,
        [],
        "Services this node exposes from the start: a list of "
        "{name, to: HOST:PORT, protocol: tcp|udp (tcp), description ('')}. `to` is reached from "
        "this node and never written to the ledger.",
        item_type=dict,
    ),
    Option(
        "connect",
        list,
        [],
        "Services this node listens for from the start: a list of "
        "{name, listen: ADDR:PORT, protocol: tcp|udp (tcp)}; each connection to ADDR:PORT is "
        "carried to a live node exposing `name`.",
        item_type=dict,
    ),
    Option(
        "max_connections_per_peer",
        int,
        64,
        "Connections (TCP) or sessions (UDP) one peer may "
        "have open through this node's exposed services at once; more are refused and counted "
        "(services_rejected_over_limit).",
        minimum=1,
        maximum=100000,
    ),
    Option(
        "max_connections",
        int,
        1024,
        "Connections (or UDP client addresses) one `connect` listener carries at once; more are closed and counted.",
        minimum=1,
        maximum=100000,
    ),
    Option(
        "connect_timeout",
        float,
        10.0,
        "Seconds to open a stream to an exposing node, to reach the target, and for each step of the negotiation.",
        minimum=0.1,
        maximum=300,
    ),
    Option(
        "udp_idle_timeout",
        float,
        60.0,
        "Seconds after which a UDP session (one client address) that moved no datagram is closed.",
        minimum=0.1,
        maximum=86400,
    ),
    Option(
        "side_connection",
        bool,
        True,
        "Carry TCP bytes over a direct TCP connection sealed "
        "with AES-256-GCM under keys agreed on the admitted stream (several times faster than "
        "the stream); false, or when it cannot be made, they go over the stream.",
    ),
    Option(
        "side_pool",
        int,
        2,
        "Proven side connections kept open, idle, to each exposing node this node has used "
        "(and reused after a connection ends cleanly): a new connection sends its request on one "
        "and skips the stream negotiation. 0: negotiate every connection on a stream.",
        minimum=0,
        maximum=16,
    ),
    Option(
        "side_listen",
        str,
        "0.0.0.0:0",
        "Where this node accepts side connections: ADDR:PORT (port 0: any free port, told to peers in the negotiation).",
    ),
    help="TCP and UDP services carried between nodes (kairos-plugin-services): `kairos service`.",
    aliases=("p2p.services",),
)


def _runtime(node: NodeView) -> Services:
    services = _RUNTIMES.get(id(node))
    if services is None:
        raise KairosError("the services plugin is not running on this node")
    return services


_RUNTIMES: dict[int, Services] = {}


@hookimpl
def kairos_config_schema() -> list[Section]:
    return [SERVICES]


def _item_problems(path: str, item: Mapping[str, Any], required: tuple[str, ...], optional: tuple[str, ...]) -> list[str]:
    problems = []
    unknown = set(item) - set(required) - set(optional)
    if unknown:
        problems.append(f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))}")
    for key in required:
        if key not in item:
            problems.append(f"{path}: needs {key}")

    def target(value: Any) -> None:
        if parse_hostport(value, "to")[1] == 0:
            raise UsageError(f"to {value!r}: the port must not be 0")

    checks = [("name", check_name), ("to", target), ("listen", lambda value: parse_hostport(value, "listen"))]
    for key, check in checks:
        try:
            if key in item:
                check(item[key])
        except UsageError as exc:
            problems.append(f"{path}.{key}: {exc}")
    if item.get("protocol", "tcp") not in PROTOCOLS:
        problems.append(f"{path}.protocol: tcp or udp, not {item['protocol']!r}")
    if not isinstance(item.get("description", ""), str):
        problems.append(f"{path}.description: expected a string")
    return problems


@hookimpl
def kairos_config_problems(config: Mapping[str, Mapping[str, Any]]) -> list[str]:
    section = config[SECTION]
    problems = []
    for index, item in enumerate(section["expose"]):
        problems += _item_problems(f"services.expose[{index}]", item, ("name", "to"), ("protocol", "description"))
    for index, item in enumerate(section["connect"]):
        problems += _item_problems(f"services.connect[{index}]", item, ("name", "listen"), ("protocol",))
    for key in ("expose", "connect"):
        names = [item.get("name") for item in section[key]]
        doubles = sorted({str(n) for n in names if names.count(n) > 1})
        if doubles:
            problems.append(f"services.{key}: {', '.join(doubles)} given more than once")
    try:
        parse_hostport(section["side_listen"], "services.side_listen")
    except UsageError as exc:
        problems.append(str(exc))
    return problems


@hookimpl
def kairos_ledger_policies() -> Mapping[str, WritePolicy]:
    """``services`` holds ``<owner>/<name>`` advertisements, written by their owner only."""
    return {BUCKET: ServicesPolicy()}


@hookimpl
async def kairos_startup(node: NodeView) -> None:
    services = Services(node, SERVICES.read(node.config[SECTION]))
    _RUNTIMES[id(node)] = services
    await services.start()


@hookimpl
async def kairos_shutdown(node: NodeView) -> None:
    services = _RUNTIMES.pop(id(node), None)
    if services is not None:
        await services.stop()


def _route(node: NodeView, method: str, rest: list[str], body: Any) -> Any:
    """``/api/plugins/services/…``: GET (state), POST expose|connect (JSON body),
    DELETE expose/NAME | connect/NAME."""
    services = _runtime(node)
    if method == "GET" and not rest:
        return services.describe()
    if method == "POST" and len(rest) == 1 and rest[0] in ("expose", "connect"):
        if not isinstance(body, dict):
            raise UsageError("the body must be a JSON object")
        if rest[0] == "expose":
            return services.expose(body.get("name"), body.get("to"), body.get("protocol", "tcp"), body.get("description", ""))
        return services.connect(body.get("name"), body.get("listen"), body.get("protocol"))
    if method == "DELETE" and len(rest) == 2 and rest[0] in ("expose", "connect"):
        return services.unexpose(rest[1]) if rest[0] == "expose" else services.disconnect(rest[1])
    raise ROUTE.unknown(method, rest)


kairos_api_routes = ROUTE.api_routes_hook(_route)
kairos_cli_commands = cli_commands_hook("kairos_plugin_services.cli:service_group")


def exposures(node: NodeView) -> Iterable[dict[str, Any]]:
    """What this node exposes now (for tests and tools in the node's process)."""
    exposed: list[dict[str, Any]] = _runtime(node).describe()["exposed"]
    return exposed
