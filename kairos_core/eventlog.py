"""Built-in plugin: logs membership, leader and ledger events, so ``kairos run`` shows what happens."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .plugins import hookimpl

if TYPE_CHECKING:
    from .events import LedgerUpdate, PeerEvent
    from .node import Node

log = logging.getLogger("kairos.events")


@hookimpl
def on_peer(node: "Node", event: "PeerEvent") -> None:
    """Log joins and leaves at INFO, entry updates at DEBUG."""
    level = logging.DEBUG if event.kind == "updated" else logging.INFO
    hostname = event.info.get("hostname") if event.info else None
    log.log(level, "peer %s %s%s", event.kind, event.peer_id, f" ({hostname})" if hostname else "", extra={"peer": event.peer_id})


@hookimpl
def on_leader_elected(node: "Node", leader: str, epoch: int) -> None:
    """Log every new leader with its epoch."""
    me = " (this node)" if leader == getattr(node, "peer_id", None) else ""
    log.info("leader %s%s, epoch %d", leader, me, epoch, extra={"peer": leader, "epoch": epoch})


@hookimpl
def on_ledger_update(node: "Node", update: "LedgerUpdate") -> None:
    """Log ledger changes at DEBUG: they are frequent."""
    action = "deleted" if update.deleted else "set"
    log.debug(
        "ledger %s/%s %s by %s%s",
        update.bucket,
        update.key,
        action,
        update.owner,
        " (local)" if update.local else "",
        extra={"peer": update.owner, "bucket": update.bucket, "key": update.key},
    )
