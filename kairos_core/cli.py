"""The ``kairos`` command.

Errors reach the user as one line on stderr and a non-zero exit code: 1 the operation failed,
2 bad usage or config, 3 no node reachable (:mod:`.errors`). With ``--json`` on the command line
an error is instead one JSON object on stdout, ``{"error": "…", "exit_code": N}``, so a script
that reads the JSON output reads the failure too. A traceback appears only with
``KAIROS_DEBUG=1``. Plugins add subcommands through ``kairos_cli_commands``.

Hostnames, addresses, ledger buckets and keys come from peers: plain and table output passes them
through :func:`~.untrusted.escape_control` (and rich tables get them as ``Text``, never as
markup), and log lines go through :class:`~.untrusted.EscapingFormatter`, so no peer can write
escape sequences to the operator's terminal or forge a line. ``--json`` output is escaped by
``json.dumps`` itself (``ensure_ascii``).
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .config import Config, collect_schema, disabled_plugins, load_config, read_config_file
from .errors import EXIT_FAILED, KairosError
from .plugins import KairosPluginManager, call_hook_sync, hookimpl, make_plugin_manager
from .token import MAX_TOKEN_BYTES, generate_token, parse_token
from .untrusted import escape_control

CONFIG_ENV = "KAIROS_CONFIG"
DEBUG_ENV = "KAIROS_DEBUG"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the text format (see .logs)


class Context:
    """What every subcommand shares: the plugin manager and the config path."""

    def __init__(self, manager: KairosPluginManager, config_path: str | None) -> None:
        self.manager = manager
        self.config_path = config_path

    def load_config(self) -> Config:
        """The validated config (defaults only when no file is given)."""
        return load_config(self.config_path, self.manager)


pass_context = click.make_pass_decorator(Context)
pass_context.__doc__ = """Decorator: pass the command's :class:`Context` (config path, plugin manager) as first argument."""


def _set_config_path(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.find_object(Context).config_path = value


# `kairos -c FILE run` and `kairos run -c FILE` both work: users type the option where they think of it.
config_option = click.option(
    "-c", "--config", "config_path", metavar="FILE", expose_value=False, callback=_set_config_path, help="Config file (YAML)."
)


def emit_json(data: object) -> None:
    """Print machine-readable output (``ensure_ascii`` escapes every control character)."""
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def echo_safe(text: object, err: bool = False) -> None:
    """Print a line built from untrusted text (peers' strings), control characters escaped."""
    click.echo(escape_control(text), err=err)


def _cell(value: object):
    # A rich table reads a str as markup ("[link=…]") and passes ESC through: give it escaped Text.
    from rich.text import Text

    return Text(escape_control("" if value is None else value))


def setup_logging(level: int) -> None:
    """Log to stderr at ``level``, every line escaped (:class:`~.untrusted.EscapingFormatter`).

    Like :func:`logging.basicConfig`, it does nothing when the root logger already has handlers.
    """
    from . import logs

    logs.setup(level, "text")


def _manager_of(ctx: click.Context) -> KairosPluginManager:
    # main() hands in the manager it built the command tree with; tests may invoke cli directly.
    context = ctx.find_object(Context)
    if context is not None:
        return context.manager
    root = ctx.find_root()
    return root.obj if isinstance(root.obj, KairosPluginManager) else make_plugin_manager()


def versions(manager: KairosPluginManager) -> dict:
    """The core's version and each installed plugin's (name, distribution, version)."""
    plugins = [
        {"name": row["name"], "distribution": row["distribution"], "version": row["version"]}
        for row in manager.describe()
        if row["source"] == "entrypoint"
    ]
    return {"kairos-core": __version__, "plugins": plugins}


def _echo_versions(data: dict) -> None:
    click.echo(f"kairos-core {data['kairos-core']}")
    for row in data["plugins"]:
        echo_safe(f"{row['distribution'] or row['name']} {row['version'] or '?'} (plugin {row['name']})")


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        _echo_versions(versions(_manager_of(ctx)))
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", envvar=CONFIG_ENV, metavar="FILE", help=f"Config file (YAML). Also ${CONFIG_ENV}.")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Print the versions of kairos-core and every plugin, and exit.",
)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, verbose: int) -> None:
    """kairos: machines that share one network token find each other and form a cluster.

    Start with `kairos token new`, put the token in a config file as p2p.network_token,
    and run `kairos run -c FILE` on every machine.

    \b
    Exit codes:
      0  success
      1  the operation failed (a missing ledger key, a refused write)
      2  bad usage or input (an unknown option, an invalid config or token)
      3  no node is running here, or its API does not answer
    With --json an error is {"error": "...", "exit_code": N} on stdout.
    """
    setup_logging(max(logging.WARNING - 10 * verbose, logging.DEBUG))
    ctx.obj = Context(_manager_of(ctx), config_path)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def version(as_json: bool) -> None:
    """Print the version of kairos-core and of every installed plugin (as `kairos --version`)."""
    data = versions(_manager_of(click.get_current_context()))
    if as_json:
        emit_json(data)
    else:
        _echo_versions(data)


# -------------------------------------------------------------------------------------------------
# token
# -------------------------------------------------------------------------------------------------


@cli.group()
def token() -> None:
    """Create and inspect network tokens."""


@token.command("new")
@click.option(
    "--interval",
    type=click.IntRange(min=1),
    default=360,
    show_default=True,
    help="Seconds between OTP rotations (rendezvous names and seal keys).",
)
@click.option("--yaml", "as_yaml", is_flag=True, help="Print the raw YAML form instead of base64.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the token (base64) and its fingerprint.")
def token_new(interval: int, as_yaml: bool, as_json: bool) -> None:
    """Print a new network token with fresh random secrets."""
    new = generate_token(interval=interval)
    if as_json:
        emit_json({"token": new.encode(), "fingerprint": new.fingerprint})
        return
    click.echo(new.to_yaml().rstrip() if as_yaml else new.encode())


@token.command("show")
@click.argument("token_text", metavar="TOKEN")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def token_show(token_text: str, as_json: bool) -> None:
    """Show a token's fields with secrets masked. TOKEN may be - to read standard input."""
    if token_text == "-":
        token_text = sys.stdin.read(MAX_TOKEN_BYTES + 1)
    parsed = parse_token(token_text)
    doc = {"fingerprint": parsed.fingerprint, **parsed.masked()}
    if as_json:
        emit_json(doc)
        return
    click.echo(f"fingerprint:      {doc['fingerprint']}")
    for name in ("dht", "crypto"):
        spec = doc["otp"][name]
        echo_safe(f"otp.{name + ':':<13} interval {spec['interval']} s, length {spec['length']}, key {spec['key']}")
    for field in ("room", "rendezvous", "mdns"):
        echo_safe(f"{field + ':':<17} {doc[field]}")
    click.echo(f"max_message_size: {doc['max_message_size']}")


# -------------------------------------------------------------------------------------------------
# plugins
# -------------------------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--hook", metavar="NAME", help="Only plugins that implement this hook.")
@pass_context
def plugins(context: Context, as_json: bool, hook: str | None) -> None:
    """List installed plugins: name, source, version and the hooks each implements."""
    rows = context.manager.describe()
    if hook:
        rows = [row for row in rows if hook in row["hooks"]]
    errors = context.manager.load_errors
    if as_json:
        emit_json({"plugins": rows, "load_errors": errors} if errors else rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="kairos plugins")
    for column in ("name", "source", "version", "hooks"):
        table.add_column(column)
    for row in rows:
        version = row["version"] or ("built-in" if row["source"] == "builtin" else "")
        table.add_row(row["name"], row["distribution"] or row["source"], version, ", ".join(row["hooks"]))
    console = Console()
    console.print(table)
    for name, error in errors.items():
        console.print(f"[red]failed to load[/red] {name}: {error}")


# -------------------------------------------------------------------------------------------------
# config
# -------------------------------------------------------------------------------------------------


@cli.group()
def config() -> None:
    """Check config files and show defaults."""


@config.command("check")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON: ok, problems, warnings, notes.")
@pass_context
def config_check(context: Context, path: Path, as_json: bool) -> None:
    """Validate a config file: every unknown key and wrong type, with its path (exit code 2).

    A Kairos cloud-config is read as is: its OS sections are listed as ignored, and Kairos keys
    that do nothing here are warnings, not problems.
    """
    from .errors import ConfigError

    try:
        checked = load_config(path, context.manager)
    except ConfigError as exc:
        if not exc.problems:
            raise
        if as_json:
            emit_json({"path": str(path), "ok": False, "error": str(exc), "exit_code": exc.exit_code, "problems": exc.problems})
            raise SystemExit(exc.exit_code) from None
        for problem in exc.problems:
            echo_safe(f"{path}: {problem}", err=True)
        raise SystemExit(exc.exit_code) from None
    if as_json:
        emit_json({"path": str(path), "ok": True, "problems": [], "warnings": checked.warnings, "notes": checked.notes})
        return
    for note in checked.notes:
        echo_safe(f"{path}: note: {note}", err=True)
    for warning in checked.warnings:
        echo_safe(f"{path}: warning: {warning}", err=True)
    count = len(checked.warnings)
    echo_safe(f"{path}: ok" + (f" ({count} warning{'s' if count != 1 else ''})" if count else ""))


@config.command("defaults")
@click.option("--json", "as_json", is_flag=True, help="Print the schema as JSON.")
@pass_context
def config_defaults(context: Context, as_json: bool) -> None:
    """Print every option with its default and help, as a commented YAML config (core and
    installed plugins); --json prints the schema: each option's type, default, help and bounds."""
    from .schema import render_yaml

    sections = list(collect_schema(context.manager).values())
    if as_json:
        emit_json([section.describe() for section in sections])
        return
    click.echo(render_yaml(sections))


# -------------------------------------------------------------------------------------------------
# running a node, and talking to a running node
# -------------------------------------------------------------------------------------------------


@cli.command()
@config_option
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="How much to log (default: node.log_level; -v lowers it).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="text, or json: one object per line (default: node.log_format).",
)
@pass_context
def run(context: Context, log_level: str | None, log_format: str | None) -> None:
    """Run a node until SIGINT or SIGTERM; SIGHUP re-reads node.log_level and node.log_format.

    A config with only p2p.network_token is enough (or KAIROS_NETWORK_TOKEN and no config).
    In a terminal it says what it waits for (peers, a leader, the VPN address) until it has it.
    Under systemd (Type=notify) it reports READY=1 once up and feeds the watchdog.
    """
    import asyncio

    from . import logs
    from .doctor import Progress
    from .node import run_node

    config = context.load_config()
    config.network_token  # noqa: B018 -- fail here, with one line, when there is no token
    verbose_level = logging.getLogger().level  # what -v asked for (WARNING without it)

    def apply(config) -> None:
        # --log-level and --log-format win; the config's level never hides what -v asked to see
        level = logs.level_of(log_level) if log_level else min(logs.level_of(config["node"]["log_level"]), verbose_level)
        logs.configure(level, log_format or config["node"]["log_format"])

    def reload() -> None:
        try:
            apply(context.load_config())
        except Exception as exc:  # a broken file keeps the running settings
            logging.getLogger("kairos_core.cli").warning("reload: config not applied: %s", exc)
            return
        logging.getLogger("kairos_core.cli").info("reload: log settings re-read from the config")

    apply(config)
    config_log = logging.getLogger("kairos_core.config")
    for note in config.notes:  # once per start: a Kairos cloud-config's OS sections, say
        config_log.info("config: %s", note)
    for warning in config.warnings:
        config_log.warning("config: %s", warning)
    progress = Progress(lambda text: click.echo(text, err=True, nl=False)) if sys.stderr.isatty() else None
    try:
        asyncio.run(run_node(config, context.manager, reload=reload, progress=progress))
    except OSError as exc:
        raise KairosError(f"cannot run the node: {exc.strerror or exc}") from None


def _client(context: Context, socket_path: str | None):
    from .api import APIClient

    if socket_path:
        return APIClient(Path(socket_path))
    return APIClient(context.load_config().api_socket)


_Command = TypeVar("_Command", bound=Callable[..., Any])


def socket_option(function: _Command) -> _Command:
    """--socket PATH, and -c FILE to find the socket through a config's state dir."""
    function = click.option(
        "--socket",
        "socket_path",
        metavar="PATH",
        envvar="KAIROS_SOCKET",
        help="The node's API socket (default: from the config's state dir).",
    )(function)
    return config_option(function)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
json_option.__doc__ = """Decorator: a ``--json`` flag, passed to the command as ``as_json``."""


def cli_commands_hook(*commands: str) -> Callable[[click.Group], None]:
    """A ``kairos_cli_commands`` implementation adding ``commands`` to ``kairos``, each named
    ``"package.module:attribute"`` (a click command or group) and imported only when the CLI is
    built, so a plugin's command module may import the plugin's own: ``kairos_cli_commands =
    cli_commands_hook("kairos_plugin_dns.cli:dns_group")``."""

    @hookimpl
    def kairos_cli_commands(cli: click.Group) -> None:
        for target in commands:
            module, _, attribute = target.partition(":")
            cli.add_command(getattr(importlib.import_module(module), attribute))

    return kairos_cli_commands


class PluginRoute:
    """A plugin's route on the node's local API, ``/api/plugins/<name>/…``, from both sides: the
    node serves it (:meth:`serve`, from ``kairos_api_routes``), the plugin's commands call it
    (:meth:`request`, :meth:`ask`) from their own process.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        #: ``/api/plugins/<name>``
        self.path = f"/api/plugins/{name}"

    def serve(
        self, node: Any, handler: Callable[[Any, str, list[str], Any], Any]
    ) -> dict[str, Callable[[str, list[str], Any], Any]]:
        """What ``kairos_api_routes(node)`` returns: ``handler(node, method, rest, body)`` answers
        each request (``rest`` the path's parts after the name, ``body`` the decoded JSON or None)
        with JSON data; a :class:`KairosError` it raises is the client's one-line error."""
        return {self.name: functools.partial(handler, node)}

    def api_routes_hook(self, handler: Callable[[Any, str, list[str], Any], Any]) -> Callable[[Any], dict[str, Any]]:
        """A ``kairos_api_routes`` implementation serving this route with ``handler`` (as
        :meth:`serve`): ``kairos_api_routes = ROUTE.api_routes_hook(answer)`` in the plugin's module."""

        @hookimpl
        def kairos_api_routes(node: Any) -> dict[str, Any]:
            return self.serve(node, handler)

        return kairos_api_routes

    def unknown(self, method: str, rest: Iterable[str]) -> KairosError:
        """The error for a request no route of the plugin answers (raise it from the handler)."""
        return KairosError(f"{method} {self.path}/{'/'.join(rest)}: no such route")

    def request(self, context: Any, socket_path: str | None, method: str, path: str = "", body: Any = None) -> Any:
        """One call to ``<route><path>`` of the node at ``socket_path`` (None: the config's socket),
        ``body`` sent as JSON; the decoded answer. :class:`KairosError` as :class:`APIClient`."""
        content = json.dumps(body) if body is not None else None
        return _client(context, socket_path).request(method, f"{self.path}{path}", content=content)

    def ask(
        self,
        context: Any,
        socket_path: str | None,
        as_json: bool,
        method: str,
        path: str = "",
        body: Any = None,
        say: Callable[[Any], str] | None = None,
    ) -> Any:
        """:meth:`request`, and print the answer: as JSON with ``as_json`` (:func:`emit_json`), else
        the line ``say(answer)`` when given (escape what peers wrote in it with
        :func:`escape_control`). Returns the answer, for a command that prints more."""
        answer = self.request(context, socket_path, method, path, body)
        if as_json:
            emit_json(answer)
        elif say is not None:
            click.echo(say(answer))
        return answer


@cli.command()
@socket_option
@json_option
@pass_context
def status(context: Context, socket_path: str | None, as_json: bool) -> None:
    """Show this node, its leader, what its plugins wait for, and its counters."""
    data = _client(context, socket_path).request("GET", "/api/status")
    if as_json:
        emit_json(data)
        return
    leader = data["leader"]
    echo_safe(f"peer id:     {data['peer_id']} ({data['hostname']})")
    echo_safe(f"network:     {data['network_id']} (token {data['token_fingerprint']})")
    echo_safe(
        f"leader:      {leader['peer_id'] + ' epoch ' + str(leader['epoch']) if leader else 'none yet'}"
        f"{' (this node)' if data['is_leader'] else ''}"
    )
    click.echo(f"members:     {_members_line(data['members'], data['admitted'])}")
    for plugin, state in sorted((data.get("states") or {}).items()):
        echo_safe(f"{plugin + ':':<13}{state}")
    fingerprint = data.get("ledger_fingerprint")
    echo_safe(f"ledger:      {data['ledger_entries']} entries{f' (fingerprint {fingerprint})' if fingerprint else ''}")
    for address in data["addresses"]:
        echo_safe(f"address:     {address}")
    nat = data.get("reachability")
    if isinstance(nat, dict):
        observed = ", ".join(str(o) for o in nat.get("observed") or [])
        echo_safe(f"reachability: {nat.get('reachability', 'unknown')}{' (observed as ' + observed + ')' if observed else ''}")
        for relay in nat.get("relays") or []:
            echo_safe(f"relay:       {relay} (holds a reservation for this node)")
    dropped = {k: v for k, v in data["counters"].items() if v and ("drop" in k or "reject" in k or "error" in k)}
    for name, value in dropped.items():
        echo_safe(f"dropped:     {value} ({name})")


def _members_line(members: int, admitted: int) -> str:
    # "0 alive" read as "the network is down" to users of a lone node that leads itself.
    if members == 0:
        return "none yet (this node alone)" if admitted == 0 else f"none alive yet, {admitted} connected"
    return f"{members} alive besides this node, {admitted} connected"


@cli.command()
@socket_option
@json_option
@pass_context
def leader(context: Context, socket_path: str | None, as_json: bool) -> None:
    """Show the current leader and its epoch."""
    data = _client(context, socket_path).request("GET", "/api/status")["leader"]
    if as_json:
        emit_json(data)
    elif data:
        echo_safe(f"{data['peer_id']} epoch {data['epoch']}")
    else:
        click.echo("no leader yet")


def _vpn_paths(client: Any) -> dict[str, str]:
    """Each peer's VPN path (``direct``, ``punched``, ``relay via <peer>``, ``stream``) as a VPN
    plugin publishes it: this node's ``<peer id>/links`` entry in the ``vpn`` bucket. Empty when
    there is none (no VPN plugin, VPN off); what a peer-written entry holds is only shown if it is text."""
    try:
        me = client.request("GET", "/api/status")["peer_id"]
        links = client.request("GET", "/api/ledger/vpn").get(f"{me}/links")
    except (KairosError, KeyError, TypeError, AttributeError):
        return {}
    if not isinstance(links, dict):
        return {}
    return {peer: link["path"] for peer, link in links.items() if isinstance(link, dict) and isinstance(link.get("path"), str)}


@cli.command()
@socket_option
@json_option
@click.option("--all", "show_all", is_flag=True, help="Include peers that are no longer alive.")
@pass_context
def peers(context: Context, socket_path: str | None, as_json: bool, show_all: bool) -> None:
    """List the members of the network this node sees."""
    client = _client(context, socket_path)
    rows = client.request("GET", "/api/peers")
    if not show_all:
        rows = [row for row in rows if row["alive"]]
    paths = _vpn_paths(client)
    for row in rows:
        row["vpn_path"] = paths.get(row["peer_id"])
    if as_json:
        emit_json(rows)
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"{len(rows)} {'peer' if len(rows) == 1 else 'peers'}")
    # The peer id is what users copy into other commands: never cut or wrap it; the other columns
    # wrap instead when the terminal is narrow.
    id_width = max((len(escape_control(row["peer_id"])) for row in rows), default=len("peer id"))
    table.add_column("peer id", no_wrap=True, min_width=id_width)
    for column in ("hostname", "alive", "connected", "rtt", "vpn path", "last seen", "addresses"):
        table.add_column(column, overflow="fold")
    for row in rows:
        seen = "" if row["last_seen_s"] is None else f"{row['last_seen_s']} s ago"
        rtt = row.get("rtt_ms") if isinstance(row.get("rtt_ms"), (int, float)) else None
        # a relayed connection's RTT is the whole path through the relay: say so beside it
        link = "" if rtt is None else f"{rtt:.1f} ms" if rtt < 10 else f"{rtt:.0f} ms"
        if row.get("transport") in ("relayed", "punched"):
            link = f"{link} ({row['transport']})".strip()
        # Each address escaped on its own: the newlines between them are ours, any inside are not.
        # The trailing /p2p/<id> repeats the first column: left out, so that the address fits.
        suffix = f"/p2p/{row['peer_id']}"
        addresses = "\n".join(escape_control(address.removesuffix(suffix)) for address in row.get("addresses") or [])
        table.add_row(
            _cell(row["peer_id"]),
            _cell(row.get("hostname")),
            "yes" if row["alive"] else "no",
            "yes" if row["connected"] else "no",
            link,
            _cell(row.get("vpn_path")),
            seen,
            Text(addresses),
        )
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a pipe or a file has no width to fit: no folding
    console.print(table)


@token.command("rotate")
@socket_option
@json_option
@pass_context
def token_rotate(context: Context, socket_path: str | None, as_json: bool) -> None:
    """On the leader: hand a new network token to every member, sealed to each. Every node accepts
    the old one too for p2p.token_grace seconds, then only the new one; each keeps the new token
    in its state dir (the config file is not rewritten)."""
    data = _client(context, socket_path).request("POST", "/api/token/rotate")
    if as_json:
        emit_json(data)
        return
    import time as _time

    until = _time.strftime("%Y-%m-%d %H:%M:%S UTC", _time.gmtime(data["grace_until"]))
    echo_safe(
        f"token {data['fingerprint']} replaces {data['replaces']} (epoch {data['epoch']}), "
        f"sealed to {len(data['members'])} members; the old one is accepted until {until}"
    )
    for member, reason in sorted(data.get("unkeyed", {}).items()):
        echo_safe(
            f"warning: {member} got no copy ({reason}): it is cut off when the window ends unless given the new token by hand",
            err=True,
        )


@cli.group()
def peer() -> None:
    """Revoke a peer network-wide, and list revocations."""


@peer.command("revoke")
@click.argument("peer_id")
@click.option("--reason", default="", help="Why (kept with the revocation; at most 200 characters).")
@socket_option
@json_option
@pass_context
def peer_revoke(context: Context, peer_id: str, reason: str, socket_path: str | None, as_json: bool) -> None:
    """Revoke PEER_ID: every node refuses its admission, drops its connections and ignores its
    ledger writes from then on. Only the leader may; elsewhere this says which node leads."""
    data = _client(context, socket_path).request(
        "POST", f"/api/revoked/{_quote(peer_id)}", content=json.dumps({"reason": reason})
    )
    if as_json:
        emit_json(data)
        return
    record = data["revocation"]
    verb = "revoked" if data["written"] else "already revoked"
    echo_safe(f"{record['peer']} {verb} by {record['by']} (epoch {record['epoch']})")


@peer.command("revoked")
@socket_option
@json_option
@pass_context
def peer_revoked(context: Context, socket_path: str | None, as_json: bool) -> None:
    """List the revocations in force on this node."""
    rows = _client(context, socket_path).request("GET", "/api/revoked")
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no peer is revoked")
    for row in rows:
        reason = f"  {row['reason']}" if row.get("reason") else ""
        echo_safe(f"{row['peer']}  by {row['by']}  epoch {row['epoch']}{reason}")


@cli.command()
@socket_option
@json_option
@pass_context
def doctor(context: Context, socket_path: str | None, as_json: bool) -> None:
    """Explain, check by check, why the node has no peers, no leader or no VPN path.

    \b
    One line per check: ok, warn (not a network yet) or fail (it cannot work as configured),
    with what to do. Token, clock offset to peers, discovery, bootstrap peers (dialled now when
    not connected), admission refusals by reason, peers, leader, reachability, plugins, VPN.
    Exit code 1 when a check fails.
    """
    from .doctor import FAIL, format_check

    results = _client(context, socket_path).request("GET", "/api/doctor", timeout=30.0)
    if as_json:
        emit_json(results)
    else:
        for result in results:
            for line in format_check(result):  # each escaped: a peer's string cannot add a line
                echo_safe(line)
    if any(result["status"] == FAIL for result in results):
        raise SystemExit(EXIT_FAILED)


@cli.command()
@click.option("--url", "with_token", is_flag=True, help="Print the URL with the login token (keep it secret).")
@socket_option
@json_option
@pass_context
def dashboard(context: Context, with_token: bool, socket_path: str | None, as_json: bool) -> None:
    """Where the node's web dashboard is.

    \b
    Over TCP when api.http_listen is set: --url prints the address with ?token=…, which logs the
    browser in once (then a cookie, for the browser's session). The dashboard is also at / of the
    unix socket, without a token (e.g. through `ssh -L 8480:/var/lib/kairos/api.sock host`).
    """
    client = _client(context, socket_path)
    data = client.request("GET", "/api/dashboard/login")
    url = data["url"] if with_token else data["url"].split("?", 1)[0]
    if as_json:
        emit_json({"url": url, "listen": data["listen"]})
    else:
        click.echo(url)
        if not with_token:
            echo_safe("log in with the URL `kairos dashboard --url` prints (it holds the token)", err=True)


@cli.group()
def daemon() -> None:
    """Install kairos as a system service (`kairos service` is the network's services)."""


@daemon.command("install")
@click.option("--openrc", is_flag=True, help="An OpenRC init script instead of a systemd unit.")
@click.option(
    "--prefix",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("/"),
    show_default=True,
    help="Install below this directory (a package build root, a test).",
)
@click.option(
    "--config-file", "config_file", default="/etc/kairos/config.yaml", show_default=True, help="The config the service runs with."
)
def daemon_install(openrc: bool, prefix: Path, config_file: str) -> None:
    """Write the systemd unit (or OpenRC script) that runs `kairos run`, with this kairos's path."""
    from .daemon import install

    for path in install(prefix, openrc=openrc, config_file=config_file):
        echo_safe(f"wrote {path}")
    if openrc:
        click.echo("next: rc-update add kairos default && rc-service kairos start")
    else:
        click.echo("next: systemctl daemon-reload && systemctl enable --now kairos")


@cli.group()
def ledger() -> None:
    """Read and write the shared ledger of a running node."""


@ledger.command("get")
@click.argument("bucket")
@click.argument("key")
@socket_option
@json_option
@pass_context
def ledger_get(context: Context, bucket: str, key: str, socket_path: str | None, as_json: bool) -> None:
    """Print the value of BUCKET/KEY (JSON)."""
    entry = _client(context, socket_path).request("GET", f"/api/ledger/{_quote(bucket)}/{_quote(key)}")
    emit_json(entry if as_json else entry["value"])


@ledger.command("set")
@click.argument("bucket")
@click.argument("key")
@click.argument("value")
@socket_option
@json_option
@pass_context
def ledger_set(context: Context, bucket: str, key: str, value: str, socket_path: str | None, as_json: bool) -> None:
    """Set BUCKET/KEY to VALUE: JSON, or a plain string when it is not JSON."""
    try:
        json.loads(value)
        body = value
    except ValueError:
        body = json.dumps(value)
    entry = _client(context, socket_path).request("PUT", f"/api/ledger/{_quote(bucket)}/{_quote(key)}", content=body)
    if as_json:
        emit_json(entry)


@ledger.command("delete")
@click.argument("bucket")
@click.argument("key")
@socket_option
@pass_context
def ledger_delete(context: Context, bucket: str, key: str, socket_path: str | None) -> None:
    """Delete BUCKET/KEY."""
    _client(context, socket_path).request("DELETE", f"/api/ledger/{_quote(bucket)}/{_quote(key)}")


@ledger.command("list")
@click.argument("bucket", required=False)
@socket_option
@json_option
@pass_context
def ledger_list(context: Context, bucket: str | None, socket_path: str | None, as_json: bool) -> None:
    """List the buckets, or the items of BUCKET."""
    client = _client(context, socket_path)
    if bucket is None:
        buckets = client.request("GET", "/api/ledger")
        emit_json(buckets) if as_json else [echo_safe(name) for name in buckets]
        return
    items = client.request("GET", f"/api/ledger/{_quote(bucket)}")
    if as_json:
        emit_json(items)
    else:
        for key, value in sorted(items.items()):
            # The key is escaped (a tab or newline in it cannot fake a column or a row); the value
            # is JSON, escaped by json.dumps.
            click.echo(f"{escape_control(key)}\t{json.dumps(value, sort_keys=True)}")


@ledger.command("watch")
@click.argument("bucket", required=False)
@socket_option
@pass_context
def ledger_watch(context: Context, bucket: str | None, socket_path: str | None) -> None:
    """Print every change (one JSON line each) until interrupted."""
    params = {"bucket": bucket} if bucket else {}
    for update in _client(context, socket_path).stream("/api/watch", params=params):
        if isinstance(update, dict) and set(update) == {"error"}:
            # The node ended the stream (this process read too slowly): say so, and fail, so a
            # script that pipes the watch somewhere does not take the silence for "no changes".
            echo_safe(f"kairos: error: {update['error']}", err=True)
            raise SystemExit(1)
        click.echo(json.dumps(update, sort_keys=True))


def _quote(part: str) -> str:
    from urllib.parse import quote

    return quote(part, safe="")


@cli.command()
@click.option("-n", "--nodes", default=3, show_default=True, type=click.IntRange(1, 20), help="How many nodes.")
@click.option("--seconds", type=float, default=None, help="Stop after this long (default: until Ctrl-C).")
def demo(nodes: int, seconds: float | None) -> None:
    """Run a throwaway network of NODES nodes on loopback, with a fresh token, and narrate it."""
    import asyncio

    from .demo import run_demo

    asyncio.run(run_demo(nodes, seconds))


# -------------------------------------------------------------------------------------------------
# entry point
# -------------------------------------------------------------------------------------------------


def _config_path_from_argv(argv: list[str]) -> str | None:
    # The plugin manager (and so the command tree) is built before click parses arguments, and
    # config may disable plugins: peek at -c/--config the way click will read it.
    for index, arg in enumerate(argv):
        if arg in ("-c", "--config") and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return os.environ.get(CONFIG_ENV)


def build_cli(manager: KairosPluginManager) -> click.Group:
    """The root command with every plugin's subcommands added."""
    result = call_hook_sync(manager, "kairos_cli_commands", cli=cli)
    for failure in result.failures:
        click.echo(f"kairos: warning: plugin {failure.plugin} could not add its commands: {failure.error}", err=True)
    return cli


def _json_requested(argv: list[str]) -> bool:
    # As click parses it: "--json" before a "--" is the flag, after it an argument. Read from argv,
    # not from the parsed command, so that usage errors (raised while parsing) honour it too.
    options = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in options


def fail(message: str, exit_code: int, as_json: bool) -> None:
    """End the command with ``message`` and ``exit_code``: one escaped line on stderr, or with
    ``--json`` the object ``{"error": message, "exit_code": exit_code}`` on stdout."""
    if as_json:
        click.echo(json.dumps({"error": message, "exit_code": exit_code}))
    else:
        echo_safe(message, err=True)
    raise SystemExit(exit_code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: exit codes 1 (failed), 2 (usage or config), 3 (no node)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    as_json = _json_requested(argv)
    try:
        path = _config_path_from_argv(argv)
        raw = read_config_file(path) if path and Path(path).exists() else {}
        manager = make_plugin_manager(disabled=disabled_plugins(raw))
        command = build_cli(manager)
        command.main(argv, prog_name="kairos", standalone_mode=False, obj=manager)
    except click.exceptions.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    except click.ClickException as exc:
        code = exc.exit_code  # click's usage errors are EXIT_USAGE (2) already
        if as_json:
            fail(exc.format_message(), code, True)
        exc.message = escape_control(exc.message)  # it may quote an argument, a file name
        exc.show()
        raise SystemExit(code) from None
    except click.exceptions.Abort:
        fail("aborted" if as_json else "kairos: aborted", 130, as_json)
    except KairosError as exc:
        if debug:
            raise
        # The message may quote a key, a hostname or a config value: one escaped line (json.dumps
        # escapes it in the JSON form).
        fail(str(exc) if as_json else f"kairos: error: {exc}", exc.exit_code, as_json)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except Exception as exc:  # a bug: still one line unless the user asks for the traceback
        if debug:
            raise
        fail(f"kairos: internal error: {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 for a traceback)", EXIT_FAILED, as_json)
