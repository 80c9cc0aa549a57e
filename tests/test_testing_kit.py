"""The test kit as plugin authors and ``kairos demo`` use it: strict asyncio mode, and no pytest needed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

NO_PYTEST = textwrap.dedent("""
    import builtins
    real_import = builtins.__import__
    def without_pytest(name, *args, **kwargs):
        if name.split(".")[0] in ("pytest", "_pytest", "pytest_asyncio"):
            raise ImportError("pytest is not installed here")
        return real_import(name, *args, **kwargs)
    builtins.__import__ = without_pytest
    import kairos_core.demo, kairos_core.localnet
    print("ok")
""")


def test_the_demo_needs_no_pytest():
    # a user who installed only the runtime packages runs `kairos demo`
    out = subprocess.run([sys.executable, "-c", NO_PYTEST], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_the_kairos_network_fixture_works_in_both_asyncio_modes(tmp_path, mode):
    (tmp_path / "test_author.py").write_text(
        textwrap.dedent("""
        import pytest

        @pytest.mark.asyncio
        async def test_two_nodes(kairos_network):
            net = await kairos_network(2)
            await net.fully_connected()
            assert all(len(node.members()) == 1 for node in net.nodes)
    """)
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            f"asyncio_mode={mode}",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
            str(tmp_path / "test_author.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout + out.stderr
