"""The plugin manager, the async dispatcher, entry-point loading, and hook coverage."""

from __future__ import annotations

import asyncio
import operator
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pluggy
import pytest
from kairos_testing.fakenode import FakeNode

from kairos_core import hookspecs
from kairos_core.errors import PluginError
from kairos_core.events import LedgerUpdate, PeerEvent
from kairos_core.plugins import DEFAULT_PLUGINS, call_hook, call_hook_sync, hookimpl, make_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
HOOK_NAMES = sorted(name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith(("kairos_", "on_")))


# -------------------------------------------------------------------------------------------------
# Coverage: every hookspec is documented, has a docstring, and a test named test_hook_<name>
# -------------------------------------------------------------------------------------------------


def test_hookspecs_are_the_designed_set():
    assert set(HOOK_NAMES) >= {
        "on_peer",
        "on_ledger_update",
        "on_leader_elected",
        "kairos_startup",
        "kairos_shutdown",
        "kairos_config_defaults",
        "kairos_config_problems",
        "kairos_config_schema",
        "kairos_cli_commands",
        "kairos_add_hookspecs",
    }


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_plugin_hooks_have_docstrings(name):
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert "Called" in doc and ":return:" in doc, f"{name} needs a docstring saying when it is called and what it returns"


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_plugin_hooks_are_documented(name):
    docs = (ROOT / "docs" / "plugins.md").read_text()
    params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
    assert f"{name}({params})" in docs, f"docs/plugins.md lacks the signature {name}({params})"


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_plugin_hooks_have_tests(name):
    sources = [p.read_text() for p in [*ROOT.glob("tests/**/*.py"), *ROOT.glob("plugins/*/tests/**/*.py")]]
    assert any(re.search(rf"def test_hook_{name}\b", src) for src in sources), f"no test_hook_{name}"


# -------------------------------------------------------------------------------------------------
# Dispatcher
# -------------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self):
        self.calls = []


@pytest.fixture
def manager():
    return make_plugin_manager(autoload=False)


async def test_sync_and_async_implementations_are_awaited_concurrently(manager):
    order = []

    class Slow:
        @hookimpl
        async def on_leader_elected(self, leader, epoch):
            await asyncio.sleep(0.05)
            order.append(("slow", leader, epoch))
            return "slow"

    class Fast:
        @hookimpl
        async def on_leader_elected(self, node, leader, epoch):
            order.append(("fast", leader, epoch))
            return "fast"

    class Plain:
        @hookimpl
        def on_leader_elected(self, epoch):
            order.append(("plain", epoch))
            return "plain"

    for plugin in (Slow(), Fast(), Plain()):
        manager.register(plugin)
    result = await call_hook(manager, "on_leader_elected", node=None, leader="12D3KooWX", epoch=7)
    assert sorted(result.results) == ["fast", "plain", "slow"]
    assert order[-1][0] == "slow"  # the slow one did not block the fast one
    assert result.failures == []


async def test_failing_and_hanging_plugins_are_isolated_and_named(manager, caplog):
    seen = []

    class Broken:
        @hookimpl
        def on_peer(self, event):
            raise RuntimeError("boom")

    class Hangs:
        @hookimpl
        async def on_peer(self, event):
            await asyncio.sleep(10)

    class Good:
        @hookimpl
        async def on_peer(self, event):
            seen.append(event.peer_id)

    manager.register(Broken(), name="broken")
    manager.register(Hangs(), name="hangs")
    manager.register(Good(), name="good")
    caplog.set_level("ERROR")
    result = await call_hook(manager, "on_peer", timeout=0.1, node=None, event=PeerEvent("joined", "p1"))
    assert seen == ["p1"]
    assert {(f.plugin, type(f.error).__name__) for f in result.failures} == {
        ("broken", "RuntimeError"),
        ("hangs", "TimeoutError"),
    }
    assert "plugin broken: hook on_peer failed: RuntimeError: boom" in caplog.text
    assert "plugin hangs: hook on_peer timed out" in caplog.text


def test_typo_in_a_hook_name_fails_loudly():
    class Typo:
        @hookimpl
        def on_peers(self, node, event):
            pass

    with pytest.raises(PluginError, match="on_peers"):
        make_plugin_manager(autoload=False, extra_plugins=[Typo()])


def test_builtins_register_like_plugins_and_can_be_disabled():
    manager = make_plugin_manager(autoload=False)
    assert set(DEFAULT_PLUGINS) <= set(manager.plugin_names())
    rows = {row["name"]: row for row in manager.describe()}
    assert rows["kairos_core.eventlog"]["source"] == "builtin"
    assert "on_peer" in rows["kairos_core.eventlog"]["hooks"]
    disabled = make_plugin_manager(autoload=False, disabled=["kairos_core.eventlog"])
    assert "kairos_core.eventlog" not in disabled.plugin_names()


# -------------------------------------------------------------------------------------------------
# One test per hook (named test_hook_<name>, see test_plugin_hooks_have_tests)
# -------------------------------------------------------------------------------------------------


def test_hook_kairos_add_hookspecs():
    class K3sSpecs:
        @pluggy.HookspecMarker("kairos")
        def k3s_server_args(self, role):
            """Extra k3s server args."""

    class K3sLike:
        @hookimpl
        def kairos_add_hookspecs(self, pluginmanager):
            pluginmanager.add_hookspecs(K3sSpecs)

    class KubeVipLike:
        @hookimpl
        def k3s_server_args(self, role):
            return ["--tls-san=10.0.0.100"] if role == "master" else []

    # registered before the plugin that declares the spec: historic call resolves it anyway
    manager = make_plugin_manager(autoload=False, extra_plugins=[KubeVipLike(), K3sLike()])
    assert call_hook_sync(manager, "k3s_server_args", role="master").results == [["--tls-san=10.0.0.100"]]


def test_hook_kairos_config_defaults(manager):
    from kairos_core.config import collect_defaults

    class Declares:
        @hookimpl
        def kairos_config_defaults(self):
            return {"mine": {"speed": 3}}

    manager.register(Declares())
    defaults = collect_defaults(manager)
    assert defaults["mine"] == {"speed": 3}
    assert "p2p" in defaults  # the core's sections, declared through kairos_config_schema, are there too


def test_hook_kairos_config_schema(manager):
    from kairos_core.config import collect_schema, resolve_config
    from kairos_core.errors import ConfigError
    from kairos_core.plugin import Option, Section

    speed = Section(
        "mine",
        Option("speed", int, 3, "How fast.", minimum=1, maximum=10),
        Option("mode", str, "calm", "How.", choices=("calm", "wild")),
        Section("inner", Option("ratio", float, 0.5, "A share.", minimum=0, maximum=1), help="Nested."),
        help="My plugin.",
        aliases=("p2p.mine",),
    )

    class Declares:
        @hookimpl
        def kairos_config_schema(self):
            return [speed]

    manager.register(Declares(), name="declares")
    schema = collect_schema(manager)
    assert schema["mine"] is speed and "p2p" in schema  # the core declares its own through the same hook
    config = resolve_config({"p2p": {"mine": {"speed": 4}}, "mine": {"inner": {"ratio": 1}}}, manager, env={}, check_token=False)
    assert config["mine"] == {"speed": 4, "mode": "calm", "inner": {"ratio": 1.0}}
    settings = config.section("mine")
    assert (settings.speed, settings.mode, settings.inner.ratio) == (4, "calm", 1.0)
    with pytest.raises(ConfigError) as info:
        resolve_config({"mine": {"speed": 11, "mode": "lazy", "inner": {"ratio": "half"}}}, manager, env={}, check_token=False)
    assert info.value.problems == [
        "mine.speed: must be between 1 and 10, not 11",
        "mine.mode: 'lazy' is not one of calm, wild",
        "mine.inner.ratio: expected a number, got a string",
    ]

    class Twice:
        @hookimpl
        def kairos_config_defaults(self):
            return {"mine": {"speed": 1}}

    manager.register(Twice(), name="twice")
    with pytest.raises(ConfigError, match="'mine' is declared by both declares and twice"):
        collect_schema(manager)

    class NotSections:
        @hookimpl
        def kairos_config_schema(self):
            return [{"mine": {}}]

    other = make_plugin_manager(autoload=False, extra_plugins=[NotSections()])
    with pytest.raises(ConfigError, match="kairos_config_schema must return Sections, not dict"):
        collect_schema(other)


def test_hook_kairos_config_problems(manager):
    from kairos_core.config import resolve_config
    from kairos_core.errors import ConfigError

    class Checks:
        @hookimpl
        def kairos_config_defaults(self):
            return {"mine": {"low": 1, "high": 5}}

        @hookimpl
        def kairos_config_problems(self, config):
            mine = config["mine"]
            problems = [] if mine["low"] <= mine["high"] else [f"mine.low: above mine.high ({mine['high']})"]
            mine["low"] = 99  # a copy: the config being resolved is not touched
            return problems

    class Broken:
        @hookimpl
        def kairos_config_problems(self):
            raise RuntimeError("no idea")

    manager.register(Checks(), name="checks")
    assert resolve_config({"mine": {"low": 2}}, manager, env={}, check_token=False)["mine"] == {"low": 2, "high": 5}
    with pytest.raises(ConfigError) as info:
        resolve_config({"mine": {"low": 7}}, manager, env={}, check_token=False)
    assert info.value.problems == ["mine.low: above mine.high (5)"]
    manager.register(Broken(), name="broken")
    with pytest.raises(ConfigError) as info:
        resolve_config({}, manager, env={}, check_token=False)
    assert info.value.problems == ["plugin broken could not check its config: no idea"]


async def test_hook_on_peer(manager):
    class Watch:
        def __init__(self):
            self.events = []

        @hookimpl
        def on_peer(self, node, event):
            self.events.append((node, event.kind, event.peer_id, event.info))

    watch = Watch()
    manager.register(watch)
    await call_hook(manager, "on_peer", node="n", event=PeerEvent("left", "p2", {"hostname": "h"}))
    assert watch.events == [("n", "left", "p2", {"hostname": "h"})]


async def test_hook_on_ledger_update(manager):
    got = []

    class Watch:
        @hookimpl
        async def on_ledger_update(self, update):
            got.append((update.bucket, update.key, update.value, update.local))

    manager.register(Watch())
    update = LedgerUpdate("b", "k", {"v": 1}, "p", (1, 0, "p"), False, True)
    await call_hook(manager, "on_ledger_update", node=None, update=update)
    assert got == [("b", "k", {"v": 1}, True)]


async def test_hook_on_leader_elected(manager, caplog):
    caplog.set_level("INFO", logger="kairos.events")

    node = FakeNode()
    await call_hook(manager, "on_leader_elected", node=node, leader=node.peer_id, epoch=3)
    assert f"leader {node.peer_id} (this node), epoch 3" in caplog.text  # the built-in eventlog plugin
    await node.aclose()


async def test_a_plugin_cannot_change_the_node_s_config(kairos_network):
    refused = []

    class Writes:
        @hookimpl
        async def kairos_startup(self, node):
            for write in (
                lambda: operator.setitem(node.config["election"], "lease_seconds", 0.1),
                lambda: operator.setitem(node.config["p2p"]["connections"], "high", 1),
                lambda: node.config["p2p"]["bootstrap_peers"].append("/ip4/6.6.6.6/tcp/1"),
            ):
                try:
                    write()
                except (TypeError, AttributeError) as exc:
                    refused.append(type(exc).__name__)

    net = await kairos_network(1, plugins=[Writes()])
    node = net.nodes[0]
    assert refused == ["TypeError", "TypeError", "AttributeError"]
    assert node.config["election"]["lease_seconds"] == node.config.section("election").lease_seconds != 0.1
    assert node.config["p2p"]["connections"]["high"] != 1 and "/ip4/6.6.6.6/tcp/1" not in node.config["p2p"]["bootstrap_peers"]


async def test_hook_kairos_startup(manager):
    started = asyncio.Event()

    class Starts:
        @hookimpl
        async def kairos_startup(self, node):
            started.set()

    manager.register(Starts())
    await call_hook(manager, "kairos_startup", node=None)
    assert started.is_set()


async def test_hook_kairos_ledger_policies(kairos_network):
    from kairos_core.identity import Identity
    from kairos_core.ledger import OPEN, OWNER_KEYED, Entry, PolicyError, PolicyRegistry, Version

    seen = []

    class Owns:
        @hookimpl
        def kairos_ledger_policies(self, node):
            seen.append((node.peer_id, node.ledger))  # called before the ledger exists
            return {f"{node.network_id}/mine": OWNER_KEYED}

    net = await kairos_network(1, plugins=[Owns()])
    node = net.nodes[0]
    assert seen == [(node.peer_id, None)]
    bucket = "kairos/mine"
    assert node.ledger.policies.for_bucket(bucket) is OWNER_KEYED
    node.ledger.set(bucket, f"{node.peer_id}/x", 1)
    with pytest.raises(PolicyError):
        node.ledger.set(bucket, "someone-else/x", 1)
    intruder = Identity.generate()
    forged = Entry.signed(intruder, bucket, f"{node.peer_id}/x", 2, Version(node.ledger.clock.now_ms() + 1, 0, intruder.peer_id))
    assert node.ledger.apply_remote([forged]) == [] and node.ledger.counters["rejected_policy"] == 1
    assert node.ledger.get(bucket, f"{node.peer_id}/x") == 1
    # The core no longer names any plugin's bucket: tunvpn registers "vpn" through this hook.
    assert PolicyRegistry().for_bucket("vpn") is OPEN


@pytest.mark.parametrize(
    "answer, message",
    [
        ({"nodes": "OPEN"}, "not to a write policy"),
        ({"leader": None}, "not to a write policy"),
        (["mine"], "must return a mapping"),
        (RuntimeError("boom"), "could not name its ledger policies: RuntimeError: boom"),
    ],
)
async def test_a_bad_ledger_policy_answer_stops_the_node(kairos_network, answer, message):
    class Bad:
        @hookimpl
        def kairos_ledger_policies(self):
            if isinstance(answer, Exception):
                raise answer
            return answer

    with pytest.raises(PluginError, match=message):
        await kairos_network(1, plugins=[Bad()])


async def test_ledger_policies_may_not_replace_the_cores_or_claim_a_bucket_twice(kairos_network):
    from kairos_core.ledger import OPEN, OWNER_KEYED

    class OpensLeader:
        @hookimpl
        def kairos_ledger_policies(self):
            return {"leader": OPEN}

    class ClaimsMine:
        @hookimpl
        def kairos_ledger_policies(self):
            return {"mine": OWNER_KEYED}

    with pytest.raises(PluginError, match="'leader' is the core's"):
        await kairos_network(1, plugins=[OpensLeader()])
    with pytest.raises(PluginError, match="'mine' is claimed by both"):
        await kairos_network(1, plugins=[ClaimsMine(), ClaimsMine()])


def test_tunvpn_names_the_vpn_policy_through_the_hook():
    tunvpn = pytest.importorskip("kairos_plugin_tunvpn.plugin")
    from kairos_core.ledger import OWNER_KEYED

    assert tunvpn.TunVPNPlugin().kairos_ledger_policies() == {"vpn": OWNER_KEYED}
    assert tunvpn.kairos_ledger_policies() == {"vpn": OWNER_KEYED}  # the entry point's module-level hook


async def test_hook_kairos_shutdown(manager):
    stopped = []

    class Stops:
        @hookimpl
        def kairos_shutdown(self, node):
            stopped.append(node)

    manager.register(Stops())
    await call_hook(manager, "kairos_shutdown", node="n")
    assert stopped == ["n"]


# -------------------------------------------------------------------------------------------------
# Entry points, autoload switch, `kairos plugins` and plugin CLI commands, as real processes
# -------------------------------------------------------------------------------------------------


@pytest.fixture
def installed_plugin(tmp_path):
    """A real distribution on sys.path with an entry point in group `kairos`."""
    (tmp_path / "kairos_demo_plugin.py").write_text(
        textwrap.dedent('''
        import click
        from kairos_core.plugins import hookimpl

        @hookimpl
        def kairos_cli_commands(cli):
            @cli.command()
            def hello():
                """Say hello from a plugin."""
                click.echo("hello from the demo plugin")

        @hookimpl
        def kairos_config_defaults():
            return {"demo": {"greeting": "hi"}}
    ''')
    )
    dist = tmp_path / "kairos_demo_plugin-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kairos-demo-plugin\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[kairos]\ndemo = kairos_demo_plugin\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("KAIROS_DISABLE_PLUGIN_AUTOLOAD", None)
    return env


def kairos(*argv, env):
    return subprocess.run([sys.executable, "-m", "kairos_core", *argv], capture_output=True, text=True, env=env)


def test_hook_kairos_cli_commands(installed_plugin):
    done = kairos("hello", env=installed_plugin)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "hello from the demo plugin"


def test_entry_point_plugins_are_listed_with_version_and_hooks(installed_plugin):
    done = kairos("plugins", "--json", env=installed_plugin)
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert rows["demo"]["distribution"] == "kairos-demo-plugin"
    assert rows["demo"]["version"] == "1.2.3"
    assert rows["demo"]["hooks"] == ["kairos_cli_commands", "kairos_config_defaults"]
    assert rows["kairos_core.config"]["hooks"] == ["kairos_config_problems", "kairos_config_schema"]
    table = kairos("plugins", env=installed_plugin)
    assert "kairos-demo-plugin" in table.stdout and "1.2.3" in table.stdout


def test_autoload_can_be_switched_off(installed_plugin):
    env = {**installed_plugin, "KAIROS_DISABLE_PLUGIN_AUTOLOAD": "1"}
    names = [row["name"] for row in json.loads(kairos("plugins", "--json", env=env).stdout)]
    assert "demo" not in names and "kairos_core.eventlog" in names
    assert kairos("hello", env=env).returncode == 2  # the command is gone: click's usage error


def test_config_can_disable_one_plugin(installed_plugin, tmp_path):
    config = tmp_path / "kairos.yaml"
    config.write_text("plugins:\n  disabled: [demo]\n")
    names = [row["name"] for row in json.loads(kairos("-c", str(config), "plugins", "--json", env=installed_plugin).stdout)]
    assert "demo" not in names


def test_a_plugin_that_fails_to_import_is_reported_not_fatal(installed_plugin, tmp_path):
    (tmp_path / "kairos_demo_plugin.py").write_text("raise ImportError('missing dependency xyz')\n")
    done = kairos("plugins", "--json", env=installed_plugin)
    assert done.returncode == 0
    report = json.loads(done.stdout)
    assert "missing dependency xyz" in report["load_errors"]["demo"]
    assert "Traceback" not in done.stderr
