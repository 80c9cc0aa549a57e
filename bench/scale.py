#!/usr/bin/env python3
"""Scale benchmark: N real `kairos run` processes in namespaces on one bridge, for several N.

For each N (``--sizes``, default 10 25 50 100) it starts the nodes in batches (``--batch`` at a
time, 10 by default): a batch starts once the previous batch's APIs answer *and* every node started
so far counts all the others (bounded by ``--batch-timeout``), so one batch's start-up (a Python
process importing libp2p costs ~2 s of CPU) never overlaps the next one's formation; formation is
then measured for the last batch, from its last API. After formation it waits until the network
settled: every node shows the same ledger fingerprint (``kairos status``: they hold the same
entries) in two polls ``SETTLED_FOR`` seconds apart (``settled_s``, from formation; at most
``--settle-timeout`` s, ``settled_s: null`` when not), then ``--settle`` more seconds (default 5)
before the quiet window, so that window measures an idle network, not formation's tail. The
window is also placed clear of the token's rotation (it waits up to ~55 s for that): at each
rotation every node re-registers its mDNS name, a burst every node of the LAN receives, measured
apart (``--rotation-in-window`` puts one 10 s into the window; ``quiet_window_rotations`` says
how many fell in it).
``--keep-logs DIR`` copies every node's log to ``DIR/n<N>/`` before the state directories go.
Then it prints one JSON line with:

- ``formation_s``: from the last API up to every node counting N-1 members;
- ``idle_cpu_share_per_node``: median over nodes of CPU time / wall time in a quiet window
  (``--quiet`` seconds, default 30), from /proc;
- ``idle_rss_mb_per_node``: median RSS;
- ``idle_bytes_per_s_per_node``: median of (rx + tx bytes of the node's interface) / window;
  ``idle_packets_per_s_per_node`` the same for packets (at ~66 bytes of headers each);
- ``connections_per_node``: median and max admitted connections;
- ``idle_nodes_rewrites``: the ``nodes`` entries one node saw rewritten in the quiet window,
  per second, and which fields the rewrites changed (``neighbours``, ``rtt_ms``, ``observed`` …;
  ``(refresh only)`` for a rewrite that changed nothing but the heartbeat): why an idle network
  was not idle;
- ``idle_per_s_per_node``: for every counter of ``kairos status --json`` that moved in the quiet
  window, the median node's increase per second: bytes, writes and streams per libp2p protocol
  (``p2p_out_bytes:/meshsub/1.1.0`` …), gossip messages and control ids sent, syncs, dials and
  trims (see kairos_core/p2p/traffic.py);
- ``idle_churn_per_s_all_nodes``: dials, admissions, trims, trim notices and holds, duplicate
  closes, repair dials, connections lost (``p2p_peers_lost``: ended by the peer or the network) or
  closed here, streams refused because they would have dialled (``p2p_implicit_dials_refused``),
  dials of a leader that looked gone (``leader_probe_dials``), and sync failures by exception
  type, summed over all nodes: what moved connections when the median node moved none;
- ``propagation_ms_p50`` / ``_p99``: a write on one node until every other node's watch stream
  delivers it (``--writes`` writes);
- ``left_after_kill_9_s``: kill -9 of a non-leader until the last survivor's ``peer left``
  event, read from the survivors' own logs; ``--kills K`` non-leaders are killed one after the
  other (``KILL_SPACING`` apart), and the figure is the slowest kill's last survivor;
  ``left_nodes_s`` gives p50/p90/p99 over every (kill, survivor) pair and ``left_kills`` each
  kill, with ``voucher_rewrites_s``: when the rewritten entries of the victim's neighbours (no
  longer naming it) reached one survivor — how a verdict's time splits into the neighbours'
  noticing and the spread of their news;
- ``failover_s``: kill -9 of the leader until every survivor holds the new leader's confirmed
  lease: each survivor's watch stream of the ``leader`` bucket, opened before the kill, times
  the arrival there (as for propagation); ``failover_nodes_s`` gives its p50/p90 over survivors;
  ``leader_left_s`` when they counted the old leader gone, and ``failover_announced_s`` when
  their ``on_leader_elected`` fired, both from their logs. Nothing polls the nodes while a kill
  is measured (earlier versions polled every survivor's status and peer list meanwhile).

Needs root. All N processes share this machine's cores: the JSON says how many there are.
Usage: bench/scale.py [--sizes 10 25 50 100] [--quiet 30] [--writes 10] [--batch 10] [--settle 5]
       [--settle-timeout 300] [--kills 1]
Progress goes to stderr: each batch's formation time, the quiet window's start, each kill.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

from kairos_testing.labnodes import LabNetwork, process_cpu_seconds as cpu_seconds
from kairos_testing.labpartition import leader_of
from kairos_testing.netlab import Lab, require_netns, unique_prefix


# Seconds between the two kills: the first one's rewrites have spread everywhere by then.
KILL_SPACING = 5.0
# Settled: the same fingerprint on every node at two polls this many seconds apart.
SETTLED_FOR = 5.0


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else None


def spread(values) -> dict[str, float]:
    """p50 and p90 of ``values`` (seconds), rounded."""
    return {"p50": round(percentile(values, 0.5), 2), "p90": round(percentile(values, 0.9), 2)}


def wait(condition, timeout, interval=0.2):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(interval)
    return time.monotonic()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def interface_bytes(lab: Lab, index: int, unit: str = "bytes") -> int:
    """rx + tx of the node's interface: ``bytes``, or ``packets`` (what tells framing from payload)."""
    out = lab.run(index, ["cat", f"/sys/class/net/eth0/statistics/rx_{unit}", f"/sys/class/net/eth0/statistics/tx_{unit}"])
    return sum(int(x) for x in out.stdout.split())


def start_capture(lab: Lab, path: str) -> subprocess.Popen | None:
    """tcpdump of node 1's interface (headers only) for telling keepalives, ACKs and data apart."""
    if shutil.which("tcpdump") is None:
        print("no tcpdump: --capture ignored", file=sys.stderr)
        return None
    return lab.popen(
        1, ["tcpdump", "-q", "-n", "-s", "160", "-i", "eth0", "-w", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def members(node) -> int:
    status = node.status()
    return status["members"] if status else -1


def fingerprint(node) -> str | None:
    return (node.status() or {}).get("ledger_fingerprint")


def wait_settled(nodes, timeout: float) -> float | None:
    """Until every node shows one ledger fingerprint, the same in two polls ``SETTLED_FOR`` s
    apart: the monotonic time of the first of them, or None after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    agreed: tuple[str, float] | None = None  # the fingerprint all showed, since when
    while time.monotonic() < deadline:
        polled = time.monotonic()
        seen = {fingerprint(node) for node in nodes}
        if len(seen) == 1 and None not in seen:
            value = seen.pop()
            if agreed is not None and agreed[0] == value and polled - agreed[1] >= SETTLED_FOR:
                return agreed[1]
            if agreed is None or agreed[0] != value:
                agreed = (value, polled)
        else:
            agreed = None
        time.sleep(1.0)  # one status per node per second or slower: light next to 50 nodes' idle
    return None


def counters(node) -> dict[str, int]:
    return {k: v for k, v in ((node.status() or {}).get("counters") or {}).items() if isinstance(v, (int, float))}


def counter_rates(before: dict[int, dict], after: dict[int, dict], elapsed: float) -> dict[str, float]:
    """Per counter, the median over nodes of its increase per second; counters that did not move are left out."""
    keys = {key for values in after.values() for key in values}
    rates = {}
    for key in sorted(keys):
        per_node = [(after[i].get(key, 0) - before.get(i, {}).get(key, 0)) / elapsed for i in after]
        median = statistics.median(per_node)
        if median:
            rates[key] = round(median, 2)
    return rates


# Counters whose sum over all nodes says why connections moved (the median node may move none)
CHURN_COUNTERS = (
    "dials_ok",
    "dials_failed",
    "p2p_admission_ok",
    "p2p_admission_failed",
    "connections_trimmed",
    "trim_notices_sent",
    "trim_notices_failed",
    "dials_held_off",
    "trims_spared_bridges",
    "repair_dials",
    "p2p_connections_duplicate_closed",
    "p2p_peers_lost",
    "p2p_implicit_dials_refused",
    "leader_probe_dials",
    "p2p_peers_closed_here",
    "sync_failures",
)
# and every counter with one of these prefixes (why sync sessions failed, by exception type)
CHURN_PREFIXES = ("sync_failures_",)


def counter_totals(before: dict[int, dict], after: dict[int, dict], elapsed: float, keys=CHURN_COUNTERS) -> dict[str, float]:
    """Per counter in ``keys``, its increase per second summed over all nodes (the whole network's rate)."""
    totals = {}
    keys = [*keys, *sorted({k for values in after.values() for k in values if k.startswith(CHURN_PREFIXES)})]
    for name in keys:
        # (the dialler's and the dial manager's counters show with or without the p2p_ prefix)
        key = next((k for k in (name, f"p2p_{name}") if any(k in values for values in after.values())), name)
        total = sum(after[i].get(key, 0) - before.get(i, {}).get(key, 0) for i in after) / elapsed
        if total:
            totals[key] = round(total, 2)
    return totals


class NodesRewrites:
    """Watches one node's ``nodes`` bucket during the quiet window: which entries were rewritten,
    and which fields each rewrite changed (``beat`` and ``announced_at`` change on every one).
    An idle network should rewrite nothing but the refreshes; what else moves says why it is not idle."""

    ALWAYS = {"beat", "announced_at"}

    def __init__(self, node) -> None:
        self.last: dict[str, dict] = {
            key: dict(value)
            for key, value in (node.client.request("GET", "/api/ledger/nodes") or {}).items()
            if isinstance(value, dict)
        }
        self.rewrites = 0
        self.writers: set[str] = set()
        self.fields: dict[str, int] = {}
        self._closed = False
        self._stream = node.client.stream("/api/watch", params={"bucket": "nodes"})
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for update in self._stream:
                if self._closed:
                    return
                key, value = update.get("key"), update.get("value")
                if not isinstance(key, str) or "/" in key:
                    continue
                before, after = self.last.get(key, {}), value if isinstance(value, dict) else {}
                self.last[key] = after
                self.rewrites += 1
                self.writers.add(key)
                changed = {f for f in set(before) | set(after) if before.get(f) != after.get(f)} - self.ALWAYS
                for name in changed or {"(refresh only)"}:
                    self.fields[name] = self.fields.get(name, 0) + 1
        except Exception:
            return

    def close(self, elapsed: float) -> dict:
        # The watch thread may be inside the stream's generator right now: closing it from here
        # raises "generator already executing". The counts are read now; the daemon thread's
        # stream ends with the node.
        self._closed = True
        return {
            "per_s": round(self.rewrites / elapsed, 3),
            "count": self.rewrites,
            "entries": len(self.writers),
            "changed_fields": dict(sorted(self.fields.items(), key=lambda item: -item[1])),
        }


class LeaseWatch:
    """Times when each of ``nodes`` first holds a confirmed lease of an epoch above ``epoch``,
    from its watch stream of the ``leader`` bucket (opened here, before the kill)."""

    def __init__(self, nodes, epoch: int) -> None:
        self.epoch = epoch
        self.arrived: dict[int, tuple[float, str]] = {}
        ready = threading.Barrier(len(nodes) + 1, timeout=30)
        self._threads = [threading.Thread(target=self._watch, args=(node, ready), daemon=True) for node in nodes]
        for thread in self._threads:
            thread.start()
        ready.wait()
        time.sleep(1.0)  # the watch requests reach the nodes

    def _watch(self, node, ready) -> None:
        stream = node.client.stream("/api/watch", params={"bucket": "leader"})
        try:
            ready.wait()
            for update in stream:
                value = update.get("value")
                if isinstance(value, dict) and value.get("state") == "held" and isinstance(value.get("epoch"), int):
                    if value["epoch"] > self.epoch:
                        self.arrived[node.index] = (time.monotonic(), str(value.get("peer")))
                        return
        except Exception:
            return
        finally:
            stream.close()

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))


class LogWatch:
    """Times, read from each node's own ``node.log``, of the first line written after this watch
    was made that ``match`` accepts (``kairos.events`` logs every ``on_peer`` and
    ``on_leader_elected`` event with a millisecond wall-clock stamp). Reading files costs the nodes
    nothing; polling every survivor's ``/api/peers`` four times a second during a kill made each of
    them build ~50 rows of JSON per poll on the same 2 cores as the kill's work (how much that
    delayed the figures was not measured)."""

    STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")

    def __init__(self, nodes) -> None:
        self.nodes = list(nodes)
        self.offsets = {node.index: self._size(node) for node in self.nodes}

    @staticmethod
    def _size(node) -> int:
        try:
            return (node.root / "node.log").stat().st_size
        except OSError:
            return 0

    def times(self, match, since_wall: float, timeout: float = 30.0) -> list[float]:
        """Seconds from ``since_wall`` (``time.time()``) to each node's first matching line,
        sorted; nodes with none within ``timeout`` are left out."""
        found: dict[int, float] = {}
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if node.index in found:
                    continue
                try:
                    with open(node.root / "node.log", "rb") as log:
                        log.seek(self.offsets[node.index])
                        text = log.read().decode(errors="replace")
                except OSError:
                    continue
                for line in text.splitlines():
                    stamp = self.STAMP.match(line)
                    if stamp and match(line):
                        found[node.index] = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() - since_wall
                        break
            if len(found) == len(self.nodes) or time.monotonic() >= deadline:
                return sorted(found.values())
            time.sleep(0.5)  # (a scan first: lines already written need no wait)


class VoucherWatch:
    """When each of a victim's neighbours' rewritten entries, no longer naming the victim, reached
    ``observer`` (its watch stream of ``nodes``, opened before the kill): how a ``left`` verdict's
    time splits into the neighbours' noticing and the spread of their news."""

    def __init__(self, observer, victim_id: str) -> None:
        entries = observer.client.request("GET", "/api/ledger/nodes") or {}
        self.victim_id = victim_id
        self.vouchers = {
            key
            for key, value in entries.items()
            if isinstance(value, dict) and key != victim_id and victim_id in (value.get("neighbours") or [])
        }
        self.dropped: dict[str, float] = {}
        self._closed = False
        self._stream = observer.client.stream("/api/watch", params={"bucket": "nodes"})
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        time.sleep(1.0)  # the watch request reaches the node

    def _run(self) -> None:
        # The stream is closed here, in its own thread (closing it from another one while the
        # generator runs raises), so that each kill's watch ends and does not load the observer
        # through the next kills and the fail-over.
        try:
            for update in self._stream:
                key, value = update.get("key"), update.get("value")
                if key in self.vouchers and key not in self.dropped and isinstance(value, dict):
                    if self.victim_id not in (value.get("neighbours") or []):
                        self.dropped[key] = time.monotonic()
                if self._closed or len(self.dropped) == len(self.vouchers):
                    return
        except Exception:
            return
        finally:
            self._stream.close()

    def close(self) -> None:
        """Stop watching (at the observer's next update, if a voucher never rewrote)."""
        self._closed = True


def kill_non_leader(victim, survivors) -> dict:
    """kill -9 ``victim``; seconds until each survivor's ``peer left`` (from their logs), and when
    the rewrites of the victim's vouchers reached one survivor."""
    # (LabNode.peer_id asks the node's API: read it while the node lives; a dead node's is
    # None, which no survivor counts alive — the figure of every run before this one)
    victim_id = victim.peer_id
    vouchers = VoucherWatch(survivors[0], victim_id)
    logs = LogWatch(survivors)
    killed_wall, killed = time.time(), time.monotonic()
    victim.process.send_signal(signal.SIGKILL)
    print(f"node {victim_id} killed at {killed_wall:.3f}", file=sys.stderr, flush=True)
    gone = logs.times(left_line(victim_id), killed_wall)
    vouchers.close()
    rewrites = sorted(at - killed for at in vouchers.dropped.values())
    return {
        "survivors": len(survivors),
        "last_s": round(gone[-1], 2) if len(gone) == len(survivors) else None,
        "p50_s": round(percentile(gone, 0.5), 2) if gone else None,
        "first_s": round(gone[0], 2) if gone else None,
        "left_seen": f"{len(gone)}/{len(survivors)}",
        # the victim's vouchers' rewrites, as one survivor received them
        "vouchers": len(vouchers.vouchers),
        "voucher_rewrites_s": [round(t, 2) for t in rewrites],
        "times": gone,
    }


def left_line(peer: str):
    return lambda line: f"kairos.events: peer left {peer}" in line


def new_leader_line(epoch: int):
    pattern = re.compile(r"kairos\.events: leader \S+(?: \(this node\))?, epoch (\d+)")

    def match(line: str) -> bool:
        found = pattern.search(line)
        return found is not None and int(found.group(1)) > epoch

    return match


def propagation(network, writer, others, key: str) -> list[float]:
    arrived: dict[int, float] = {}
    ready = threading.Barrier(len(others) + 1, timeout=30)

    def watch(node):
        stream = node.client.stream("/api/watch", params={"bucket": "scale"})
        try:
            ready.wait()
            for update in stream:
                if update.get("key") == key:
                    arrived[node.index] = time.monotonic()
                    return
        except Exception:
            return
        finally:
            stream.close()

    threads = [threading.Thread(target=watch, args=(n,), daemon=True) for n in others]
    for thread in threads:
        thread.start()
    ready.wait()
    time.sleep(1.0)  # the watch requests reach the nodes
    started = time.monotonic()
    writer.client.request("PUT", f"/api/ledger/scale/{key}", json={"at": started})
    for thread in threads:
        thread.join(timeout=15)
    return [(arrived[n.index] - started) * 1000 for n in others if n.index in arrived]


def rotations_between(start: float, end: float, interval: float) -> int:
    """How many token windows (multiples of ``interval`` in wall-clock seconds) begin in (start, end]."""
    return int(end // interval) - int(start // interval)


def wait_clear_of_rotation(interval: float, quiet: float, before: float = 5.0, after: float = 20.0) -> float:
    """Sleep until a quiet window of ``quiet`` seconds holds no token rotation: it ends ``before``
    seconds ahead of the next one and starts ``after`` seconds past the last (the mDNS
    re-registrations of every node, a burst that grows with N). Returns the seconds slept; none
    when no such place exists (``quiet`` too long for the interval)."""
    if quiet + before + after > interval:
        return 0.0
    into = time.time() % interval
    if after <= into <= interval - before - quiet:
        return 0.0
    wait = (interval - into + after) if into > after else (after - into)
    print(f"waiting {wait:.0f} s for a quiet window clear of the token's rotation", file=sys.stderr, flush=True)
    time.sleep(wait)
    return wait


def wait_for_rotation_inside(interval: float, quiet: float, lead: float = 10.0) -> float:
    """Sleep until the next token rotation falls ``lead`` seconds into a window of ``quiet``
    seconds starting now (to measure the rotation's burst). Returns the seconds slept."""
    into = time.time() % interval
    wait = (interval - lead - into) % interval if quiet > lead else 0.0
    print(f"waiting {wait:.0f} s for a quiet window around the token's rotation", file=sys.stderr, flush=True)
    time.sleep(wait)
    return wait


def run_size(n: int, args) -> dict:
    with Lab(unique_prefix("ks"), n) as lab, tempfile.TemporaryDirectory() as root:
        network = LabNetwork(lab, Path(root))
        print(f"N = {n}: state directories under {root}", file=sys.stderr, flush=True)
        joining: NodesRewrites | None = None  # node 1's view of the rewrites while the last batch joins
        joining_started = 0.0
        try:
            for first in range(1, n + 1, args.batch):
                if first > 1:  # the previous batches formed (bounded): start-up load does not pile up
                    started = list(network.nodes.values())
                    waited = time.monotonic()
                    try:
                        wait(lambda: all(members(node) >= len(started) - 1 for node in started), args.batch_timeout, interval=0.5)  # noqa: B023 (polled here)
                        outcome = "formed"
                    except TimeoutError:
                        counted = Counter(members(node) for node in started)
                        outcome = f"not formed, members counted {dict(sorted(counted.items()))}"
                    # (progress on stderr: where a long start-up spends its time)
                    print(f"{len(started)} nodes: {outcome} after {time.monotonic() - waited:.1f} s", file=sys.stderr, flush=True)
                if first + args.batch > n and first > 1:  # the last batch: what its joining makes the network rewrite
                    joining = NodesRewrites(network.nodes[1])
                    joining_started = time.monotonic()
                batch = [network.start(i, p2p={"disable_dht": True}) for i in range(first, min(n, first + args.batch - 1) + 1)]
                for node in batch:
                    network.wait_up(node, timeout=120)
            last_api = time.monotonic()
            nodes = list(network.nodes.values())
            try:
                formed: float | None = wait(lambda: all(members(node) == n - 1 for node in nodes), args.timeout, interval=0.5)
            except TimeoutError:
                formed = None
            result = {
                "bench": "scale",
                "nodes": n,
                "processes_sharing_cores": n,
                "cores": os.cpu_count(),
                "start": f"batches of {args.batch}, each once the previous formed",
                "formation_s": round(formed - last_api, 2) if formed is not None else None,
            }
            if joining is not None:  # (also when it never formed: the rewrites say why)
                result["formation_nodes_rewrites"] = joining.close(time.monotonic() - joining_started)
            if formed is None:
                result["error"] = f"no full membership within {args.timeout} s"
                result["members_counted"] = dict(sorted(Counter(members(node) for node in nodes).items()))
                return result
            settled = wait_settled(nodes, args.settle_timeout)
            result["settled_s"] = round(settled - formed, 2) if settled is not None else None
            result["fingerprints_at_quiet"] = len({fingerprint(node) for node in nodes})  # 1: all agree
            time.sleep(args.settle)
            rotation = min(network.token.dht.interval, network.token.crypto.interval)
            waited = (wait_for_rotation_inside if args.rotation_in_window else wait_clear_of_rotation)(rotation, args.quiet)
            result["quiet_waited_for_rotation_s"] = round(waited, 1)
            pids = {node.index: node.process.pid for node in nodes}
            cpu0 = {i: cpu_seconds(p) for i, p in pids.items()}
            net0 = {node.index: interface_bytes(lab, node.index) for node in nodes}
            packets0 = {node.index: interface_bytes(lab, node.index, "packets") for node in nodes}
            counters0 = {node.index: counters(node) for node in nodes}
            rewrites = NodesRewrites(nodes[0])
            capture = start_capture(lab, args.capture) if args.capture else None
            t0 = time.monotonic()
            print(f"quiet window from {time.time():.3f}", file=sys.stderr, flush=True)  # (to line up with --keep-logs)
            time.sleep(args.quiet)
            elapsed = time.monotonic() - t0
            if capture is not None:
                capture.send_signal(signal.SIGINT)
                capture.wait(timeout=10)
            # token windows that began inside the window: every node renamed its mDNS instance
            # then (a goodbye and two announcements each, multicast to every node of the LAN)
            result["quiet_window_rotations"] = rotations_between(time.time() - elapsed, time.time(), rotation)
            result["idle_nodes_rewrites"] = rewrites.close(elapsed)
            counters1 = {node.index: counters(node) for node in nodes}
            cpu = [(cpu_seconds(p) - cpu0[i]) / elapsed for i, p in pids.items()]
            traffic = [(interface_bytes(lab, node.index) - net0[node.index]) / elapsed for node in nodes]
            packets = [(interface_bytes(lab, node.index, "packets") - packets0[node.index]) / elapsed for node in nodes]
            statuses = [node.status() or {} for node in nodes]
            connections = [status.get("admitted", 0) for status in statuses]
            meshes = [status.get("gossip_mesh", 0) for status in statuses]
            result.update(
                {
                    "idle_cpu_share_per_node": round(statistics.median(cpu), 4),
                    "idle_rss_mb_per_node": round(statistics.median(rss_mb(p) for p in pids.values()), 1),
                    "idle_bytes_per_s_per_node": round(statistics.median(traffic)),
                    # a median hides a few busy nodes (a late sync, an election still spreading)
                    "idle_bytes_per_s_nodes": spread(traffic) | {"max": round(max(traffic))},
                    "idle_packets_per_s_per_node": round(statistics.median(packets), 1),
                    "connections_per_node": {"median": statistics.median(connections), "max": max(connections)},
                    # gossip mesh peers: the copies of every ledger message a node sends and receives
                    "gossip_mesh_per_node": {"median": statistics.median(meshes), "max": max(meshes)},
                    # what the traffic is: the median node's rate of each counter (see kairos_core/p2p/traffic.py)
                    "idle_per_s_per_node": counter_rates(counters0, counters1, elapsed),
                    # what moved connections, over the whole network (per second, all nodes)
                    "idle_churn_per_s_all_nodes": counter_totals(counters0, counters1, elapsed),
                }
            )
            if args.keep_logs:  # every node's counters over the quiet window, for a look at the outliers
                kept = Path(args.keep_logs) / f"n{n}"
                kept.mkdir(parents=True, exist_ok=True)
                per_node = {
                    node.index: {
                        "bytes_per_s": round(rate),
                        **counter_rates({0: counters0[node.index]}, {0: counters1[node.index]}, elapsed),
                    }
                    for node, rate in zip(nodes, traffic)
                }
                (kept / "quiet_counters.json").write_text(json.dumps(per_node, indent=1, sort_keys=True))
            delays = []
            for w in range(args.writes):
                writer = nodes[w % len(nodes)]
                delays += propagation(network, writer, [x for x in nodes if x is not writer], f"k{w}")
            result["propagation_ms_p50"] = round(percentile(delays, 0.5), 1) if delays else None
            result["propagation_ms_p99"] = round(percentile(delays, 0.99), 1) if delays else None
            result["propagation_delivered"] = f"{len(delays)}/{args.writes * (n - 1)}"

            leader, _ = leader_of(nodes[0]) or (None, 0)
            survivors = list(nodes)
            kills = []
            for _ in range(args.kills):
                victim = next((node for node in survivors if node.peer_id != leader), None)
                if victim is None or len(survivors) < 3:
                    break
                survivors = [node for node in survivors if node is not victim]
                kills.append(kill_non_leader(victim, survivors))
                time.sleep(KILL_SPACING)  # the next kill meets a network done with this one
            every = sorted(t for kill in kills for t in kill.pop("times"))
            lasts = [kill["last_s"] for kill in kills]
            result["left_after_kill_9_s"] = max(lasts) if lasts and None not in lasts else None
            result["left_nodes_s"] = spread(every) | {"p99": round(percentile(every, 0.99), 2)} if every else None
            result["left_kills"] = kills
            view = leader_of(survivors[0])
            if view:
                old, epoch = view
                target = next(node for node in survivors if node.peer_id == old)
                rest = [node for node in survivors if node is not target]
                leases = LeaseWatch(rest, epoch)
                logs = LogWatch(rest)
                killed_wall, killed = time.time(), time.monotonic()
                target.process.send_signal(signal.SIGKILL)
                print(f"leader {old} killed at {killed_wall:.3f}", file=sys.stderr, flush=True)
                leases.wait(30.0)  # (a node's watch ends at its first new lease)
                gone = logs.times(left_line(old), killed_wall)  # where fail-over's time goes: first the verdict
                result["leader_left_s"] = (
                    {"p50": round(percentile(gone, 0.5), 2), "max": round(gone[-1], 2), "nodes": len(gone)} if gone else None
                )
                announced = logs.times(new_leader_line(epoch), killed_wall, timeout=5.0)
                result["failover_announced_s"] = spread(announced) | {"nodes": len(announced)} if announced else None
                # the new leader's own write shows in its watch as well; one holder for all or none
                held = {index: (at - killed, peer) for index, (at, peer) in leases.arrived.items()}
                holders = {peer for _, peer in held.values()}
                if len(held) == len(rest) and len(holders) == 1:
                    delays = sorted(at for at, _ in held.values())
                    result["failover_s"] = round(delays[-1], 2)
                    result["failover_nodes_s"] = spread(delays)
                else:
                    result["failover_s"] = None
                    result["failover_watch"] = f"{len(held)}/{len(rest)} saw a new lease, holders {sorted(holders)}"
            return result
        finally:
            network.close()
            if args.keep_logs:  # (the state directories go with the temporary root)
                kept = Path(args.keep_logs) / f"n{n}"
                kept.mkdir(parents=True, exist_ok=True)
                for node in network.nodes.values():
                    log_file = node.root / "node.log"
                    if log_file.exists():
                        shutil.copy(log_file, kept / f"node{node.index}.log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--quiet", type=float, default=30.0)
    parser.add_argument("--writes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--batch-timeout", type=float, default=60.0, help="longest wait for a batch to form")
    parser.add_argument("--settle", type=float, default=5.0, help="pause between the settled network and the quiet window")
    parser.add_argument("--settle-timeout", type=float, default=300.0, help="longest wait for every node to hold the same ledger")
    parser.add_argument("--timeout", type=float, default=300.0, help="longest wait for formation")
    parser.add_argument("--kills", type=int, default=1, help="non-leaders killed one after the other before the leader")
    parser.add_argument(
        "--rotation-in-window",
        action="store_true",
        help="place the quiet window around a token rotation (every node re-registers its mDNS name), 10 s in",
    )
    parser.add_argument("--capture", metavar="PCAP", help="tcpdump node 1's interface to PCAP during the quiet window")
    parser.add_argument("--keep-logs", metavar="DIR", help="copy every node's node.log to DIR/n<N>/ at the end")
    args = parser.parse_args()
    # stopped with SIGTERM (timeout, kill), unwind so the labs delete their namespaces and nodes
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    reason = require_netns()
    if reason:
        print(json.dumps({"error": reason}))
        sys.exit(1)
    for n in args.sizes:
        try:
            print(json.dumps(run_size(n, args)), flush=True)
        except TimeoutError:
            print(json.dumps({"bench": "scale", "nodes": n, "error": f"no full membership within {args.timeout} s"}), flush=True)


if __name__ == "__main__":
    main()
