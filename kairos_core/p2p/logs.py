"""Make libp2p's logging part of ours, minus its noise (trap 8).

Importing libp2p sets the ``libp2p`` logger to ``propagate=False``, so none of its records reach
the handlers the node installs. We turn propagation back on, and demote the WARNING lines that
some modules emit in normal operation (failed DHT reads of departed peers, GRAFT floods, streams
opened during shutdown) to DEBUG, so that a WARNING from us still means something.
"""

from __future__ import annotations

import logging

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


def tame_libp2p_logging() -> None:
    """Re-attach libp2p's logger to ours and demote its routine warnings; idempotent.

    A logger's filters only see records created on that very logger, so the filter goes on
    every noisy module's logger that exists now; call this again after importing more of libp2p.
    """
    root = logging.getLogger("libp2p")
    root.propagate = True
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if not isinstance(logger, logging.Logger) or not name.startswith("libp2p."):
            continue
        if logger.level and logger.level < logging.WARNING:
            # some modules pin themselves to INFO (the auto-connector chatters every cycle)
            logger.setLevel(logging.NOTSET)
        if name.startswith(NOISY_PREFIXES):
            if _DEMOTE not in logger.filters:
                logger.addFilter(_DEMOTE)
