"""A stand-in for systemctl, for tests.

Appends its arguments as one JSON line to ``FAKE_SYSTEMCTL_LOG``. ``start``, ``restart`` and
``enable --now`` run the unit's ``ExecStart`` once (found in ``FAKE_SYSTEMCTL_UNIT_DIR``), with the
variables of its ``EnvironmentFile`` and ``FAKE_K3S_ONESHOT=1``, and fail when it fails, as a
``Type=notify`` unit that never becomes ready would.
"""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path


def read_unit(path):
    command, env_files = None, []
    for line in path.read_text().splitlines():
        if line.startswith("ExecStart="):
            command = shlex.split(line[len("ExecStart=") :])
        elif line.startswith("EnvironmentFile="):
            env_files.append(line[len("EnvironmentFile=") :].lstrip("-"))
    return command, env_files


def read_env(path):
    env = {}
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return env
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            name, value = line.split("=", 1)
            parts = shlex.split(value)
            env[name] = parts[0] if parts else ""
    return env


def start(unit_dir, service):
    unit = Path(unit_dir) / (service if service.endswith(".service") else service + ".service")
    if not unit.exists():
        print(f"Failed to start {service}: Unit {unit.name} not found.", file=sys.stderr)
        return 5
    command, env_files = read_unit(unit)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FAKE_K3S_ONESHOT": "1"}
    for env_file in env_files:
        env.update(read_env(env_file))
    return subprocess.run(command, env=env).returncode


def main():
    args = sys.argv[1:]
    with open(os.environ["FAKE_SYSTEMCTL_LOG"], "a") as log:
        log.write(json.dumps(args) + "\n")
    unit_dir = os.environ.get("FAKE_SYSTEMCTL_UNIT_DIR", "/etc/systemd/system")
    words = [a for a in args if not a.startswith("-")]
    if not words:
        return 0
    verb, names = words[0], words[1:]
    if verb in ("start", "restart") or (verb == "enable" and "--now" in args):
        for name in names:
            code = start(unit_dir, name)
            if code:
                return 1
    if verb == "is-active":
        print("active")
    return 0


if __name__ == "__main__":
    sys.exit(main())
