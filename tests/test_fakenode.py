"""The test kit's FakeNode is a faithful NodeView: every member, compatible signatures, working parts."""

from __future__ import annotations

import asyncio
import inspect
import typing

import pytest
from kairos_testing.fakenode import FakeNode

from kairos_core.errors import ConfigError, KairosError
from kairos_core.ledger import OWNER_KEYED, PolicyError
from kairos_core.plugin import LedgerView, NodeView, Option, Section


def protocol_members(protocol: type) -> set[str]:
    names = set(typing.get_type_hints(protocol))
    for klass in protocol.__mro__:
        if klass in (typing.Protocol, typing.Generic, object):
            continue
        names.update(name for name in vars(klass) if not name.startswith("_"))
    return names


def parameters(function: typing.Any) -> list[tuple[str, typing.Any, typing.Any]]:
    signature = inspect.signature(function)
    return [(p.name, p.kind, p.default) for p in signature.parameters.values()]


@pytest.mark.parametrize("protocol, fake", [(NodeView, FakeNode), (LedgerView, None)])
def test_the_fake_has_every_member_of_the_protocol_with_the_same_signature(protocol, fake):
    node = FakeNode()
    fake_class = fake or type(node.ledger)
    members = protocol_members(protocol)
    assert "open_stream" in members or "watch" in members  # the walk found the protocol's methods
    instance = node if fake else node.ledger
    for name in sorted(members):
        declared = inspect.getattr_static(protocol, name, None)
        implemented = inspect.getattr_static(fake_class, name, None)
        if declared is None or isinstance(declared, property):  # an attribute to read: the instance has it
            assert hasattr(instance, name), f"{fake_class.__name__} lacks {name}"
            assert not callable(implemented) or isinstance(implemented, property), f"{name} must not be a method"
            continue
        assert implemented is not None, f"{fake_class.__name__} lacks {name}"
        assert callable(implemented), name
        assert inspect.iscoroutinefunction(implemented) == inspect.iscoroutinefunction(declared), f"{name}: async or not"
        assert parameters(implemented) == parameters(declared), f"{name}: signature differs"
    node.ledger.close()


async def test_ledger_is_real_with_policies_and_watch():
    node = FakeNode(policies={"mine": OWNER_KEYED})
    watch = node.ledger.watch("mine")
    node.ledger.set("mine", f"{node.peer_id}/x", {"v": 1})
    with pytest.raises(PolicyError):
        node.ledger.set("mine", "someone-else/x", 1)
    update = await asyncio.wait_for(watch.__anext__(), 5)
    assert (update.bucket, update.value, update.local) == ("mine", {"v": 1}, True)
    assert node.ledger.get_entry("mine", f"{node.peer_id}/x").owner == node.peer_id
    with pytest.raises(PolicyError):
        node.ledger.set("nodes", "someone-else", {})  # the core's own policies hold too
    await node.aclose()


def test_config_is_validated_against_the_core_and_plugin_schemas():
    schema = Section("mine", Option("speed", int, 3, "how fast", minimum=1), help="a plugin section")
    node = FakeNode(config={"mine": {"speed": 4}, "p2p": {"network_id": "other"}}, schema=[schema])
    assert node.config["mine"]["speed"] == 4 and node.config.section("mine").speed == 4
    assert node.config["p2p"]["network_id"] == "other" and node.config["api"]["enable"] is True
    with pytest.raises(ConfigError, match="mine.speed"):
        FakeNode(config={"mine": {"speed": 0}}, schema=[schema])


async def test_members_leader_counters_states_and_tasks():
    node = FakeNode()
    node.add_peer("12D3KooWa", {"hostname": "a"})
    node.add_peer("12D3KooWb", {"hostname": "b"}, alive=False)
    assert node.members() == {"12D3KooWa": {"hostname": "a"}}
    assert [p["peer_id"] for p in node.membership.describe()] == ["12D3KooWa", "12D3KooWb"]
    assert node.leader is None and not node.is_leader
    node.set_leader(node.peer_id, 4)
    assert node.leader == (node.peer_id, 4) and node.is_leader and node.lease_holder(4) == node.peer_id
    assert node.lease_holder(3) is None
    node.count("mine_x")
    node.set_counters("mine", {"y": 7})
    node.counter("mine_z", "z things").inc(2)
    node.set_state("mine", "waiting")
    status = node.status()
    assert status["counters"]["mine_x"] == 1 and status["counters"]["mine_y"] == 7 and status["counters"]["mine_z"] == 2
    assert status["states"] == {"mine": "waiting"} and status["members"] == 1
    assert node.clock_version() < node.clock_version()

    async def forever():
        await asyncio.sleep(3600)

    async def fails():
        raise RuntimeError("boom")

    task = node.spawn(forever(), "forever")
    await asyncio.wait_for(node.spawn(fails(), "fails"), 5)
    assert node.counters["background_errors"] == 1  # logged and counted, as the node does
    await node.aclose()
    assert task.cancelled()
    assert await node.call_hook("anything") == [] and await node.call_hook("anything", firstresult=True) is None


async def test_streams_between_linked_fakes_are_framed_and_recorded():
    a, b = FakeNode(), FakeNode()

    async def echo(stream):
        while frame := await stream.read_frame(100):
            await stream.write_frame(frame.upper())
        await stream.close()

    b.serve("/kairos/echo/1.0.0", echo)
    with pytest.raises(KairosError, match="not connected"):
        await a.open_stream(b.peer_id, "/kairos/echo/1.0.0")
    a.link(b)
    assert a.neighbours() == {b.peer_id} and b.peer_id in a.members()
    with pytest.raises(KairosError, match="does not serve"):
        await a.open_stream(b.peer_id, "/kairos/other/1.0.0")
    stream = await a.open_stream(b.peer_id, "/kairos/echo/1.0.0")
    assert stream.peer_id == b.peer_id
    await stream.write_frame(b"hello")
    assert await stream.read_frame(100) == b"HELLO"
    await stream.write_frame(b"x" * 200)  # more than the handler accepts: it fails, the stream is reset
    with pytest.raises(KairosError):
        await stream.read_frame(100)
    assert a.opened[-1] == (b.peer_id, "/kairos/echo/1.0.0") and len(a.opened) == 3
    a.protect(b.peer_id, "echo")
    assert a.protected == {(b.peer_id, "echo")}
    a.unprotect(b.peer_id, "echo")
    assert not a.protected
    await a.aclose()
    await b.aclose()
