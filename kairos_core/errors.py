"""The exceptions a user may see, and the exit codes of the ``kairos`` command.

Every error that reaches the command line is a :class:`KairosError`: the CLI prints its message
as one line (a JSON object with ``--json``) and exits with its ``exit_code``; anything else is a
bug and still gets one line. The codes, documented in ``kairos --help`` and the README:

- :data:`EXIT_FAILED` (1): the operation failed (a missing ledger key, a write the ledger
  refused, a node that could not start); also a bug;
- :data:`EXIT_USAGE` (2): bad usage or bad input — a wrong option, a config or token that does
  not validate;
- :data:`EXIT_UNREACHABLE` (3): no node is running here, or its API cannot be reached.

A script can so tell "try again later" (3) from "fix the command" (2) from "it did not work" (1).
"""

from __future__ import annotations

import re

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

#: Config sections that installed plugins declare, and the distribution that provides each: a
#: config written for a plugin that is not installed gets this hint, not just "unknown".
PLUGIN_SECTIONS = {
    "vpn": "kairos-plugin-tunvpn",
    "k3s": "kairos-plugin-k3s",
    "k3s-agent": "kairos-plugin-k3s",
    "auto": "kairos-plugin-k3s",
    "kubevip": "kairos-plugin-kubevip",
    "services": "kairos-plugin-services",
}

# "vpn: unknown section" or "p2p.vpn: unknown key" (a plugin section written under p2p:).
_UNKNOWN_SECTION = re.compile(r"^(?:p2p\.)?([\w-]+): unknown (?:section|key)$")


class KairosError(Exception):
    """An error with a message fit for the user; the CLI prints it as one line and exits with
    ``exit_code`` (:data:`EXIT_FAILED` unless a subclass says otherwise)."""

    exit_code = EXIT_FAILED


class NodeUnreachable(KairosError):
    """No node is running where the command looked, or its local API does not answer."""

    exit_code = EXIT_UNREACHABLE


class TokenError(KairosError):
    """The network token is malformed or unusable."""

    exit_code = EXIT_USAGE


class IdentityError(KairosError):
    """The node's identity file is missing, corrupt or unsafe."""


class ConfigError(KairosError):
    """The config file is unreadable or invalid; ``problems`` lists every finding with its path.

    A problem that names an unknown section a known plugin provides (``vpn``, ``k3s``, …) gets a
    hint of what to install (:func:`with_plugin_hint`), in ``problems`` and in the message.
    """

    exit_code = EXIT_USAGE

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = [with_plugin_hint(problem) for problem in problems or []]
        for before, after in zip(problems or [], self.problems):
            if before != after:
                message = message.replace(before, after, 1)
        super().__init__(message)


class PluginError(KairosError):
    """A plugin could not be loaded or declares something invalid."""


def with_plugin_hint(problem: str) -> str:
    """``problem``, with "(install kairos-plugin-…)" added when it says that a section a known
    plugin provides is unknown: that plugin is not installed (or is disabled)."""
    match = _UNKNOWN_SECTION.match(problem)
    distribution = PLUGIN_SECTIONS.get(match.group(1)) if match else None
    if distribution is None:
        return problem
    return f"{problem} (install {distribution}, which provides it)"
