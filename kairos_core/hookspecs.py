"""The hooks through which plugins see and extend a kairos node.

Every hook may be implemented as a plain function or as ``async def``: the node awaits what an
implementation returns, each call under a timeout, and a plugin that raises or times out is logged
with its name while the other plugins and the node carry on (see :mod:`kairos_core.plugins`).

Implementations may accept fewer arguments than a spec names (pluggy passes only what they ask
for), so specs grow by adding parameters, never by reordering or removing them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from .events import LedgerUpdate, PeerEvent
    from .ledger.policy import WritePolicy
    from .node import Node
    from .schema import Section

hookspec = pluggy.HookspecMarker("kairos")

# -------------------------------------------------------------------------------------------------
# Registration
# -------------------------------------------------------------------------------------------------


@hookspec(historic=True)
def kairos_add_hookspecs(pluginmanager: pluggy.PluginManager) -> None:
    """Add hookspecs of a plugin's own, for other plugins to implement.

    Called once for every plugin right after it is registered (historic: plugins registered
    later still get the call). Implement it as
    ``pluginmanager.add_hookspecs(my_hookspecs_module)``. Implementations of hooks that may be
    absent (their plugin is not installed) should be marked ``@hookimpl(optionalhook=True)``.

    :param pluginmanager: the node's pluggy plugin manager.
    :return: ignored.
    """


# -------------------------------------------------------------------------------------------------
# Configuration and command line
# -------------------------------------------------------------------------------------------------


@hookspec
def kairos_config_schema() -> Iterable[Section] | None:
    """Declare the config sections a plugin owns: every option once, with its type, default and help.

    Called when a config file is loaded or checked, and by ``kairos config defaults``. Each
    :class:`kairos_core.plugin.Section` holds :class:`kairos_core.plugin.Option` declarations
    (type, default, help, minimum/maximum, choices, list item type, Kairos aliases) and nested
    sections; the core checks a user's file against them — unknown keys, wrong types, values out of
    range or not among the choices, each reported with its path — and prints every option's help.
    Read a section back typed with ``Section.read(node.config[name])``. Give a section
    ``aliases=("p2p.<name>",)`` when Kairos users write it under ``p2p:``.

    :return: the plugin's sections, or None for none. Two plugins may not declare one name.
    """


@hookspec
def kairos_config_defaults() -> Mapping[str, Mapping[str, Any]] | None:
    """Declare config sections by their defaults alone (the older form of ``kairos_config_schema``).

    Called when a config file is loaded or checked, before validation. The result maps a
    top-level section name to its defaults, e.g. ``{"vpn": {"interface": "edgevpn0", "mtu": 1420}}``.
    The type of each default is the type the option must have (an empty dict is a free-form
    mapping; ``None`` accepts any scalar), so unknown keys and wrong types in a user's file are
    reported with their path. A section that Kairos users write under ``p2p:`` (``p2p.vpn``) is
    read from there too. Such options have no help: prefer ``kairos_config_schema``.

    :return: section name → defaults, or None for no section. Two plugins may not claim one name.
    """


@hookspec
def kairos_config_problems(config: Mapping[str, Mapping[str, Any]]) -> Iterable[str] | None:
    """Report what is wrong with the values of a plugin's sections, beyond what the schema says.

    Called whenever a config is loaded or checked (``kairos config check``, ``kairos run``), after
    every section was merged over its defaults and passed the schema's checks (types, ranges,
    choices). Check what one option's declaration cannot say — a CIDR that parses, an address
    inside it, one option against another — and return one line per problem,
    starting with the option's path: ``"vpn.cidr: needs at least 4 addresses"``. The lines are
    reported with the core's problems and the config is refused, so a user learns of a typo from
    ``kairos config check`` rather than from a feature that silently stays off. No side effects.

    :param config: the merged config, section name → options (a copy: changes are ignored).
    :return: problem lines, or None (or nothing) when the plugin's sections are fine.
    """


@hookspec
def kairos_cli_commands(cli: click.Group) -> None:
    """Add subcommands to the ``kairos`` command line.

    Called once while the ``kairos`` command is built, before arguments are parsed. Implement it
    with ``@cli.command()`` or ``cli.add_command(...)``; raise :class:`kairos_core.errors.KairosError`
    from a command for a one-line error.

    :param cli: the root ``kairos`` click group.
    :return: ignored.
    """


# -------------------------------------------------------------------------------------------------
# Node lifecycle
# -------------------------------------------------------------------------------------------------


@hookspec
def kairos_startup(node: Node) -> Awaitable[None] | None:
    """Start a plugin's work on a node.

    Called once per node after the p2p host and the ledger are running, before the node announces
    itself and starts discovery (so a plugin can add to what it announces). A plugin creates its devices and background tasks here. An exception or
    a timeout is logged with the plugin's name; the node runs on without that plugin's startup.

    :param node: the running node (``node.config``, ``node.ledger``, ``node.peer_id``, …).
    :return: ignored.
    """


@hookspec
def kairos_shutdown(node: Node) -> Awaitable[None] | None:
    """Stop a plugin's work and release what it holds.

    Called once when the node stops (SIGINT, SIGTERM or ``Node.stop()``), before the p2p host
    closes, so a plugin may still write to the ledger. It should remove devices and routes it
    created and cancel its tasks. All shutdown hooks together get a few seconds (5 by default):
    shutdown never hangs on a plugin.

    :param node: the stopping node.
    :return: ignored.
    """


@hookspec
def kairos_ledger_policies(node: Node) -> Mapping[str, WritePolicy] | None:
    """Name the write policy of each ledger bucket a plugin owns.

    Called once per node while it opens its ledger, before any entry is loaded from disk or merged
    from a peer, so no entry of the plugin's buckets is ever judged by the open default. The node
    is not running yet: ``node.config``, ``node.peer_id`` and ``node.network_id`` are set,
    ``node.ledger`` and ``node.host`` are still None. Keep it synchronous and cheap.

    A policy judges an entry on its own, never against the clock or other entries (see
    :mod:`kairos_core.ledger.policy`): express ownership in keys (``OWNER_KEYED``:
    ``"<writer's peer id>/..."``) and let readers decide whose entries count. Bucket names are the
    full names the plugin writes; derive them from ``node.network_id`` to keep one per network.

    Unlike other hooks, a failure here stops the node at start-up, as a typo in a hook name does:
    an implementation that raises or answers anything but a mapping of bucket names to policies,
    a bucket claimed by two plugins, or one of the core's own (``nodes``, ``leader``). A bucket
    left open by mistake would accept forged entries, and every node would keep them.

    :param node: the node opening its ledger.
    :return: bucket name → write policy (e.g. ``{"vpn": OWNER_KEYED}``), or None for no bucket.
    """


# -------------------------------------------------------------------------------------------------
# Events
# -------------------------------------------------------------------------------------------------


@hookspec
def on_peer(node: Node, event: PeerEvent) -> Awaitable[None] | None:
    """React to a member joining, leaving or changing its advertised entry.

    Called on every node for each membership change it observes: ``joined`` once a peer is
    vouched for — connected to this node and admitted (it holds the token), or listed as a
    neighbour by an alive member —, ``left`` when nobody vouches for it any more (a crash is
    reported as soon as its neighbours notice), ``updated`` when its advertised entry in the
    ``nodes`` bucket changes (not on heartbeats or neighbour changes). Events for one peer arrive
    in order.

    :param node: this node.
    :param event: what happened, to which peer, with the peer's advertised entry.
    :return: ignored.
    """


@hookspec
def on_ledger_update(node: Node, update: LedgerUpdate) -> Awaitable[None] | None:
    """React to a change of one key in the shared ledger.

    Called on every node for each key whose winning entry changes, whether written here
    (``update.local``) or merged from a peer; not called for entries that lose the merge. Deletes
    arrive with ``value=None`` and ``deleted=True``.

    :param node: this node.
    :param update: bucket, key, new value, owner, version, and whether the write was local.
    :return: ignored.
    """


@hookspec
def kairos_leader_eligible(node: Node) -> bool | None:
    """Say whether this node may become the leader.

    Called on each election round (about twice a second, so keep it cheap and synchronous) and
    whenever the node advertises itself. Config ``election.eligible: false`` already rules a
    node out; a plugin can rule it out too — a k3s plugin might keep workers out of the running.

    :param node: this node.
    :return: False to make this node ineligible; True or None to leave the decision to others.
        One False is enough.
    """


@hookspec
def on_leader_elected(node: Node, leader: str, epoch: int) -> Awaitable[None] | None:
    """React to a new leader.

    Called on every node exactly once per (leader, epoch), when this node first learns that
    ``leader`` holds the lease in ``epoch``. The epoch grows with every change of leader and is a
    fencing token: stamp leader-only writes with it, and ignore writes of a lower epoch.

    :param node: this node.
    :param leader: the leader's peer id (it may be this node's own ``node.peer_id``).
    :param epoch: the lease's epoch.
    :return: ignored.
    """


# -------------------------------------------------------------------------------------------------
# Local API
# -------------------------------------------------------------------------------------------------


@hookspec
def kairos_api_routes(node: Node) -> Mapping[str, Callable[[str, list[str], Any], Any]] | None:
    """Add routes to the node's local API (the unix socket ``kairos`` commands talk to).

    Called (synchronously, so keep it cheap) for each request whose path starts with
    ``/api/plugins/<name>/``. Return ``{name: handler}``; the handler of ``<name>`` is called as
    ``handler(method, rest, body)`` on the event loop — ``rest`` the path's remaining parts
    (URL-decoded), ``body`` the decoded JSON body or None — and returns the JSON data to answer
    with. It must be synchronous and quick (start longer work with ``node.spawn``); a
    :class:`~kairos_core.errors.KairosError` it raises is answered as a 400 with its message.

    :param node: the running node.
    :return: route names to handlers, or None.
    """
