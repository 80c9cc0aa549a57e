"""The state dir and every file in it are private to the node's user, whatever existed before."""

from __future__ import annotations

import os
import stat

from kairos_core.statedir import secure_state_dir
from kairos_testing import LocalNetwork


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_an_existing_open_dir_and_its_files_become_private(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)  # what systemd's StateDirectory= makes
    (state / "old.txt").write_text("x")
    os.chmod(state / "old.txt", 0o644)
    secure_state_dir(state, create=("ledger.sqlite3",))
    assert mode(state) == 0o700
    assert mode(state / "old.txt") == 0o600 and mode(state / "ledger.sqlite3") == 0o600


async def test_a_node_keeps_its_ledger_and_its_wal_private(tmp_path):
    net = LocalNetwork(tmp_path)
    state = tmp_path / "n1"
    state.mkdir()
    os.chmod(state, 0o755)
    (state / "ledger.sqlite3").touch()
    os.chmod(state / "ledger.sqlite3", 0o644)
    old_umask = os.umask(0o022)  # a default umask would make new files 0644
    try:
        node = await net.add_node(name="n1")
        node.ledger.set("secrets", "token", "K10abc::server:xyz")
        files = sorted(p.name for p in state.iterdir() if p.is_file())
        assert {"ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm"} <= set(files)
        assert mode(state) == 0o700
        for name in files:
            assert mode(state / name) == 0o600, name
    finally:
        os.umask(old_umask)
        await net.stop()
