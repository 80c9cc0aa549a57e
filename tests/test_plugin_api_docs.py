"""docs/plugin-api.md documents the whole public plugin API, and its walkthrough plugin works.

- Every name of ``kairos_core.plugin.__all__`` has a heading in docs/plugin-api.md, and every
  member of ``NodeView``, ``LedgerView`` and ``Stream`` a heading inside its class's section,
  showing the member's parameters in order: a name added to the API without its documentation
  fails here.
- The example plugin in ``examples/kairos-plugin-hello`` (imported from its directory, not
  installed) runs on in-process nodes: greetings replicate, the counter counts, the stream
  protocol answers, ``kairos hello`` prints the greetings.
- The example's modules import nothing of the core but ``kairos_core.plugin``.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import re
import sys
import tomllib
from pathlib import Path

import click
import pytest
from import_graph import imports_of
from click.testing import CliRunner

from kairos_core import plugin as api

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "plugin-api.md"
EXAMPLE = ROOT / "examples" / "kairos-plugin-hello"
EXAMPLE_PACKAGE = EXAMPLE / "kairos_plugin_hello"
PUBLIC_API = "kairos_core.plugin"
CLASSES = (api.NodeView, api.LedgerView, api.Stream)

if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))

from kairos_plugin_hello import cli as hello_cli  # noqa: E402  (needs the path above)
from kairos_plugin_hello import plugin as hello  # noqa: E402


# -------------------------------------------------------------------------------------------------
# (a) the reference covers the API
# -------------------------------------------------------------------------------------------------


def _headings(text: str) -> list[tuple[int, str]]:
    """``(level, text)`` of every markdown heading, fenced code blocks skipped (``# comments``)."""
    found, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"(#{1,6})\s+(.*)", line)
        if match:
            found.append((len(match.group(1)), match.group(2)))
    return found


def _code_spans(heading: str) -> list[str]:
    return re.findall(r"`([^`]+)`", heading)


def _members(cls: type) -> list[str]:
    """Public attributes and methods a protocol declares (annotations included)."""
    names = {name for name in vars(cls) if not name.startswith("_")}
    names |= {name for name in getattr(cls, "__annotations__", {}) if not name.startswith("_")}
    return sorted(names)


def _parameters(cls: type, member: str) -> list[str] | None:
    """The parameter names of a method (without ``self``), None for an attribute or property."""
    value = inspect.getattr_static(cls, member, None)
    if not inspect.isfunction(value):
        return None
    return [name for name in inspect.signature(value).parameters if name != "self"]


def _class_section(headings: list[tuple[int, str]], cls: type) -> list[tuple[int, str]]:
    """The headings under the one whose code span is the class's name, up to the next sibling."""
    for index, (level, heading) in enumerate(headings):
        if any(re.fullmatch(rf"(class\s+)?{cls.__name__}", code) for code in _code_spans(heading)):
            section = []
            for sub_level, sub_heading in headings[index + 1 :]:
                if sub_level <= level:
                    break
                section.append((sub_level, sub_heading))
            return section
    return []


def _shows(code: str, member: str, parameters: list[str] | None) -> bool:
    match = re.search(rf"\.{member}(\((?P<args>.*)\))?$", code)
    if match is None:
        return False
    if parameters is None:
        return match.group("args") is None
    if match.group("args") is None:
        return False
    words = iter(re.findall(r"\w+", match.group("args")))
    return all(any(word == name for word in words) for name in parameters)  # in order


def undocumented(text: str) -> list[str]:
    """What docs/plugin-api.md (``text``) lacks: API names without a heading, class members
    without a heading in their class's section (or with the wrong parameters)."""
    headings = _headings(text)
    spans = [code for _, heading in headings for code in _code_spans(heading)]
    missing = [name for name in api.__all__ if not any(re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", code) for code in spans)]
    for cls in CLASSES:
        section = _class_section(headings, cls)
        if not section:
            missing.append(f"{cls.__name__} (no section)")
            continue
        codes = [code for _, heading in section for code in _code_spans(heading)]
        for member in _members(cls):
            parameters = _parameters(cls, member)
            if not any(_shows(code, member, parameters) for code in codes):
                shown = f"({', '.join(parameters)})" if parameters is not None else ""
                missing.append(f"{cls.__name__}.{member}{shown}")
    return missing


def test_every_public_name_and_member_is_documented():
    missing = undocumented(DOC.read_text())
    assert not missing, f"docs/plugin-api.md does not document: {', '.join(missing)}"


def test_the_check_fails_for_an_undocumented_name_member_or_signature():
    text = DOC.read_text()
    # drop the headings of one constant and one method; garble the parameters of another
    lines = [line for line in text.splitlines() if not (line.startswith("#") and ("CORE_BUCKETS" in line or ".spawn(" in line))]
    text = "\n".join(lines).replace("`node.count(name, n=1)`", "`node.count(name)`")
    missing = undocumented(text)
    assert "CORE_BUCKETS" in missing
    assert "NodeView.spawn(coro, name)" in missing
    assert "NodeView.count(name, n)" in missing
    # a member named only in prose or in a code block is not documented
    assert "LedgerView.get(bucket, key)" in undocumented(
        re.sub(r"(?m)^#+ `node\.ledger\.get\(.*$", "node.ledger.get", DOC.read_text())
    )


def test_the_api_s_classes_have_the_members_the_check_looks_for():
    # guard the guard: the member walk sees methods, properties and annotated attributes
    assert {"peer_id", "config", "ledger", "leader", "open_stream", "call_hook"} <= set(_members(api.NodeView))
    assert {"get", "get_entry", "items", "set", "delete", "watch"} <= set(_members(api.LedgerView))
    assert {"peer_id", "protocol", "read_frame", "write_frame", "read", "write", "close", "reset"} <= set(_members(api.Stream))
    assert _parameters(api.NodeView, "call_hook") == ["name", "firstresult", "kwargs"]
    assert _parameters(api.NodeView, "leader") is None


def _fences(text: str) -> list[list[str]]:
    """The lines of every fenced code block."""
    blocks, current = [], None
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            if current is None:
                current = []
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_the_walkthrough_quotes_the_example_as_it_is():
    quoted = 0
    for block in _fences(DOC.read_text()):
        match = re.fullmatch(r"# (kairos_plugin_hello/\w+\.py|pyproject\.toml)", block[0]) if block else None
        if match is None:
            continue
        source = (EXAMPLE / match.group(1)).read_text()
        assert "\n".join(block[1:]) in source, f"the block quoting {match.group(1)} differs from the file"
        quoted += 1
    assert quoted >= 8


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_links_inside_the_reference_lead_to_headings():
    text = DOC.read_text()
    anchors = {_anchor(heading) for _, heading in _headings(text)}
    targets = re.findall(r"\]\(#([^)]+)\)", text)
    assert targets and not [t for t in targets if t not in anchors]


def test_the_guides_link_the_reference():
    assert "plugin-api.md" in (ROOT / "docs" / "plugins.md").read_text()
    readme = (ROOT / "README.md").read_text()
    assert any("docs/plugins.md" in line and "docs/plugin-api.md" in line for line in readme.splitlines())


# -------------------------------------------------------------------------------------------------
# (c) the example uses the public API only
# -------------------------------------------------------------------------------------------------


_imports = imports_of


def _reaches_into_the_core(package: Path) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        for line, imported in _imports(path):
            public = imported == PUBLIC_API or imported.startswith(PUBLIC_API + ".")
            if imported.split(".")[0] == "kairos_core" and not public:
                problems.append(f"{path.relative_to(package.parent)}:{line}: imports {imported}")
    return problems


def test_the_example_imports_only_the_public_plugin_api():
    assert sorted(p.name for p in EXAMPLE_PACKAGE.glob("*.py")) == ["__init__.py", "cli.py", "plugin.py"]
    problems = _reaches_into_the_core(EXAMPLE_PACKAGE)
    assert not problems, "\n".join(problems)
    used = {
        imported
        for path in EXAMPLE_PACKAGE.rglob("*.py")
        for _, imported in _imports(path)
        if imported.startswith(PUBLIC_API + ".")
    }
    assert used, "the walk found no import of the public API at all"
    assert {name.removeprefix(PUBLIC_API + ".") for name in used} <= set(api.__all__)


def test_the_import_walk_catches_a_reach_into_the_core(tmp_path):
    package = tmp_path / "kairos_plugin_bad"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import kairos_core.node\nfrom kairos_core import plugin\nfrom kairos_core.plugin import hookimpl\n"
        "from kairos_core.ledger import OPEN\n"
    )
    problems = _reaches_into_the_core(package)
    assert [p.split(": imports ")[1] for p in problems] == ["kairos_core.node", "kairos_core.ledger.OPEN"]


# -------------------------------------------------------------------------------------------------
# (b) the example plugin works
# -------------------------------------------------------------------------------------------------


def test_the_entry_point_names_the_plugin_module():
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["kairos"] == {"hello": "kairos_plugin_hello.plugin"}
    assert importlib.import_module("kairos_plugin_hello.plugin") is hello
    assert "kairos-core>=0.1,<0.2" in project["project"]["dependencies"]


def test_the_config_section_has_a_default_and_its_problems_are_reported():
    from kairos_core.config import resolve_config
    from kairos_core.errors import ConfigError
    from kairos_core.plugins import make_plugin_manager

    manager = make_plugin_manager(autoload=False, extra_plugins=[hello])
    # declared once, through the schema, with help (not by its defaults alone, which has none)
    from kairos_core.config import collect_schema
    from kairos_core.schema import NO_HELP

    assert not hasattr(hello, "kairos_config_defaults")
    section = collect_schema(manager)["hello"]
    assert section.help != NO_HELP and [(o.name, o.type, o.default) for o in section.options] == [("greeting", str, "hello")]
    assert all(o.help.strip() and o.help != NO_HELP for o in section.options)
    assert resolve_config({}, manager, env={})["hello"] == {"greeting": "hello"}
    assert resolve_config({"p2p": {"hello": {"greeting": "hi"}}}, manager, env={})["hello"]["greeting"] == "hi"
    for greeting, problem in (
        ("", "must not be empty"),
        ("x" * 201, "at most 200"),
        ("a\x1b[2J", "printable"),
        (3, "hello.greeting"),
    ):
        with pytest.raises(ConfigError) as exc:
            resolve_config({"hello": {"greeting": greeting}}, manager, env={})
        assert any(problem in line for line in exc.value.problems), exc.value.problems


def test_readers_keep_only_well_formed_greetings():
    good = {"hostname": "a", "greeting": "hi"}
    items = {"P1": good, "P1/extra": good, "P2": "hi", "P3": {"hostname": 1, "greeting": "hi"}, "P4": {"hostname": "d"}}
    assert hello.greetings(items) == {"P1": good}
    assert hello_cli.printable("ok\x1b[31m\nfake line\u202e") == "ok\\x1b[31m\\nfake line\\u202e"


@pytest.mark.slow
async def test_greetings_replicate_are_counted_and_the_protocol_answers(kairos_network):
    from kairos_core.cli import Context
    from kairos_core.identity import Identity

    net = await kairos_network(0)
    for index in range(3):
        await net.add_node(plugins=[hello], overrides={"hello": {"greeting": f"hello from {index}"}})
    a, b, c = net.nodes
    await net.fully_connected()
    expected = {n.peer_id: {"hostname": n.hostname, "greeting": f"hello from {i}"} for i, n in enumerate(net.nodes)}

    # every node greets under its own id at start-up, and every greeting reaches every node
    await net.wait_for(lambda: all(n.ledger.items(hello.BUCKET) == expected for n in net.nodes))
    # each counts the greetings of the two others, not its own, and publishes the counter
    await net.wait_for(lambda: all(n.counters["hello_greetings_seen"] == 2 for n in net.nodes))
    await asyncio.sleep(0.3)
    assert [n.status()["counters"]["hello_greetings_seen"] for n in net.nodes] == [2, 2, 2]

    # the bucket's policy is registered: nobody greets in another node's name
    with pytest.raises(api.LedgerError):
        a.ledger.set(hello.BUCKET, b.peer_id, {"hostname": "b", "greeting": "forged"})

    # the stream protocol answers with the hostname of the node asked
    assert await hello.ask_hostname(a, b.peer_id) == b.hostname
    assert await hello.ask_hostname(c, a.peer_id) == a.hostname
    # the serving end counts once it closed its side, which may be just after the asker returned
    await net.wait_for(lambda: (b.counters["hello_answered"], a.counters["hello_answered"]) == (1, 1))
    with pytest.raises(api.KairosError, match="advertises no address"):
        await hello.ask_hostname(a, Identity.generate().peer_id)  # nobody the node knows

    # `kairos hello` prints them through the local API of a running node
    group = click.Group("kairos")
    hello.kairos_cli_commands(cli=group)
    runner = CliRunner()

    def kairos(*argv: str):
        return runner.invoke(group, [*argv, "--socket", str(a.config.api_socket)], obj=Context(a.manager, None))

    result = await asyncio.to_thread(kairos, "hello")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"{n.hostname}: hello from {i} ({n.peer_id})" for i, n in sorted(enumerate(net.nodes), key=lambda t: t[1].hostname)
    ]
    result = await asyncio.to_thread(kairos, "hello", "--json")
    assert result.exit_code == 0 and json.loads(result.output) == expected
