"""Log setup of ``kairos run``: level and format (``text`` or ``json``), changeable while it runs.

Formats:

- ``text``: ``2026-12-02 01:02:03,456 INFO kairos_core.node: node 12D3… up on …``; every line
  escaped by :class:`~.untrusted.EscapingFormatter` (a peer's hostname cannot forge a line). The
  structured fields are in the message already; only ``json`` writes them as fields.
- ``json``: one object per line — ``time`` (UTC, ISO 8601 with milliseconds), ``level``,
  ``logger``, ``message``, the structured fields the code passes (:data:`FIELDS`, through
  ``extra={"peer": …, "epoch": …}``) and ``exception`` with the traceback. ``json.dumps`` escapes
  every control character (``ensure_ascii``), so a peer's strings stay inert there too.

The level comes from ``--log-level``, else ``node.log_level`` (``-v`` lowers it further); ``kairos
run`` re-reads the config on SIGHUP and applies a changed ``node.log_level`` / ``node.log_format``
(:func:`configure` again). No other option is reloaded.

``kairos_core/p2p/logs.py`` is another matter: it rate-limits what libp2p itself logs.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from .untrusted import EscapingFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Record attributes written as fields when a log call passes them in ``extra``.
FIELDS = ("peer", "bucket", "key", "epoch", "plugin", "protocol")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
FORMATS = ("text", "json")
# Handlers this module installed carry this attribute; configure() only ever touches those.
_MARK = "_kairos_handler"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {name: getattr(record, name) for name in FIELDS if getattr(record, name, None) is not None}


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as JSON (control characters escaped by ``ensure_ascii``)."""
        created = time.gmtime(record.created)
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, ensure_ascii=True, default=str)


def formatter(fmt: str) -> logging.Formatter:
    """The formatter of ``fmt`` (``text`` or ``json``)."""
    if fmt == "json":
        return JSONFormatter()
    if fmt == "text":
        return EscapingFormatter(TEXT_FORMAT)
    raise ValueError(f"log format {fmt!r}: text or json")


def setup(level: int, fmt: str = "text") -> None:
    """Log to stderr at ``level`` in ``fmt``. Like :func:`logging.basicConfig`, it adds no handler
    when the root logger has one already (a test's, an embedding program's), only sets the level."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler()
        setattr(handler, _MARK, True)
        handler.setFormatter(formatter(fmt))
        root.addHandler(handler)
    root.setLevel(level)


def configure(level: int | None = None, fmt: str | None = None) -> None:
    """Change the level and/or the format of the handlers :func:`setup` installed, now."""
    root = logging.getLogger()
    if level is not None:
        root.setLevel(level)
    if fmt is not None:
        for handler in root.handlers:
            if getattr(handler, _MARK, False):
                handler.setFormatter(formatter(fmt))


def level_of(name: str) -> int:
    """The ``logging`` level of ``debug|info|warning|error``; ValueError for anything else."""
    try:
        return LEVELS[str(name).lower()]
    except KeyError:
        raise ValueError(f"log level {name!r}: one of {', '.join(LEVELS)}") from None
