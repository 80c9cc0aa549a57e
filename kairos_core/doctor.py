"""``kairos doctor``: why a node has no peers, no leader or no VPN path, one check at a time.

The running node diagnoses itself (``GET /api/doctor``) — it alone knows what its discovery found,
whom it refused and why, what its peers' clocks say — and the CLI prints one line per check::

    ok    token      fingerprint 3f2a…, network kairos, crypto OTP window 4811 (rotates in 212 s)
    warn  peers      no peer alive: mDNS found none, the DHT found none, no bootstrap peer

Each check is ``{"check", "status", "detail"}`` plus ``"hint"`` (what to do) when it is not ok;
``status`` is ``ok``, ``warn`` (the node works, but not as a network yet) or ``fail`` (something
keeps it from ever working as configured); ``kairos doctor`` exits 1 when a check fails.

Also here: what the node still waits for (:func:`waiting_for`, the progress of ``kairos run``),
and the two small records the node keeps for the diagnosis (:class:`PeerSample`,
:class:`ClockOffsets`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import deque
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .node import Node

OK, WARN, FAIL = "ok", "warn", "fail"
#: How long the doctor waits for a dial to a bootstrap peer that is not connected.
PROBE_TIMEOUT = 5.0
#: A peer's clock further off than this (seconds) is worth a warning: OTP windows and leases
#: tolerate it, but it eats into ledger.max_clock_drift.
CLOCK_WARN_SECONDS = 5.0
# Bounds on what the node keeps for the diagnosis, whatever the network's size.
MAX_PEERS_KEPT = 4096
CLOCK_SAMPLES = 8


class PeerSample:
    """The peers one discovery reported (at most ``MAX_PEERS_KEPT`` remembered) and how often."""

    def __init__(self) -> None:
        self.peers: set[str] = set()
        self.reports = 0

    def add(self, peer_id: str) -> None:
        """Note one report of ``peer_id``."""
        self.reports += 1
        if len(self.peers) < MAX_PEERS_KEPT:
            self.peers.add(peer_id)


class ClockOffsets:
    """Each peer's clock against ours, estimated from the versions of its ``nodes`` entries.

    A version carries the writer's wall clock in ms; ``our clock at arrival - its stamp`` is the
    propagation delay minus the offset. The smallest of the last ``CLOCK_SAMPLES`` arrivals is
    the freshest entry (an old one synced late only makes the difference larger), so
    ``offset = -min(...)``: positive when the peer's clock is ahead, wrong by at most the delay of
    that freshest arrival (milliseconds on a LAN).
    """

    def __init__(self, now_ms=lambda: time.time_ns() // 1_000_000) -> None:
        self._now_ms = now_ms
        self._samples: dict[str, deque[int]] = {}

    def observe(self, peer_id: str, stamp_ms: int) -> None:
        """An entry of ``peer_id`` stamped ``stamp_ms`` arrived now."""
        samples = self._samples.get(peer_id)
        if samples is None:
            if len(self._samples) >= MAX_PEERS_KEPT:
                return
            samples = self._samples[peer_id] = deque(maxlen=CLOCK_SAMPLES)
        samples.append(self._now_ms() - int(stamp_ms))

    def offsets(self) -> dict[str, float]:
        """``peer → seconds its clock is ahead of ours`` (negative: behind)."""
        return {peer: -min(samples) / 1000 for peer, samples in self._samples.items() if samples}


def check(name: str, status: str, detail: str, hint: str | None = None) -> dict[str, Any]:
    """One line of the diagnosis."""
    result = {"check": name, "status": status, "detail": detail}
    if hint and status != OK:
        result["hint"] = hint
    return result


def waiting_for(status: dict[str, Any]) -> list[str]:
    """What a node (its ``status()``) still waits for, in words: peers, a leader, what plugins
    wait for (tunvpn's VPN address, k3s's role); empty once it has everything."""
    waiting = []
    if not status.get("members"):
        waiting.append("peers")
    if not status.get("leader"):
        waiting.append("a leader")
    for plugin, state in sorted((status.get("states") or {}).items()):
        waiting.append(f"{plugin}: {state}")
    return waiting


async def diagnose(node: Node) -> list[dict[str, Any]]:
    """Every check, in the order a person would look: token, clock, discovery, bootstrap peers,
    admission, peers, leader, reachability, plugins, VPN."""
    status = node.status()
    counters = status["counters"]
    results = [_token(node), _clock(node, counters), _discovery(node, status)]
    results += await _bootstrap(node)
    counters = node.status()["counters"]  # the probes may have counted refusals
    results += [
        _admission(node, counters),
        _peers(node, status),
        _leader(node, status),
        _reachability(node, status),
        _plugins(status),
    ]
    vpn = _vpn(status, counters)
    if vpn is not None:
        results.append(vpn)
    return results


def _token(node: Node) -> dict[str, Any]:
    token, now = node.token, time.time()
    interval = token.crypto.interval
    window = node.schedule.seal_window(now)
    rotates = interval - now % interval
    return check(
        "token",
        OK,
        f"fingerprint {token.fingerprint}, network {node.network_id}, crypto OTP window {window} "
        f"(every {interval} s, rotates in {rotates:.0f} s; windows w-1..w+1 accepted, so clocks may "
        f"differ by up to {interval} s)",
    )


def _clock(node: Node, counters: dict[str, Any]) -> dict[str, Any]:
    max_drift = node.config.section("ledger").max_clock_drift
    refused = counters.get("ledger_rejected_future", 0)
    offsets = node.clock_offsets.offsets()
    hint = "run NTP (chrony, systemd-timesyncd) on every machine"
    if refused:
        return check(
            "clock",
            FAIL,
            f"{refused} ledger entries refused as stamped more than {max_drift:.0f} s in the "
            "future: a peer's clock is ahead of ours",
            hint,
        )
    if not offsets:
        return check("clock", OK, "no peer entry received yet to compare clocks with")
    peer, offset = max(offsets.items(), key=lambda item: abs(item[1]))
    detail = (
        f"{len(offsets)} peer clocks compared; the furthest, {peer}, is {abs(offset):.1f} s "
        f"{'ahead of' if offset >= 0 else 'behind'} ours (estimate)"
    )
    if abs(offset) > max_drift / 2:
        return check(
            "clock", FAIL, detail + f": beyond half of ledger.max_clock_drift ({max_drift:.0f} s), writes get refused", hint
        )
    if abs(offset) > CLOCK_WARN_SECONDS:
        return check("clock", WARN, detail, hint)
    return check("clock", OK, detail)


def _discovery(node: Node, status: dict[str, Any]) -> dict[str, Any]:
    p2p = node.config["p2p"]
    running = {type(d).__name__ for d in node._discovery}
    parts = []
    for source, label, disabled, cls in (
        ("mdns", "mDNS", p2p["disable_mdns"], "MDNSDiscovery"),
        ("dht", "DHT", p2p["disable_dht"], "DHTRendezvous"),
    ):
        if disabled:
            parts.append(f"{label} off")
        elif cls not in running:
            parts.append(f"{label} on but it could not start (see the log)")
        else:
            found = len(node.discovered[source].peers)
            parts.append(f"{label} on, found {found} {'peer' if found == 1 else 'peers'}")
    bootstrap = len(p2p["bootstrap_peers"])
    parts.append(f"{bootstrap} bootstrap {'peer' if bootstrap == 1 else 'peers'}")
    detail = "; ".join(parts)
    nothing = p2p["disable_mdns"] and p2p["disable_dht"] and not bootstrap
    if nothing and not status["admitted"]:
        return check(
            "discovery", FAIL, detail + ": nothing can find peers", "enable mDNS (LAN) or the DHT, or list p2p.bootstrap_peers"
        )
    if any("could not start" in part for part in parts):
        return check("discovery", WARN, detail, "mDNS needs multicast on an interface; the log says what failed")
    if nothing:
        detail += " (peers were dialled directly)"
    return check("discovery", OK, detail)


async def _bootstrap(node: Node) -> list[dict[str, Any]]:
    addresses = [a for a in node.config["p2p"]["bootstrap_peers"] if isinstance(a, str)]
    if not addresses:
        return [check("bootstrap", OK, "no bootstrap peer configured")]
    admitted = node.neighbours()

    async def probe(address: str) -> dict[str, Any]:
        peer_id = address.rsplit("/p2p/", 1)[-1] if "/p2p/" in address else None
        if peer_id in admitted:
            return check("bootstrap", OK, f"{address}: connected and admitted")
        if peer_id is None:
            return check("bootstrap", FAIL, f"{address}: no /p2p/<peer id> at its end", "append the peer's id")
        try:
            await asyncio.wait_for(node.connect(address), PROBE_TIMEOUT)
        except Exception as exc:  # what the dial or the admission said is the diagnosis
            reason = str(exc) or type(exc).__name__
            refused = node.host.refusal_reason(peer_id) if node.host is not None else None
            if refused and refused not in reason:  # the dial saw the hang-up; the verdict says why
                reason += f" (admission refused: {refused})"
            hint = (
                "it holds another network token: compare `kairos token show` on both machines"
                if "network token" in reason or "refused our proof" in reason
                else "is it running, and is its port open from here?"
            )
            return check("bootstrap", FAIL, f"{address}: not reachable: {reason}", hint)
        return check("bootstrap", OK, f"{address}: reachable, admitted now")

    return list(await asyncio.gather(*(probe(address) for address in addresses)))


def _admission(node: Node, counters: dict[str, Any]) -> dict[str, Any]:
    admitted = counters.get("p2p_admission_ok", 0)
    refused = {
        name.removeprefix("p2p_admission_refused_"): value
        for name, value in counters.items()
        if name.startswith("p2p_admission_refused_") and value
    }
    if not refused:
        return check("admission", OK, f"{admitted} admissions, none refused")
    words = {
        "token": "the peer holds another network token",
        "timeout": "the handshake timed out",
        "revoked": "the peer is revoked",
        "protocol": "the peer does not speak the admission protocol",
        "hangup": "the peer hung up during the handshake (it may hold another network token)",
    }
    detail = f"{admitted} admissions; refused: " + ", ".join(
        f"{value} × {words.get(kind, kind)}" for kind, value in sorted(refused.items())
    )
    if "token" in refused:
        return check(
            "admission",
            FAIL,
            detail,
            f"every node needs the same p2p.network_token: this node's fingerprint is "
            f"{node.token.fingerprint} (`kairos token show` prints a token's)",
        )
    return check("admission", WARN, detail, "a slow link or an incompatible version; the log names the peers")


def _peers(node: Node, status: dict[str, Any]) -> dict[str, Any]:
    members, admitted = status["members"], status["admitted"]
    if members:
        return check("peers", OK, f"{members} alive besides this node, {admitted} connected")
    found = sum(len(sample.peers) for sample in node.discovered.values())
    detail = f"no peer alive; {admitted} connected, discovery reported {found} {'peer' if found == 1 else 'peers'}"
    return check(
        "peers",
        WARN,
        detail,
        "start another node with the same token on this LAN, or list one in "
        "p2p.bootstrap_peers; the checks above say what was tried",
    )


def _leader(node: Node, status: dict[str, Any]) -> dict[str, Any]:
    leader = status["leader"]
    if leader:
        who = "this node" if status["is_leader"] else leader["peer_id"]
        return check("leader", OK, f"{who}, epoch {leader['epoch']}")
    election = node.config["election"]
    if not node.leader_eligible():
        reason = "this node is not eligible (election.eligible or a plugin)"
        if not status["members"]:
            reason += " and sees no eligible peer"
    elif election["require_majority"] and status["members"] == 0 and status["admitted"] == 0:
        reason = "no election has finished yet"
    else:
        reason = "no candidate has a majority of the members yet"
    return check(
        "leader",
        WARN,
        f"no leader: {reason}",
        "wait a lease period (election.lease_seconds); `kairos peers --all` shows whom this node counts",
    )


def _address_scope(address: str) -> str:
    parts = address.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        try:
            ip = ipaddress.ip_address(parts[2])
        except ValueError:
            return "other"
        if ip.is_loopback:
            return "loopback"
        return "private" if ip.is_private or ip.is_link_local else "public"
    return "other"


def _reachability(node: Node, status: dict[str, Any]) -> dict[str, Any]:
    addresses = status["addresses"]
    if not addresses:
        return check("reachability", FAIL, "the node listens on no address", "check p2p.listen and p2p.port")
    scopes: dict[str, int] = {}
    for address in addresses:
        scope = _address_scope(address)
        scopes[scope] = scopes.get(scope, 0) + 1
    detail = f"{len(addresses)} addresses: " + ", ".join(f"{n} {scope}" for scope, n in sorted(scopes.items()))
    nat = status.get("reachability")  # what dial-backs by admitted peers found (p2p host), if anything
    if isinstance(nat, dict) and nat.get("reachability") in ("public", "private"):
        state, relays = nat["reachability"], nat.get("relays") or []
        detail += f"; peers' dial-backs say {state}"
        if nat.get("observed"):
            detail += f", seen from outside as {', '.join(map(str, nat['observed'][:3]))}"
        if state == "private":
            detail += f"; {len(relays)} {'relay' if len(relays) == 1 else 'relays'} holding a reservation for it"
            if not relays and not status["members"]:
                return check(
                    "reachability", WARN, detail, "behind NAT without a relay: bootstrap from a public node (p2p.bootstrap_peers)"
                )
    elif "public" not in scopes:
        detail += "; no public address: peers outside these networks reach it only if it dials them"
    return check("reachability", OK, detail)


def _plugins(status: dict[str, Any]) -> dict[str, Any]:
    states = status.get("states") or {}
    if not states:
        return check("plugins", OK, "no plugin waits for anything")
    return check(
        "plugins",
        WARN,
        "; ".join(f"{plugin} {state}" for plugin, state in sorted(states.items())),
        "`kairos status` shows the same; the plugin's log lines say more",
    )


def _vpn(status: dict[str, Any], counters: dict[str, Any]) -> dict[str, Any] | None:
    paths = {name.removeprefix("vpn_peers_"): value for name, value in counters.items() if name.startswith("vpn_peers_")}
    if not paths:
        return None  # no VPN plugin runs here
    total = sum(paths.values())
    detail = f"{total} VPN peers: " + ", ".join(f"{n} over {path}" for path, n in sorted(paths.items()))
    if status["members"] and not total:
        return check("vpn", WARN, detail, "the VPN has no path to any member yet: see the plugins check")
    return check("vpn", OK, detail)


def format_check(result: dict[str, Any]) -> list[str]:
    """The line of one check in ``kairos doctor``'s plain output, and its hint's line."""
    lines = [f"{result['status']:<5} {result['check']:<13}{result['detail']}"]
    if result.get("hint"):
        lines.append(f"{'':<19}-> {result['hint']}")
    return lines


class Progress:
    """What ``kairos run`` shows in a terminal: a line each time what the node waits for changes,
    until it waits for nothing (then one line saying so, and silence).

    Lines, not a redrawn status line: log lines go to the same terminal and would tear one.
    Peers' strings in plugin states are escaped.
    """

    def __init__(self, write) -> None:
        self._write = write
        self._last: list[str] | None = None
        self.done = False

    def __call__(self, node: Node) -> None:
        """Look at the node now; write a line if what it waits for changed."""
        if self.done:
            return
        from .untrusted import escape_control

        status = node.status()
        waiting = waiting_for(status)
        if waiting == self._last:
            return
        self._last = waiting
        if waiting:
            self._write(escape_control("kairos: waiting for " + "; ".join(waiting)) + "\n")
            return
        leader = status["leader"]
        members = status["members"]
        self._write(
            escape_control(
                f"kairos: ready: {members} {'peer' if members == 1 else 'peers'}, leader "
                f"{'this node' if status['is_leader'] else leader['peer_id']} (epoch {leader['epoch']})"
            )
            + "\n"
        )
        self.done = True
