"""dns.configure_resolver's backup of the host's resolv.conf is never lost (found in review).

The plugin's runtime over the test kit's FakeNode, with real files in the test's tmp dir and a
real server on a loopback port.
"""

from __future__ import annotations

from kairos_plugin_dns import plugin as dns_plugin
from kairos_testing.fakenode import FakeNode

USERS_FILE = "# the user's own\nnameserver 192.0.2.53\nsearch example.\n"


def _node(tmp_path, configure: bool) -> FakeNode:
    resolv = tmp_path / "resolv.conf"
    config = {
        "node": {"state_dir": str(tmp_path / "state")},
        "dns": {
            "enable": True,
            "listen": "127.0.0.1:0",
            "configure_resolver": configure,
            "resolv_conf": str(resolv),
            "forward": ["127.0.0.1:9"],
        },
    }
    (tmp_path / "state").mkdir(exist_ok=True)
    return FakeNode(config=config, schema=dns_plugin.kairos_config_schema())


async def test_a_crash_then_configure_resolver_off_still_restores_the_users_file(tmp_path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(USERS_FILE)
    runtime = dns_plugin.Runtime(_node(tmp_path, configure=True))
    await runtime.start()
    assert "nameserver 127.0.0.1" in resolv.read_text()
    # the node is killed here (no stop); the user turns the option off and starts it again
    restarted = dns_plugin.Runtime(_node(tmp_path, configure=False))
    await restarted.start()
    try:
        assert resolv.read_text() == USERS_FILE
    finally:
        await restarted.stop()
        if runtime.server is not None:
            await runtime.server.stop()


async def test_a_failed_restore_never_overwrites_the_only_copy_of_the_users_file(tmp_path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(USERS_FILE)
    node = _node(tmp_path, configure=True)
    runtime = dns_plugin.Runtime(node)
    await runtime.start()
    backup = runtime._backup
    assert backup.read_text() == USERS_FILE
    # a restore that cannot happen (the backup is still there afterwards), then pointing again
    runtime._restore_resolver = lambda: None  # type: ignore[method-assign]
    runtime._point_resolver("127.0.0.1")
    try:
        assert backup.read_text() == USERS_FILE  # not replaced by our own file
        assert "restore it by hand" in str(node.states.get("dns"))
    finally:
        await runtime.server.stop()
