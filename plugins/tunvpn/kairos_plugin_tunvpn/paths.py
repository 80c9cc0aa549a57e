"""The path ladder: which way one peer's sealed datagrams go — the best path that works, no flapping.

Rungs, best first (issue #15):

1. ``direct`` — UDP to the peer's endpoint (the one it advertises, or where its authentic
   datagrams come from);
2. ``punched`` — UDP to an endpoint learned by hole punching (:mod:`.punch`): as good as direct;
3. ``relay via <peer>`` — sealed datagrams to a relay node that forwards them; the relay never
   holds the keys (the sealing stays end to end);
4. ``stream`` — the libp2p stream (:mod:`.fallback`): there while the peers are connected at all.

A :class:`Path` says how to send: ``endpoint`` for the UDP rungs (the data plane sends there
itself), ``send`` for the others (one sealed datagram per call, from a forwarding thread; it must
not block). Whoever can carry a peer's datagrams another way plugs in as a :class:`PathSource`
(:meth:`~.vpn.VPN.add_path_source`): on every link tick the VPN asks each source for its working
paths to each peer, adds the UDP and stream rungs it knows itself, and lets the link's
:class:`PathLadder` choose.

The ladder moves *down* at once when the path in use stops working, and *up* to a better path
at once while every move up held, else only to one that has worked ``settle`` seconds in a row;
a move up that does not hold for
:attr:`PathHysteresis.stable` seconds doubles the wait before the next one
(:class:`~.fallback.PathHysteresis`). So a path that comes and goes cannot make the link flap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .fallback import PathHysteresis

DIRECT, PUNCHED, RELAY, STREAM = "direct", "punched", "relay", "stream"
#: lower is better; direct and punched UDP are equally good
RANKS = {DIRECT: 0, PUNCHED: 0, RELAY: 1, STREAM: 2}
KINDS = tuple(RANKS)
#: seconds a better path must have worked in a row before the ladder moves up to it
SETTLE = 1.0


@dataclass(frozen=True)
class Path:
    """One way to a peer.

    :param kind: :data:`DIRECT`, :data:`PUNCHED`, :data:`RELAY` or :data:`STREAM`.
    :param via: the relay's peer id (``relay`` only).
    :param endpoint: where the data plane sends the datagrams itself (``direct``, ``punched``).
    :param send: takes one sealed datagram (``relay``, ``stream``); not compared.
    """

    kind: str
    via: str | None = None
    endpoint: tuple[str, int] | None = None
    send: Callable[[bytes], object] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in RANKS:
            raise ValueError(f"unknown path kind {self.kind!r}: one of {', '.join(KINDS)}")

    @property
    def name(self) -> str:
        """What ``kairos vpn status`` and ``kairos peers`` show: ``relay via <peer>`` or the kind."""
        return f"relay via {self.via}" if self.kind == RELAY else self.kind

    @property
    def rank(self) -> int:
        return RANKS[self.kind]

    @property
    def rung(self) -> tuple[str, str | None]:
        """The path's identity on the ladder: UDP to a moving endpoint (direct or punched) is one
        path, each relay another."""
        return ("udp", None) if self.rank == 0 else (self.kind, self.via)


class PathSource(Protocol):
    """Something besides direct UDP and the stream that can carry a peer's sealed datagrams."""

    def paths(self, peer_id: str, now: float) -> Iterable[Path]:
        """The paths to ``peer_id`` that work at ``now`` (``time.monotonic()``), any order."""
        ...


class PathLadder:
    """The path of one link, chosen among the paths that work, best first, with hysteresis.

    :param hysteresis: the back-off of moves up that did not hold (shared with the UDP trials).
    :param settle: seconds a better path must have worked before the ladder moves to it.
    """

    def __init__(self, hysteresis: PathHysteresis | None = None, settle: float = SETTLE) -> None:
        self.hysteresis = hysteresis or PathHysteresis()
        self.settle = settle
        self.current = Path(STREAM)
        self.since = 0.0
        #: times the ladder changed rung
        self.switches = 0
        self._last_up = -1e9
        # rung -> since when it has worked without a break
        self._working_since: dict[tuple[str, str | None], float] = {}

    def start(self, path: Path, now: float) -> None:
        """Begin on ``path`` (a new link tries UDP before it is known to work)."""
        self.current, self.since = path, now

    def choose(self, now: float, working: Iterable[Path]) -> Path:
        """The path to use at ``now`` given the paths that work now (the stream always does)."""
        by_rung: dict[tuple[str, str | None], Path] = {}
        for path in working:
            best = by_rung.get(path.rung)
            if best is None:
                by_rung[path.rung] = path
        by_rung.setdefault(Path(STREAM).rung, self.current if self.current.kind == STREAM else Path(STREAM))
        self._working_since = {rung: self._working_since.get(rung, now) for rung in by_rung}
        current = by_rung.get(self.current.rung)
        candidates = sorted(by_rung.values(), key=lambda p: (p.rank, p.kind != DIRECT))
        if current is None:
            # the path in use stopped working: down at once, to the best that works
            self.hysteresis.went_down(now)
            return self._switch(candidates[0], now)
        self.current = current  # the same rung, perhaps a new endpoint or sender
        if current.rank > 0:
            for better in candidates:
                if better.rank >= current.rank:
                    break
                # a link whose moves up all held takes a better path at once (a new link's first
                # UDP); after one that did not, the path must have worked `settle` s in a row
                settled = now - self._working_since[better.rung] >= self.settle
                ripe = settled or self.hysteresis.failures == 0
                # the wait between moves up is for links whose last move up did not hold: a link
                # that went stream -> relay a moment ago takes punched UDP at once
                if ripe and (self.hysteresis.failures == 0 or self.hysteresis.may_try(now, self._last_up)):
                    self._last_up = now
                    self.hysteresis.went_up(now)
                    return self._switch(better, now)
        else:
            self.hysteresis.holding(now)
        return current

    def _switch(self, path: Path, now: float) -> Path:
        if path.rung != self.current.rung:
            self.switches += 1
            self.since = now
        self.current = path
        return path
