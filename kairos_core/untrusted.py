"""Helpers for data that comes from outside this process: peers, files, tokens, API clients.

Two dangers recur wherever such data goes:

- **A terminal obeys what it prints.** A hostname or ledger key holding ``ESC ] 52`` writes the
  operator's clipboard, ``ESC ] 0`` retitles the window, and a newline in a log argument forges a
  log line. :func:`escape_control` turns every such character into a visible escape, and
  :class:`EscapingFormatter` applies it to every log line the CLI writes.
- **Nesting costs stack.** Python's parsers and copiers recurse once per level: a few thousand
  ``[`` raise ``RecursionError`` wherever they are parsed, copied or encoded. :func:`nesting_exceeds`
  bounds the depth of parsed data without recursing itself, so each reader can refuse it with its
  own documented error.
"""

from __future__ import annotations

import logging
import re
from itertools import chain
from typing import Any

# C0 controls, DEL and C1 controls (0x9b is a one-byte CSI to many terminals), the Unicode line
# and paragraph separators (line breaks to log viewers), the bidirectional overrides and
# isolates (they reorder what the reader sees, "Trojan Source"), and lone surrogates (they cannot
# be written to a UTF-8 stream at all: printing one raises UnicodeEncodeError).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: object) -> str:
    """``text`` (``str()`` of it) with every control character replaced by a visible escape.

    ``"\\x1b]52;c;…"`` becomes ``"\\\\x1b]52;c;…"``, a newline ``"\\\\x0a"``, U+202E ``"\\\\u202e"``;
    everything else, backslashes included, is left as it is, so ordinary text reads unchanged.
    Use it on anything a peer, a file or an API client supplied before it reaches a terminal or
    a log line. (JSON written with ``ensure_ascii`` is safe already: it escapes all of these.)
    """
    return _UNSAFE.sub(_visible, text if isinstance(text, str) else str(text))


class EscapingFormatter(logging.Formatter):
    """A formatter whose lines cannot carry terminal escapes or forge other lines.

    The rendered line (the message with its arguments, the logger's name) is passed through
    :func:`escape_control`, so a ``\\n`` in a peer's hostname shows as ``\\x0a`` on the one line
    it belongs to. A traceback keeps its newlines, which are ours, but loses every other control
    character.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 -- logging's name
        """The record's line, escaped."""
        return escape_control(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:  # noqa: N802 -- logging's name
        """The traceback with every control character but its line breaks escaped."""
        return "\n".join(escape_control(line) for line in super().formatException(ei).split("\n"))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802 -- logging's name
        """The stack dump, escaped line by line like a traceback."""
        return "\n".join(escape_control(line) for line in super().formatStack(stack_info).split("\n"))


def nesting_exceeds(value: Any, limit: int) -> bool:
    """True when lists and dicts in ``value`` nest more than ``limit`` levels deep.

    A scalar has depth 0, ``[]`` and ``{}`` depth 1, ``[[1]]`` depth 2. The walk goes level by
    level without recursion, so it is safe on any depth, and visits each container of a level
    once even when YAML aliases make many paths lead to it (a shared or self-containing list costs
    one visit per level, not one per path).
    """
    level = [value] if isinstance(value, (list, dict)) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        items = chain.from_iterable(c.values() if isinstance(c, dict) else c for c in level)
        children = [child for child in items if isinstance(child, (list, dict))]
        if len(children) > 64:  # cheap for small levels; for large ones it is what keeps aliases linear
            children = list({id(child): child for child in children}.values())
        level = children
    return False
