"""The state dir: where a node keeps its identity, ledger and sockets — readable by its owner only.

The ledger holds what plugins replicate (the k3s join token, for one), so nothing in the state dir
may be readable by other users, whatever existed before: systemd's ``StateDirectory=`` creates it
0755, an older version or an operator may have left files 0644. The dir is made 0700 and every
regular file in it 0600 before the node opens anything; sqlite creates its ``-wal`` and ``-shm``
files with the permissions of the database file, so the database is created 0600 up front.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def secure_state_dir(path: Path | str, create: tuple[str, ...] = ()) -> Path:
    """Create ``path`` if needed, make it and its files private; create ``create`` files 0600."""
    state = Path(path)
    state.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(state, DIR_MODE)
    for name in create:
        fd = os.open(state / name, os.O_WRONLY | os.O_CREAT, FILE_MODE)
        os.close(fd)
    for entry in os.scandir(state):
        if entry.is_file(follow_symlinks=False) and stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode) != FILE_MODE:
            os.chmod(entry.path, FILE_MODE)
    return state
