"""The systemd notify protocol, without systemd: a datagram to ``$NOTIFY_SOCKET``.

Under ``Type=notify`` systemd waits for ``READY=1`` before it counts the service started, and with
``WatchdogSec=`` it restarts a service that does not send ``WATCHDOG=1`` at least every
``$WATCHDOG_USEC`` microseconds. The protocol is one ``AF_UNIX`` ``SOCK_DGRAM`` message of
newline-separated ``KEY=value`` assignments to the socket named in ``$NOTIFY_SOCKET`` (a path, or
``@name`` for the abstract namespace). Outside systemd the variable is unset and every call here
does nothing, so ``kairos run`` behaves the same from a terminal.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)

#: The watchdog is fed this many times per ``WATCHDOG_USEC`` (systemd recommends twice at least).
WATCHDOG_PINGS_PER_PERIOD = 3


def _address(env: Mapping[str, str]) -> str | bytes | None:
    target = env.get("NOTIFY_SOCKET", "")
    if not target:
        return None
    if target.startswith("@"):  # abstract namespace: a leading NUL byte instead of the @
        return b"\0" + target[1:].encode()
    if target.startswith("/"):
        return target
    return None  # vsock and other transports: not ours to speak


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (``READY=1``, ``STATUS=…``, several lines at once) to the service manager.

    Returns whether it was sent: False when not under a manager that listens, or when the send
    failed (logged at debug: a missing notification must never stop the node).
    """
    address = _address(os.environ if env is None else env)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        log.debug("sd_notify %r failed: %s", message.split("\n", 1)[0], exc)
        return False
    return True


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog is asked for.

    ``$WATCHDOG_USEC`` is the period; ``$WATCHDOG_PID``, when set, names the process it is meant
    for (a child started by the service must not take it for itself).
    """
    env = os.environ if env is None else env
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000 / WATCHDOG_PINGS_PER_PERIOD
