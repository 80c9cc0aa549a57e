"""``kairos daemon install``: the service files of ``contrib/``, written with this kairos's path.

The files ship in the package (``kairos_core/service_files``; ``contrib/`` links to them): a
systemd unit (``Type=notify``, watchdog, ``StateDirectory=kairos``, hardening that keeps
``CAP_NET_ADMIN`` and ``/dev/net/tun`` for the VPN) and an OpenRC script. Installing copies one of
them below ``--prefix`` (``/`` by default) with the ``kairos`` path replaced by the executable of
this process, and the config path by the one asked for.
"""

from __future__ import annotations

import os
import shutil
import sys
from importlib import resources
from pathlib import Path

from .errors import KairosError

#: The path of ``kairos`` and of the config as the shipped files name them.
SHIPPED_EXECUTABLE = "/usr/local/bin/kairos"
SHIPPED_CONFIG = "/etc/kairos/config.yaml"
UNIT = ("kairos.service", Path("etc/systemd/system/kairos.service"), 0o644)
OPENRC = ("kairos.openrc", Path("etc/init.d/kairos"), 0o755)


def shipped(name: str) -> str:
    """The text of a shipped service file (``kairos.service``, ``kairos.openrc``)."""
    return resources.files("kairos_core").joinpath("service_files", name).read_text()


def kairos_executable() -> str:
    """The absolute path of the ``kairos`` being run (else the one on PATH)."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "kairos" and argv0.exists():
        return str(argv0.resolve().parent / "kairos") if not argv0.is_absolute() else str(argv0)
    found = shutil.which("kairos") or str(Path(sys.executable).parent / "kairos")
    return str(Path(found).absolute())


def render(name: str, executable: str, config_file: str = SHIPPED_CONFIG) -> str:
    """A shipped file with the executable and the config path replaced."""
    for value, what in ((executable, "executable"), (config_file, "config file")):
        if not value.startswith("/") or any(c.isspace() or c in "\"'\\$`;" for c in value):
            raise KairosError(f"the {what} path must be absolute, without spaces or quotes: {value!r}")
    return shipped(name).replace(SHIPPED_EXECUTABLE, executable).replace(SHIPPED_CONFIG, config_file)


def install(
    prefix: Path, *, openrc: bool = False, config_file: str = SHIPPED_CONFIG, executable: str | None = None
) -> list[Path]:
    """Write the unit (or the OpenRC script) below ``prefix``; returns the paths written."""
    name, relative, mode = OPENRC if openrc else UNIT
    text = render(name, executable or kairos_executable(), config_file)
    target = Path(prefix) / relative
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".kairos-new")
        temporary.write_text(text)
        os.chmod(temporary, mode)
        os.replace(temporary, target)  # never a half-written unit
    except OSError as exc:
        raise KairosError(f"cannot write {target}: {exc.strerror or exc}") from None
    return [target]
