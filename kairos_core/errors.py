"""The exceptions a user may see.

Every error that reaches the command line is a :class:`KairosError`: the CLI prints its message
as one line and exits with its ``exit_code``; anything else is a bug and still gets one line.
"""


class KairosError(Exception):
    """An error with a message fit for the user; the CLI prints it as one line."""

    exit_code = 2


class TokenError(KairosError):
    """The network token is malformed or unusable."""


class IdentityError(KairosError):
    """The node's identity file is missing, corrupt or unsafe."""


class ConfigError(KairosError):
    """The config file is unreadable or invalid; ``problems`` lists every finding with its path."""

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        self.problems = list(problems or [])
        super().__init__(message)


class PluginError(KairosError):
    """A plugin could not be loaded or declares something invalid."""
