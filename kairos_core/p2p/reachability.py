"""Whether this node is publicly reachable, and where the others see it: dial-backs by admitted peers.

The equivalent of AutoNAT v1 over our admitted streams. A node asks a few admitted peers it is
connected to directly (not through a relay) over ``/kairos/reach/1.0.0``; each answers with the
address it sees the connection come from (what identify calls the observed address) and whether a
fresh TCP connect back to that IP, at the port the node listens on, got through within
:data:`DIAL_BACK_TIMEOUT`. Any success makes the node ``public``; answers that all failed make it
``private``; before any answer it is ``unknown``. A NAT router that drops unsolicited inbound
makes every dial-back fail, whatever its kind.

Why not py-libp2p's identify observed address and AutoNAT v1: identify is behind our gate and its
observed address is a single value per connection with no dial-back; libp2p's AutoNAT service
dials back through the same host, which keeps one connection per peer (trap 2) and so reuses
the connection it should test. Here the dial-back is a plain TCP connect from the answering
peer's machine.

Limits: the asker chooses only the port — the dial-back goes to the IP the connection came from,
so a peer cannot aim it at a third party; each peer gets at most one answer per
:data:`ANSWER_INTERVAL`, and at most :data:`MAX_DIAL_BACKS` run at once; refusals are counted.
Everything here runs on the host's trio thread.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable

import trio

from .frames import FrameError, read_frame, write_frame
from .gate import peer_of, quiet_close, quiet_reset

log = logging.getLogger(__name__)

REACH_PROTOCOL = "/kairos/reach/1.0.0"
PUBLIC, PRIVATE, UNKNOWN = "public", "private", "unknown"
DIAL_BACK_TIMEOUT = 3.0
ANSWER_INTERVAL = 10.0  # one answer per peer per this many seconds
MAX_DIAL_BACKS = 8
PEERS_PER_ROUND = 3
PROBE_INTERVAL = 60.0  # between rounds once the verdict is known
PROBE_RETRY = 3.0  # between rounds while it is unknown
NO_PEER_WAIT = 0.5  # between looks for a first peer to ask (a check, no traffic)


def _ip_multiaddr(ip: str, port: int) -> str:
    return f"/ip6/{ip}/tcp/{port}" if ":" in ip else f"/ip4/{ip}/tcp/{port}"


class Reachability:
    """Both sides of the dial-back: answering peers, and this node's own verdict."""

    def __init__(
        self, counters: dict[str, int], listen_port: Callable[[], int | None], on_change: Callable[[], None] = lambda: None
    ) -> None:
        self.counters = counters
        self._listen_port = listen_port
        #: called (trio side) when the verdict or the observed addresses change
        self.on_change = on_change
        self._host: Any = None
        self._answered: dict[str, float] = {}
        self._running_dial_backs = 0
        #: public, private or unknown
        self.state = UNKNOWN
        #: where admitted peers saw our connections come from (``/ip4/<ip>/tcp/<port>``)
        self.observed: list[str] = []

    def attach(self, host: Any) -> None:
        self._host = host

    def detach(self) -> None:
        self._host = None
        self._answered.clear()
        self.state, self.observed = UNKNOWN, []

    # --- answering --------------------------------------------------------------------------------
    async def serve(self, net_stream: Any) -> None:
        """``/kairos/reach/1.0.0`` (behind the gate): tell the asker what we see, dial it back."""
        peer = peer_of(net_stream)
        now = trio.current_time()
        if now - self._answered.get(peer, -ANSWER_INTERVAL) < ANSWER_INTERVAL or self._running_dial_backs >= MAX_DIAL_BACKS:
            self.counters["reach_refused"] += 1
            await quiet_reset(net_stream)
            return
        self._answered[peer] = now
        if len(self._answered) > 4096:
            self._answered.clear()
        try:
            with trio.fail_after(DIAL_BACK_TIMEOUT + 5):
                request = await read_frame(net_stream)
                port = request.get("port")
                if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                    raise FrameError("no valid port")
                remote = net_stream.get_remote_address()
                if not remote:
                    await write_frame(net_stream, {"observed": None, "reachable": None})
                    return
                ip, seen_port = str(remote[0]), int(remote[1])
                reachable = await self._dial_back(ip, port)
                await write_frame(net_stream, {"observed": _ip_multiaddr(ip, seen_port), "reachable": reachable})
        except (FrameError, trio.TooSlowError, OSError) as exc:
            self.counters["reach_bad_requests"] += 1
            log.debug("reachability request from %s dropped: %r", peer, exc)
            await quiet_reset(net_stream)
            return
        await quiet_close(net_stream)

    async def _dial_back(self, ip: str, port: int) -> bool:
        self._running_dial_backs += 1
        self.counters["reach_dial_backs"] += 1
        try:
            with trio.move_on_after(DIAL_BACK_TIMEOUT):
                stream = await trio.open_tcp_stream(ip, port)
                await stream.aclose()
                return True
            return False
        except OSError:
            return False
        finally:
            self._running_dial_backs -= 1

    # --- asking ---------------------------------------------------------------------------------
    async def ask(self, peer_id: Any) -> tuple[str | None, bool | None]:
        """``(observed address, reachable)`` as ``peer_id`` answers; ``(None, None)`` if it does not."""
        port = self._listen_port()
        if self._host is None or port is None:
            return None, None
        net_stream = None
        try:
            with trio.fail_after(DIAL_BACK_TIMEOUT + 5):
                net_stream = await self._host.new_stream(peer_id, [REACH_PROTOCOL])
                await write_frame(net_stream, {"port": port})
                answer = await read_frame(net_stream)
        except Exception as exc:  # the peer is gone, refuses, or is too old to know the protocol
            log.debug("reachability probe of %s failed: %r", peer_id, exc)
            return None, None
        finally:
            if net_stream is not None:
                await quiet_reset(net_stream)
        observed, reachable = answer.get("observed"), answer.get("reachable")
        if not isinstance(observed, str) or len(observed) > 128 or not isinstance(reachable, bool):
            return None, None
        return observed, reachable

    async def probe_forever(self, peers: Callable[[], list[Any]]) -> None:
        """Rounds of asking up to :data:`PEERS_PER_ROUND` of ``peers()`` (admitted, direct)."""
        while True:
            candidates = list(peers())
            if not candidates:
                await trio.sleep(NO_PEER_WAIT)  # ask as soon as the first peer is admitted
                continue
            random.shuffle(candidates)
            answers: list[tuple[str, bool]] = []
            for peer_id in candidates[:PEERS_PER_ROUND]:
                observed, reachable = await self.ask(peer_id)
                if observed is not None and reachable is not None:
                    answers.append((observed, reachable))
            if answers:
                state = PUBLIC if any(reachable for _, reachable in answers) else PRIVATE
                if state != self.state:
                    log.info("reachability: %s (observed as %s)", state, ", ".join(sorted({o for o, _ in answers})))
                observed = sorted({observed for observed, _ in answers})
                changed = (state, observed) != (self.state, self.observed)
                self.state, self.observed = state, observed
                if changed:
                    self.on_change()
            await trio.sleep(PROBE_RETRY if self.state == UNKNOWN else PROBE_INTERVAL)
