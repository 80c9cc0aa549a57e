"""The plugin contract: shipped plugins use only ``kairos_core.plugin``, and the node honours it.

A plugin that reaches into another core module works until that module changes; one that imports
another plugin it does not depend on breaks when installed alone. Both are caught here, by
walking the imports of every module of every plugin under ``plugins/``.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest
from import_graph import imports_of

from kairos_core import plugin as api
from kairos_core.config import resolve_config
from kairos_core.node import Node
from kairos_core.plugins import make_plugin_manager
from kairos_core.token import generate_token

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"
PUBLIC_API = "kairos_core.plugin"
# Test code lives in kairos-testing and in tests/: a runtime package that imports it would drag
# pytest into every installation.
TEST_ONLY = {"pytest", "_pytest", "pytest_asyncio", "hypothesis", "kairos_testing"}


def _distributions(root: Path) -> dict[str, tuple[str, set[str]]]:
    """plugin dir -> (its package name, the kairos-plugin-* distributions it depends on)."""
    out = {}
    for project in sorted(root.glob("*/pyproject.toml")):
        data = tomllib.loads(project.read_text())
        deps = {re.split(r"[\s<>=!~\[;]", dep, maxsplit=1)[0] for dep in data["project"].get("dependencies", [])}
        package = next(
            p.name for p in project.parent.iterdir() if p.name.startswith("kairos_plugin_") and (p / "__init__.py").exists()
        )
        out[project.parent.name] = (package, {d for d in deps if d.startswith("kairos-plugin-")})
    return out


_imports = imports_of


def _within(imported: str, module: str) -> bool:
    # a prefix test alone would let kairos_core.plugins (the core's manager) pass as kairos_core.plugin
    return imported == module or imported.startswith(module + ".")


def _violations(root: Path = PLUGINS) -> list[str]:
    dists = _distributions(root)
    package_of = {package: f"kairos-plugin-{name}" for name, (package, _) in dists.items()}
    problems = []
    for name, (package, depends_on) in dists.items():
        for path in sorted((root / name / package).rglob("*.py")):
            relative = path.relative_to(root / name / package)
            for line, imported in _imports(path):
                where = f"plugins/{name}/{package}/{relative}:{line}"
                if imported.split(".")[0] in TEST_ONLY:
                    problems.append(f"{where}: imports {imported} (test code belongs in kairos-testing)")
                if imported.startswith("kairos_core"):
                    allowed = imported == "kairos_core" or _within(imported, PUBLIC_API)
                    if not allowed:
                        problems.append(f"{where}: imports {imported} (plugins use {PUBLIC_API} only)")
                top = imported.split(".")[0]
                if top in package_of and top != package and package_of[top] not in depends_on:
                    problems.append(f"{where}: imports {top}, but {name} does not depend on {package_of[top]}")
    return problems


def test_shipped_plugins_import_only_the_public_plugin_api():
    problems = _violations()
    assert not problems, "\n".join(problems)


def test_the_import_walk_sees_a_reach_into_the_core_and_an_undeclared_plugin(tmp_path):
    # the walker itself must catch what it is there for
    for name, deps, body in (
        (
            "demo",
            '["kairos-core"]',
            "from kairos_core.election import lease_key\nfrom kairos_core.plugin import hookimpl\n"
            "from kairos_core.plugins import call_hook\nimport kairos_plugin_other\nimport pytest\n",
        ),
        ("other", '["kairos-core", "kairos-plugin-demo"]', "from kairos_plugin_demo import x\n"),
    ):
        package = tmp_path / name / f"kairos_plugin_{name}"
        package.mkdir(parents=True)
        (tmp_path / name / "pyproject.toml").write_text(f'[project]\nname = "kairos-plugin-{name}"\ndependencies = {deps}\n')
        (package / "__init__.py").write_text(body)
    problems = _violations(tmp_path)
    assert len(problems) == 4, problems
    assert "kairos_core.election" in problems[0] and "kairos_core.plugins.call_hook" in problems[1]
    assert "does not depend on kairos-plugin-other" in problems[2]
    assert "imports pytest (test code belongs in kairos-testing)" in problems[3]


def _protocol_members(protocol: type) -> set[str]:
    members = {name for name in vars(protocol) if not name.startswith("_")}
    members |= set(getattr(protocol, "__annotations__", {}))
    return members


@pytest.mark.parametrize("name", sorted(_protocol_members(api.NodeView)))
def test_the_node_offers_every_member_of_the_node_view(name):
    assert hasattr(Node, name) or name in _instance_attributes(), f"Node lacks NodeView.{name}"


def _instance_attributes() -> set[str]:
    source = inspect.getsource(Node.__init__)
    return set(re.findall(r"self\.([a-z_]+)\s*[:=]", source))


def test_every_public_name_of_the_api_has_a_docstring_or_is_a_documented_constant():
    missing = []
    for name in api.__all__:
        value = getattr(api, name)
        if isinstance(value, (dict, str)) or name.isupper() or name == "StreamHandler":  # constants, an alias
            continue
        if not (getattr(value, "__doc__", None) or "").strip():
            missing.append(name)
    assert not missing, missing


def test_the_package_re_exports_exactly_the_api():
    import kairos_core

    assert set(kairos_core.__all__) - {"__version__"} == set(api.__all__)
    assert kairos_core.NodeView is api.NodeView and kairos_core.hookimpl is api.hookimpl


def test_node_config_is_a_read_only_mapping_of_its_sections(tmp_path):
    # NodeView.config is typed Mapping: everything a Mapping offers must work on it
    config = resolve_config({"node": {"state_dir": str(tmp_path)}}, make_plugin_manager(autoload=False), env={})
    assert isinstance(config, Mapping)
    assert list(config) == list(config.keys()) and len(config) == len(list(config.items())) > 5
    assert config.get("no-such-section") is None and config.get("api") is config["api"] and "api" in config
    assert dict(config.items())["node"]["state_dir"] == str(tmp_path)
    with pytest.raises(KeyError, match="is the plugin that declares it installed"):
        config["no-such-section"]


@pytest.mark.parametrize("enable", [True, False])
def test_api_socket_is_the_api_s_socket_or_none_when_the_api_is_off(tmp_path, enable):
    raw = {
        "node": {"state_dir": str(tmp_path)},
        "api": {"enable": enable, "socket": str(tmp_path / "x.sock")},
        "p2p": {"network_token": generate_token().encode()},
    }
    node = Node(resolve_config(raw, make_plugin_manager(autoload=False), env={}), make_plugin_manager(autoload=False))
    assert node.api_socket == (tmp_path / "x.sock" if enable else None)


class _StartupProbe:
    """Records what a plugin's ``kairos_startup`` sees of the node."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.seen: dict[str, object] = {}

    @api.hookimpl
    def kairos_startup(self, node: api.NodeView) -> None:
        self.seen = {"lease_holder": node.lease_holder(self.epoch), "addresses": node.addresses()}


async def test_lease_holder_and_addresses_answer_from_kairos_startup_on(kairos_network):
    # Plugins start before the election does, and fence on epochs at once (k3s reads its roles):
    # on a restart the holder of an epoch must be known from the ledger already.
    net = await kairos_network(0)
    first = await net.add_node(name="solo")
    await net.wait_for(lambda: first.leader is not None, timeout=30)
    peer, epoch = first.leader
    assert first.lease_holder(epoch) == peer == first.peer_id and first.lease_holder(epoch + 1) is None
    await first.stop()
    probe = _StartupProbe(epoch)
    again = await net.add_node(plugins=[probe], name="solo")
    assert probe.seen["lease_holder"] == first.peer_id
    assert probe.seen["addresses"] and all(a.endswith(f"/p2p/{again.peer_id}") for a in probe.seen["addresses"])
    assert again.lease_holder(epoch) == first.peer_id and again.addresses() == probe.seen["addresses"]
