"""Make libp2p's logging part of ours, minus its noise (trap 8).

Importing libp2p sets the ``libp2p`` logger to ``propagate=False``, so none of its records reach
the handlers the node installs. We turn propagation back on, and demote the WARNING lines that
some modules emit in normal operation (failed DHT reads of departed peers, GRAFT floods, streams
opened during shutdown) to DEBUG, so that a WARNING from us still means something.

What is left at WARNING and above is rate-limited (:class:`RateLimit`): many of those lines are
written on a remote peer's behalf (a malformed message, a failed dial of an address it advertised),
and no peer may make us write thousands of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

# Modules whose warnings are routine in a healthy network.
NOISY_PREFIXES = (
    "libp2p.kad_dht",
    "libp2p.pubsub",
    "libp2p.network",
    "libp2p.host",
    "libp2p.stream_muxer",
    "libp2p.identity",
    "libp2p.protocol_muxer",
    "libp2p.security",
    "libp2p.transport",
    "libp2p.peer",
    "libp2p.rcmgr",
    "libp2p.tools",
)


# ERROR lines that are routine too: a failure libp2p also raises to the caller (who decides how
# bad it is), or a connection a peer dropped (which we see as a disconnect anyway).
ROUTINE_ERRORS = (
    "Failed to open stream",
    "Failed to open TCP stream",  # a refused or timed-out dial, raised as OpenConnectionError
    "MultiselectClient handshake",
    "Error in handle_incoming",
)


class DemoteWarnings(logging.Filter):
    """Rewrite routine WARNING records, and errors that are raised anyway, as DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Demote routine records in place; drop them when DEBUG is off."""
        routine = record.levelno == logging.WARNING
        if record.levelno == logging.ERROR and isinstance(record.msg, str):
            routine = record.msg.startswith(ROUTINE_ERRORS)
        if not routine:
            return True
        # The logger's level was checked before the filter ran: a demoted record must pass that
        # check again, or handlers without a level of their own would still print it.
        if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
            return False
        record.levelno = logging.DEBUG
        record.levelname = logging.getLevelName(logging.DEBUG)
        return True


_DEMOTE = DemoteWarnings()

# At most this many WARNING-or-worse lines per LOG_INTERVAL from one libp2p logger with one message
# template, and from one logger whatever the template (messages formatted before logging, f-strings,
# differ every time); the rest are counted and said to be suppressed.
LOG_INTERVAL = 60.0
LOG_BURST_PER_TEMPLATE = 5
LOG_BURST_PER_LOGGER = 20
# Templates remembered; past this, windows older than LOG_INTERVAL are forgotten (the per-logger
# bound holds meanwhile), so a flood of distinct messages cannot grow memory.
MAX_TEMPLATES = 1024


class _Window:
    """Lines let through in the interval that began at ``start``, and those suppressed."""

    __slots__ = ("start", "passed", "suppressed")

    def __init__(self, start: float) -> None:
        self.start, self.passed, self.suppressed = start, 0, 0


class RateLimit(logging.Filter):
    """Let at most a few WARNING-or-worse records through per interval, per logger and template.

    The last line let through before a template is suppressed says so, and the first one let
    through afterwards says how many similar lines were suppressed. Records below WARNING (the
    demoted ones included: this filter runs after :class:`DemoteWarnings`) always pass.
    Thread-safe: libp2p logs from every host's trio thread.
    """

    def __init__(
        self,
        interval: float = LOG_INTERVAL,
        per_template: int = LOG_BURST_PER_TEMPLATE,
        per_logger: int = LOG_BURST_PER_LOGGER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.interval, self.per_template, self.per_logger, self.clock = interval, per_template, per_logger, clock
        self._lock = threading.Lock()
        self._templates: dict[tuple[str, str], _Window] = {}
        self._loggers: dict[str, _Window] = {}
        #: records suppressed since this filter was made
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """False for a record over its budget; a note added to the first and last of a burst."""
        if record.levelno < logging.WARNING:
            return True
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        with self._lock:
            now = self.clock()
            by_template = self._window(self._templates, (record.name, template[:200]), now)
            by_logger = self._window(self._loggers, record.name, now)
            if by_template.passed >= self.per_template or by_logger.passed >= self.per_logger:
                by_template.suppressed += 1
                self.suppressed += 1
                return False
            by_template.passed += 1
            by_logger.passed += 1
            earlier, by_template.suppressed = by_template.suppressed, 0
            last = by_template.passed == self.per_template
        if earlier:
            self._note(record, f"{earlier} similar lines suppressed before this one")
        if last:
            self._note(record, f"more lines like this one suppressed for {self.interval:g} s")
        return True

    def _window(self, windows: dict, key: object, now: float) -> _Window:
        window = windows.get(key)
        if window is None:
            if len(windows) >= MAX_TEMPLATES:
                for stale in [k for k, w in windows.items() if now - w.start >= self.interval]:
                    del windows[stale]
                if len(windows) >= MAX_TEMPLATES:
                    windows.clear()
            window = windows[key] = _Window(now)
        elif now - window.start >= self.interval:
            # a new interval; what was suppressed in the last one is reported by the next line
            window.start, window.passed = now, 0
        return window

    @staticmethod
    def _note(record: logging.LogRecord, note: str) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot format fails in the handler, as it would have
            return
        record.msg, record.args = f"{message} [{note}]", None


_LIMIT = RateLimit()


def tame_libp2p_logging() -> None:
    """Re-attach libp2p's logger to ours, demote its routine warnings, rate-limit the rest; idempotent.

    A logger's filters only see records created on that very logger, so the filters go on every
    libp2p logger that exists now (demotion on the noisy modules' only, first); call this again
    after importing more of libp2p.
    """
    root = logging.getLogger("libp2p")
    root.propagate = True
    for name, logger in [("libp2p", root), *logging.root.manager.loggerDict.items()]:
        if not isinstance(logger, logging.Logger) or not (name == "libp2p" or name.startswith("libp2p.")):
            continue
        if name != "libp2p" and logger.level and logger.level < logging.WARNING:
            # some modules pin themselves to INFO (the auto-connector chatters every cycle)
            logger.setLevel(logging.NOTSET)
        if name.startswith(NOISY_PREFIXES):
            if _DEMOTE not in logger.filters:
                if _LIMIT in logger.filters:
                    logger.removeFilter(_LIMIT)  # the limit must see records after demotion
                logger.addFilter(_DEMOTE)
        if _LIMIT not in logger.filters:
            logger.addFilter(_LIMIT)
