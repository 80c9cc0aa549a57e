"""Service runners: how k3s is started and kept running.

- :class:`SystemdRunner` — when systemd is PID 1: a unit file and an environment file, then
  ``systemctl daemon-reload`` and ``enable --now`` (``restart`` when a running unit changed).
- :class:`OpenRCRunner` — an init script and ``rc-update add`` / ``rc-service start|restart``.
- :class:`ProcessRunner` — no service manager (containers): a child of the node, restarted with a
  back-off when it exits, stopped with the node.

Every runner writes k3s's config file and is idempotent: applying the launch that already runs
rewrites nothing and restarts nothing, across restarts of the node too (files are compared with
what is on disk).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import signal
from contextlib import suppress
from pathlib import Path
from typing import Protocol

import yaml

from .launch import K3sLaunch
from .paths import K3sPaths
from .settings import RUNNER_KINDS
from .validate import env_name_ok

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 60.0
# k3s gets this long to exit after SIGTERM, then its process group is killed. It stays below the
# node's budget for kairos_shutdown (5 s), so a normal stop ends k3s here and not by cancellation.
STOP_TIMEOUT = 4.0
RESTART_BACKOFF = (1.0, 30.0)


class ServiceRunner(Protocol):
    """Starts k3s as a launch describes, and keeps it in line with later launches."""

    name: str

    async def apply(self, launch: K3sLaunch) -> bool:
        """Make k3s run as ``launch`` says; True when something was (re)started."""
        ...

    async def stop(self) -> None:
        """Release what the runner holds when the node stops (a service manager's unit keeps running)."""
        ...


class RunnerError(RuntimeError):
    """A service manager command failed."""


def write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write ``text`` to ``path`` atomically unless it already holds it; True when written."""
    try:
        if path.read_text() == text:
            return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return True


def config_text(launch: K3sLaunch) -> str:
    """k3s's config.yaml for a launch."""
    return "# Written by the kairos k3s plugin; edit k3s.args in the kairos config instead.\n" + yaml.safe_dump(
        launch.config, sort_keys=True, default_flow_style=False
    )


def env_text(env: dict[str, str]) -> str:
    """An environment file: ``NAME=value`` lines that systemd reads and OpenRC's ``sh`` sources.

    Every value that is not plain (letters, digits, ``@%+=:,./-_``) is single-quoted by
    :func:`shlex.quote`: inside single quotes neither ``sh`` nor systemd's parser expands anything
    (``$(…)``, backquotes, ``$VAR``), and a single quote in the value is closed, escaped and
    reopened, which both read the same way. Names must be plain variable names and values one line
    of text: anything else raises :class:`RunnerError` rather than write a file that some reader
    would take differently.
    """
    lines = []
    for name, value in sorted(env.items()):
        if not env_name_ok(name):
            raise RunnerError(f"environment variable name {name!r} is not a valid name")
        if not isinstance(value, str) or any(c in value for c in "\n\r\x00"):
            raise RunnerError(f"environment variable {name} must be one line of text")
        lines.append(f"{name}={shlex.quote(value)}\n")
    return "".join(lines)


def resolve_binary(binary: str) -> str:
    """An absolute path for ``binary`` (looked up on PATH), or the name itself when not found."""
    if os.sep in binary:
        return str(Path(binary).absolute())
    return shutil.which(binary) or binary


async def run_command(*argv: str, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run a service manager command; :class:`RunnerError` with its output when it fails."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL
        )
    except OSError as exc:
        raise RunnerError(f"{argv[0]}: {exc.strerror or exc}") from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        with suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise RunnerError(f"{shlex.join(argv)} timed out after {timeout:.0f} s") from None
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise RunnerError(f"{shlex.join(argv)} exited with {proc.returncode}: {text[-500:]}")
    return text


class _FileRunner:
    """Shared by the service-manager runners: config file, env file, service definition."""

    name = "files"

    def __init__(self, paths: K3sPaths) -> None:
        self.paths = paths
        self._applied: str | None = None  # fingerprint of the launch last applied in this process

    def _write_files(self, launch: K3sLaunch, service_file: Path, service_text: str, env_file: Path) -> bool:
        changed = write_if_changed(self.paths.config_file, config_text(launch), 0o600)
        changed |= write_if_changed(env_file, env_text(launch.env), 0o600)  # holds the token
        changed |= write_if_changed(service_file, service_text, 0o755 if service_file.parent == self.paths.openrc_dir else 0o644)
        return changed

    async def stop(self) -> None:
        """The service manager keeps k3s running when the node stops."""


class SystemdRunner(_FileRunner):
    """k3s as a systemd unit (``k3s.service`` or ``k3s-agent.service``)."""

    name = "systemd"

    def __init__(self, paths: K3sPaths, systemctl: str = "systemctl") -> None:
        super().__init__(paths)
        self.systemctl = systemctl

    def unit_file(self, service: str) -> Path:
        """The unit's path."""
        return self.paths.systemd_dir / f"{service}.service"

    def env_file(self, service: str) -> Path:
        """The unit's environment file (where the k3s installer puts it)."""
        return self.paths.systemd_dir / f"{service}.service.env"

    def unit_text(self, launch: K3sLaunch) -> str:
        """The unit file for a launch."""
        mode = "server" if launch.argv[:1] == ("server",) else "agent"
        return (
            "# Written by the kairos k3s plugin.\n"
            "[Unit]\n"
            f"Description=Lightweight Kubernetes ({mode}, managed by kairos)\n"
            "Documentation=https://k3s.io\n"
            "Wants=network-online.target\n"
            "After=network-online.target\n\n"
            "[Service]\n"
            f"Type={'notify' if mode == 'server' else 'exec'}\n"
            f"EnvironmentFile=-{self.env_file(launch.service)}\n"
            "KillMode=process\n"
            "Delegate=yes\n"
            "LimitNOFILE=1048576\n"
            "LimitNPROC=infinity\n"
            "LimitCORE=infinity\n"
            "TasksMax=infinity\n"
            "TimeoutStartSec=0\n"
            "Restart=always\n"
            "RestartSec=5s\n"
            "ExecStartPre=-/sbin/modprobe br_netfilter\n"
            "ExecStartPre=-/sbin/modprobe overlay\n"
            f"ExecStart={shlex.join(launch.command)}\n\n"
            "[Install]\n"
            "WantedBy=multi-user.target\n"
        )

    async def apply(self, launch: K3sLaunch) -> bool:
        """Write the unit; reload, enable and (re)start only what changed."""
        unit = self.unit_file(launch.service)
        existed = unit.exists()
        changed = self._write_files(launch, unit, self.unit_text(launch), self.env_file(launch.service))
        if not changed:
            if self._applied != launch.fingerprint():
                # first pass of this process: make sure the unit is enabled and running, no restart
                await run_command(self.systemctl, "enable", "--now", launch.service)
                self._applied = launch.fingerprint()
            return False
        await run_command(self.systemctl, "daemon-reload")
        if existed:
            await run_command(self.systemctl, "enable", launch.service)
            await run_command(self.systemctl, "restart", launch.service)
        else:
            await run_command(self.systemctl, "enable", "--now", launch.service)
        self._applied = launch.fingerprint()
        return True


class OpenRCRunner(_FileRunner):
    """k3s as an OpenRC service supervised by ``supervise-daemon``."""

    name = "openrc"

    def __init__(self, paths: K3sPaths, rc_service: str = "rc-service", rc_update: str = "rc-update") -> None:
        super().__init__(paths)
        self.rc_service = rc_service
        self.rc_update = rc_update

    def script_file(self, service: str) -> Path:
        """The init script's path."""
        return self.paths.openrc_dir / service

    def env_file(self, service: str) -> Path:
        """Environment sourced by the init script."""
        return self.paths.config_dir / f"{service}.env"

    def script_text(self, launch: K3sLaunch) -> str:
        """The init script for a launch."""
        return (
            "#!/sbin/openrc-run\n"
            "# Written by the kairos k3s plugin.\n"
            "depend() {\n    after network-online\n    want cgroups\n}\n\n"
            "supervisor=supervise-daemon\n"
            f"name={launch.service}\n"
            f"command={shlex.quote(launch.binary)}\n"
            f"command_args={shlex.quote(shlex.join(launch.argv))}\n"
            f"output_log=/var/log/{launch.service}.log\n"
            f"error_log=/var/log/{launch.service}.log\n"
            "respawn_delay=5\nrespawn_max=0\n\n"
            f"set -o allexport\n[ -f {shlex.quote(str(self.env_file(launch.service)))} ] && "
            f". {shlex.quote(str(self.env_file(launch.service)))}\nset +o allexport\n"
        )

    async def apply(self, launch: K3sLaunch) -> bool:
        """Write the script; add it to the default runlevel and (re)start only what changed."""
        script = self.script_file(launch.service)
        existed = script.exists()
        changed = self._write_files(launch, script, self.script_text(launch), self.env_file(launch.service))
        if not changed:
            if self._applied != launch.fingerprint():
                await run_command(self.rc_update, "add", launch.service, "default")
                await run_command(self.rc_service, launch.service, "start")
                self._applied = launch.fingerprint()
            return False
        await run_command(self.rc_update, "add", launch.service, "default")
        await run_command(self.rc_service, launch.service, "restart" if existed else "start")
        self._applied = launch.fingerprint()
        return True


class ProcessRunner:
    """k3s as a child process of the node, restarted with a back-off when it dies."""

    name = "process"

    def __init__(self, paths: K3sPaths) -> None:
        self.paths = paths
        self.launch: K3sLaunch | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.exits: list[int] = []
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    async def apply(self, launch: K3sLaunch) -> bool:
        """Start k3s, or restart it when the launch changed."""
        write_if_changed(self.paths.config_file, config_text(launch), 0o600)
        if self.launch == launch and self._supervisor is not None and not self._supervisor.done():
            return False
        await self._halt()
        self.launch = launch
        self._stopping = False
        started = asyncio.Event()
        self._supervisor = asyncio.get_running_loop().create_task(
            self._supervise(launch, started), name=f"{launch.service}-supervisor"
        )
        await started.wait()
        return True

    async def stop(self) -> None:
        """Stop k3s with the node."""
        await self._halt()

    async def _halt(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await asyncio.gather(self._supervisor, return_exceptions=True)
            except BaseException:
                if self.process is not None:  # cancelled meanwhile: see _terminate
                    _kill_group(self.process)
                raise
            self._supervisor = None
        await self._terminate()

    async def _terminate(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.returncode is not None:
            return
        with suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        except TimeoutError:
            _kill_group(proc)
            await proc.wait()
        except BaseException:
            # The node's shutdown ran out of time (its hook timeout cancels us) or is being torn
            # down: k3s must not outlive the node that started it, so kill it now, synchronously.
            _kill_group(proc)
            raise

    async def _supervise(self, launch: K3sLaunch, started: asyncio.Event) -> None:
        backoff = RESTART_BACKOFF[0]
        env = {name: os.environ[name] for name in ("PATH", "LANG", "HOME", "TMPDIR") if name in os.environ}
        env.update(launch.env)
        self.paths.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            while not self._stopping:
                # a local append-only file, opened once per start of the process
                with open(self.paths.log_dir / f"{launch.service}.log", "ab") as logfile:  # noqa: ASYNC230
                    try:
                        self.process = await asyncio.create_subprocess_exec(
                            *launch.command,
                            env=env,
                            stdin=asyncio.subprocess.DEVNULL,
                            stdout=logfile,
                            stderr=logfile,
                            start_new_session=True,
                        )
                    except FileNotFoundError:
                        self.process = None
                        log.error(
                            "cannot start k3s: %s not found (install k3s, set k3s.binary, or "
                            "k3s.enabled: false); retrying in %.0f s",
                            launch.binary,
                            backoff,
                        )
                    except OSError as exc:
                        self.process = None
                        log.error("cannot start %s: %s; retrying in %.0f s", launch.binary, exc.strerror or exc, backoff)
                self.starts += 1
                started.set()
                if self.process is not None:
                    code = await self.process.wait()
                    self.exits.append(code)
                    log.warning("%s exited with %d; restarting in %.0f s", launch.service, code, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RESTART_BACKOFF[1])
        finally:
            started.set()  # never leave apply() waiting; _halt() terminates the child


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    # k3s runs in a session of its own (start_new_session): its group is k3s and what it spawned
    # (containerd, for one), which SIGKILL leaves no chance to stop themselves.
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with suppress(ProcessLookupError):
            proc.kill()


def systemd_is_init() -> bool:
    """Whether systemd runs this machine (its runtime directory exists, as sd_booted checks)."""
    return Path("/run/systemd/system").is_dir()


def openrc_is_init() -> bool:
    """Whether OpenRC manages services here."""
    return Path("/run/openrc").is_dir() or Path("/sbin/openrc-run").exists()


RUNNERS = RUNNER_KINDS  # declared with the config schema, which offers them as k3s.runner


def make_runner(
    kind: str, paths: K3sPaths, *, systemctl: str = "systemctl", rc_service: str = "rc-service", rc_update: str = "rc-update"
) -> ServiceRunner:
    """The runner named by ``k3s.runner`` (``auto`` picks systemd, then OpenRC, then a process)."""
    if kind == "auto":
        kind = "systemd" if systemd_is_init() else "openrc" if openrc_is_init() else "process"
    if kind == "systemd":
        return SystemdRunner(paths, systemctl)
    if kind == "openrc":
        return OpenRCRunner(paths, rc_service, rc_update)
    if kind == "process":
        return ProcessRunner(paths)
    raise ValueError(f"k3s.runner: unknown runner {kind!r} (auto, systemd, openrc or process)")
