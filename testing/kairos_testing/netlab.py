"""A throwaway network lab in Linux network namespaces, for tests and benchmarks.

A :class:`Lab` builds ``N`` node namespaces named ``<prefix>-<i>`` (``i`` = 1..N) and one bridge
namespace ``<prefix>-br``. Each node has one interface ``eth0`` with address ``10.<x>.0.<i>/24``,
joined to the bridge by a veth pair. Everything (bridge, veths, nft table) lives *inside* the
lab's namespaces, so the host's own network is never touched and deleting the namespaces removes
every trace. Multicast works across the bridge (snooping off, multicast routes in every node):
mDNS needs it.

``partition(a, b)`` drops all frames between two groups of nodes with an nft ``bridge`` table in
the bridge namespace; ``drop_inbound(to, from_)`` cuts like a host firewall does instead: an nft
``inet`` table in each receiving node drops what the other group sends it (``oneway=True`` for one
direction only). ``heal()`` deletes every such table.

:class:`NatLab` builds the other shape: a public "internet" bridge with nodes on it directly or
each behind its own router namespace that masquerades (port-preserving, or symmetric with
``masquerade random``) and drops unsolicited inbound, for NAT traversal tests (issue #15).
:class:`SplitLab` gives each node its own link to a middle namespace that does not forward, so
nodes meet only through a process run there (a delaying TCP relay: the RTT test, issue #17).

One setting outside the namespaces: the kernel keeps one neighbour (ARP) table for every
namespace, limited by the first namespace's ``net.ipv4.neigh.default.gc_thresh3`` (1,024 entries
by default). A lab whose nodes talk to many others needs more — 100 nodes of 12 connections and
their dials overflowed it ("neighbor table overflow!" in the kernel log), and the last nodes to
start could resolve nobody: every dial failed and they formed a network of one each. A lab raises
the limits (:func:`fit_neighbour_table`) to hold an entry for every pair of its nodes; they are
never lowered again (a larger cache costs nothing until used, and lowering it under another lab
that still runs would break that one).

Cleanup always runs on leaving the context, also on exceptions: processes the lab started are
killed, then any process still inside a lab namespace, then the namespaces themselves.
:func:`cleanup_stale` removes what a crashed earlier run left behind (names embed the pid of the
run that made them, so a live run is never disturbed).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PREFIX_BASE = "kt"
BRIDGE = "br0"
NODE_IFACE = "eth0"
NFT_TABLE = "kairos_lab"
# Linux caps namespace names loosely, but keep names short and shell-safe.
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.]{1,24}$")
_counter = itertools.count(1)

NodeRef = int | str


def unique_prefix(base: str = DEFAULT_PREFIX_BASE) -> str:
    """A lab prefix unique to this process and call: ``<base><pid>x<n>``.

    The pid in the name is what lets :func:`cleanup_stale` tell leftovers of a dead run from the
    namespaces of a run that is still going.
    """
    return f"{base}{os.getpid()}x{next(_counter)}"


def require_netns() -> str | None:
    """``None`` when labs can be built here, else the reason they cannot (for ``pytest.skip``)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"the '{tool}' command is missing (apt-get install {'iproute2' if tool == 'ip' else 'nftables'})"
    # Root in a container may still lack CAP_SYS_ADMIN: try for real.
    probe = f"{DEFAULT_PREFIX_BASE}probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip() or made.returncode}"
    try:
        bridge = subprocess.run(
            ["ip", "-n", probe, "link", "add", "name", "probebr", "type", "bridge"], capture_output=True, text=True
        )
        if bridge.returncode != 0:
            return f"cannot create a bridge: {bridge.stderr.strip()}"
        nft = subprocess.run(
            ["ip", "netns", "exec", probe, "nft", "add", "table", "bridge", NFT_TABLE],
            capture_output=True,
            text=True,
        )
        if nft.returncode != 0:
            return f"nft does not work in a namespace: {nft.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def list_namespaces() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def cleanup_stale(prefix_base: str = DEFAULT_PREFIX_BASE, *, force: bool = False) -> list[str]:
    """Delete namespaces left by dead runs whose prefix starts with ``prefix_base``.

    A namespace named ``<prefix_base><pid>x<n>-…`` belongs to process ``pid``; it is removed only
    when that process is gone, unless ``force``. Processes still inside are killed first.
    Returns the names removed.
    """
    pattern = re.compile(rf"^{re.escape(prefix_base)}(\d+)x\d+-")
    removed = []
    for name in list_namespaces():
        match = pattern.match(name)
        if match is None:
            continue
        if not force and _pid_alive(int(match.group(1))):
            continue
        _kill_namespace_processes(name)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        removed.append(name)
    if removed:
        log.info("removed %d stale lab namespaces: %s", len(removed), " ".join(removed))
    return removed


class LabError(RuntimeError):
    """A lab command failed (the message carries the command and its stderr)."""


class Closing:
    """Opened on entering ``with`` (:meth:`open`) and closed on leaving it, also when opening
    fails halfway, so that nothing half-built (namespaces, processes) is left behind. The labs of
    the kit share it; :meth:`close` must be safe to call on a part-built or closed lab."""

    def open(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


NEIGHBOUR_SYSCTL = Path("/proc/sys/net/ipv4/neigh/default")


def fit_neighbour_table(pairs: int) -> None:
    """Raise the kernel's neighbour-table limits (shared by every namespace) so that ``pairs``
    more entries fit beside the host's own; never lower them. Best effort: a kernel that refuses
    leaves the limits as they are (small labs fit anyway)."""
    try:
        hard = pairs + 1024  # the default limit, left to the host's own entries
        if int((NEIGHBOUR_SYSCTL / "gc_thresh3").read_text()) >= hard:
            return
        # gc_thresh2 is where the kernel starts collecting entries unused for 5 s; keep it below
        # the hard limit in the same proportion as the defaults (512 / 1,024)
        (NEIGHBOUR_SYSCTL / "gc_thresh3").write_text(str(hard))
        soft = int((NEIGHBOUR_SYSCTL / "gc_thresh2").read_text())
        (NEIGHBOUR_SYSCTL / "gc_thresh2").write_text(str(max(soft, hard // 2)))
    except (OSError, ValueError):
        pass


def delete_namespace(ns: str) -> None:
    """Kill every process inside namespace ``ns``, then delete it (a warning when it cannot be)."""
    _kill_namespace_processes(ns)
    result = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
    if result.returncode != 0:
        log.warning("could not delete namespace %s: %s", ns, result.stderr.strip())


class Lab:
    """``nodes`` network namespaces on one bridge; a context manager (``with`` or ``async with``).

    Nodes are referred to by index ``1..nodes`` (or by namespace name).
    """

    def __init__(self, prefix: str | None = None, nodes: int = 3, *, subnet_octet: int | None = None) -> None:
        prefix = unique_prefix() if prefix is None else prefix
        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"lab prefix must be 1-24 chars of [A-Za-z0-9_.], not {prefix!r}")
        if not 1 <= nodes <= 250:
            raise ValueError(f"a lab has 1..250 nodes, not {nodes}")
        self.prefix = prefix
        self.size = nodes
        # The subnet only has to be private: the lab's namespaces are isolated from the host.
        self.subnet_octet = subnet_octet if subnet_octet is not None else 100 + zlib.crc32(prefix.encode()) % 100
        self.bridge_namespace = f"{prefix}-br"
        self._created: list[str] = []
        self._processes: list[subprocess.Popen] = []
        self._async_processes: list[asyncio.subprocess.Process] = []
        self._partitioned = False
        self._firewalled: set[str] = set()  # node namespaces holding a drop_inbound table
        self._closed = False

    # --- naming ------------------------------------------------------------------------------
    @property
    def namespaces(self) -> list[str]:
        """The node namespaces, in index order."""
        return [self.namespace(i) for i in range(1, self.size + 1)]

    def namespace(self, node: NodeRef) -> str:
        """The namespace name of node ``node`` (an index 1..N, or already a name)."""
        if isinstance(node, str):
            if node not in self.namespaces:
                raise KeyError(f"{node!r} is not a node of lab {self.prefix}")
            return node
        if not 1 <= node <= self.size:
            raise IndexError(f"node index {node} outside 1..{self.size}")
        return f"{self.prefix}-{node}"

    def index(self, node: NodeRef) -> int:
        """The index 1..N of a node given by index or name."""
        return int(self.namespace(node).rsplit("-", 1)[1])

    def address(self, node: NodeRef) -> str:
        """The IPv4 address of a node (without prefix length)."""
        return f"10.{self.subnet_octet}.0.{self.index(node)}"

    def interface(self, node: NodeRef) -> str:
        """The name of the node's interface towards the bridge (the same in every node)."""
        self.namespace(node)
        return NODE_IFACE

    # --- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "Lab":
        """Build the namespaces, bridge and links; on failure, undo what was built and raise."""
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        fit_neighbour_table(self.size * (self.size - 1))
        br = self.bridge_namespace
        self._add_namespace(br)
        self._ip(br, "link", "set", "lo", "up")
        # Snooping off: with it on, the bridge forwards multicast only to ports that sent IGMP
        # joins, and nothing on this bridge runs a querier; mDNS would then be lossy.
        self._ip(br, "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0", "stp_state", "0")
        self._ip(br, "link", "set", BRIDGE, "up")
        for i in range(1, self.size + 1):
            ns = self.namespace(i)
            port = f"p{i}"
            self._add_namespace(ns)
            self._ip(br, "link", "add", port, "type", "veth", "peer", "name", NODE_IFACE, "netns", ns)
            self._ip(br, "link", "set", port, "master", BRIDGE, "up")
            self._ip(ns, "link", "set", "lo", "up")
            self._ip(ns, "addr", "add", f"{self.address(i)}/24", "dev", NODE_IFACE)
            self._ip(ns, "link", "set", NODE_IFACE, "multicast", "on", "up")
            # No default route in a node: without this, sending to 224.0.0.251 has no route
            # unless the socket pins IP_MULTICAST_IF.
            self._ip(ns, "route", "add", "224.0.0.0/4", "dev", NODE_IFACE)

    def close(self) -> None:
        """Kill the lab's processes, remove the nft table and delete the namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for proc in self._processes:
            _stop_popen(proc)
        for aproc in self._async_processes:
            if aproc.returncode is None:
                try:
                    os.kill(aproc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._partitioned and self.bridge_namespace in self._created:
            self._nft_delete_table()
        self._delete_firewalls()
        # Nodes first, the bridge last: a veth pair goes with whichever end's namespace dies.
        for ns in reversed(self._created):
            if self.bridge_namespace == ns:
                subprocess.run(["ip", "-n", ns, "link", "del", BRIDGE], capture_output=True)
            delete_namespace(ns)
        self._created.clear()

    def __enter__(self) -> "Lab":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> "Lab":
        # Building runs ~10 ip commands per node: keep it off the event loop.
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        for aproc in self._async_processes:
            if aproc.returncode is None:
                try:
                    aproc.kill()
                except ProcessLookupError:
                    pass
                try:
                    await asyncio.wait_for(aproc.wait(), 5)
                except asyncio.TimeoutError:
                    log.warning("lab process %d did not die", aproc.pid)
        await asyncio.to_thread(self.close)

    # --- processes ---------------------------------------------------------------------------
    def command(self, node: NodeRef, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside a node's namespace."""
        return ["ip", "netns", "exec", self.namespace(node), *argv]

    def popen(self, node: NodeRef, argv: Sequence[str], **popen: Any) -> subprocess.Popen:
        """Start ``argv`` inside a node; the lab kills it on close if it still runs."""
        self._check_open()
        proc = subprocess.Popen(self.command(node, argv), **popen)
        self._processes.append(proc)
        return proc

    def run(
        self, node: NodeRef, argv: Sequence[str], *, timeout: float = 30.0, check: bool = False, **popen: Any
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` inside a node to completion (killed after ``timeout`` seconds)."""
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        proc = self.popen(node, argv, **popen)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done

    async def spawn(self, node: NodeRef, argv: Sequence[str], **kwargs: Any) -> asyncio.subprocess.Process:
        """Start ``argv`` inside a node as an asyncio subprocess; killed on close."""
        self._check_open()
        proc = await asyncio.create_subprocess_exec(*self.command(node, argv), **kwargs)
        self._async_processes.append(proc)
        return proc

    # --- faults ------------------------------------------------------------------------------
    def partition(self, group_a: Iterable[NodeRef], group_b: Iterable[NodeRef]) -> None:
        """Drop every frame between the nodes of ``group_a`` and those of ``group_b``.

        Calls accumulate (several cuts can coexist) until :meth:`heal`.
        """
        self._check_open()
        ports_a = sorted({f"p{self.index(n)}" for n in group_a})
        ports_b = sorted({f"p{self.index(n)}" for n in group_b})
        if not ports_a or not ports_b:
            raise ValueError("both groups of a partition need at least one node")
        if set(ports_a) & set(ports_b):
            raise ValueError("a node cannot be on both sides of a partition")
        set_a = "{ " + ", ".join(f'"{p}"' for p in ports_a) + " }"
        set_b = "{ " + ", ".join(f'"{p}"' for p in ports_b) + " }"
        # The bridge family's forward hook sees each flooded copy with its output port, so this
        # cuts multicast and broadcast (ARP) as well as unicast.
        script = (
            f"add table bridge {NFT_TABLE}\n"
            f"add chain bridge {NFT_TABLE} forward {{ type filter hook forward priority 0; policy accept; }}\n"
            f"add rule bridge {NFT_TABLE} forward iifname {set_a} oifname {set_b} drop\n"
            f"add rule bridge {NFT_TABLE} forward iifname {set_b} oifname {set_a} drop\n"
        )
        self._nft(script)
        self._partitioned = True

    def drop_inbound(self, receivers: Iterable[NodeRef], senders: Iterable[NodeRef], *, oneway: bool = False) -> None:
        """Each node of ``receivers`` drops, on its own input hook, every packet from ``senders``.

        Unlike :meth:`partition` the frames still cross the bridge and ARP keeps working: this is a
        host firewall, the way an operator cuts a link. Without ``oneway`` the senders drop what
        the receivers send them too. Calls accumulate until :meth:`heal`.
        """
        self._check_open()
        receivers, senders = [self.index(n) for n in receivers], [self.index(n) for n in senders]
        if not receivers or not senders:
            raise ValueError("both groups of a cut need at least one node")
        if set(receivers) & set(senders):
            raise ValueError("a node cannot be on both sides of a cut")
        pairs = [(receivers, senders)] if oneway else [(receivers, senders), (senders, receivers)]
        for into, out_of in pairs:
            sources = "{ " + ", ".join(self.address(n) for n in out_of) + " }"
            for node in into:
                ns = self.namespace(node)
                script = (
                    f"add table inet {NFT_TABLE}\n"
                    f"add chain inet {NFT_TABLE} input {{ type filter hook input priority 0; policy accept; }}\n"
                    f"add rule inet {NFT_TABLE} input ip saddr {sources} drop\n"
                )
                self._firewalled.add(ns)
                checked(["ip", "netns", "exec", ns, "nft", "-f", "-"], stdin=script)

    def heal(self) -> None:
        """Remove every partition and every inbound drop."""
        self._check_open()
        if self._partitioned:
            self._nft_delete_table()
            self._partitioned = False
        self._delete_firewalls()

    # --- internals ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise LabError(f"lab {self.prefix} is closed")

    def _add_namespace(self, ns: str) -> None:
        checked(["ip", "netns", "add", ns])
        self._created.append(ns)
        # No router on a lab's links, and the kernel would solicit one from every interface
        # for as long as the lab lives (at doubling intervals, forever): multicast every port
        # receives, a packet per second on each node's counters at 20 nodes, growing with N.
        checked(
            [
                "ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                "net.ipv6.conf.all.router_solicitations=0", "net.ipv6.conf.default.router_solicitations=0",
            ]
        )  # fmt: skip

    def _ip(self, ns: str, *args: str) -> None:
        checked(["ip", "-n", ns, *args])

    def _nft(self, script: str) -> None:
        checked(["ip", "netns", "exec", self.bridge_namespace, "nft", "-f", "-"], stdin=script)

    def _delete_firewalls(self) -> None:
        for ns in sorted(self._firewalled):
            subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", NFT_TABLE], capture_output=True)
        self._firewalled.clear()

    def _nft_delete_table(self) -> None:
        subprocess.run(
            ["ip", "netns", "exec", self.bridge_namespace, "nft", "delete", "table", "bridge", NFT_TABLE],
            capture_output=True,
        )


def checked(argv: list[str], stdin: str | None = None) -> None:
    """Run ``argv``; :class:`LabError` with the command and its stderr when it fails."""
    result = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed: {result.stderr.strip()}")


def _stop_popen(proc: subprocess.Popen, grace: float = 2.0) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def _kill_namespace_processes(ns: str) -> None:
    # A process started inside the namespace outlives `ip netns del` (the namespace lives on as
    # long as anything is in it): kill them all, including grandchildren we never saw.
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split() if p.isdigit()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 2.0
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _pid_alive(p)]
        if pids:
            time.sleep(0.02)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- split lab -------------------------------------------------------------------------------------
class SplitLab(Lab):
    """Nodes that cannot reach each other: each on its own veth to a middle namespace that does
    not forward (``ip_forward`` 0, no bridge), so the only way across is a process the test runs
    in the middle, e.g. :mod:`kairos_testing.delayproxy` (the RTT test of issue #17).

    Node ``i`` holds ``10.<x>.<i>.2/24`` on ``eth0`` and has no route beyond that subnet; the
    middle (``<prefix>-mid``) holds ``10.<x>.<i>.1`` on its port ``p<i>``:
    :meth:`middle_address`. Partitions and inbound drops are not offered: nothing crosses anyway.
    """

    def __init__(self, prefix: str | None = None, nodes: int = 2) -> None:
        super().__init__(prefix, nodes)
        self.bridge_namespace = self.middle = f"{self.prefix}-mid"

    def address(self, node: NodeRef) -> str:
        return f"10.{self.subnet_octet}.{self.index(node)}.2"

    def middle_address(self, node: NodeRef) -> str:
        """The middle's address on the link to node ``node``."""
        return f"10.{self.subnet_octet}.{self.index(node)}.1"

    def command_in_middle(self, argv: Sequence[str]) -> list[str]:
        """The argv that runs ``argv`` inside the middle namespace."""
        return ["ip", "netns", "exec", self.middle, *argv]

    def popen_in_middle(self, argv: Sequence[str], **popen: Any) -> subprocess.Popen:
        """Start ``argv`` inside the middle; the lab kills it on close if it still runs."""
        self._check_open()
        proc = subprocess.Popen(self.command_in_middle(argv), **popen)
        self._processes.append(proc)
        return proc

    def _build(self) -> None:
        middle = self.middle
        self._add_namespace(middle)
        self._ip(middle, "link", "set", "lo", "up")
        # A fresh namespace does not forward; say so anyway: the lab's point is that it never does.
        checked(["ip", "netns", "exec", middle, "sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
        for i in range(1, self.size + 1):
            ns, port = self.namespace(i), f"p{i}"
            self._add_namespace(ns)
            self._ip(middle, "link", "add", port, "type", "veth", "peer", "name", NODE_IFACE, "netns", ns)
            self._ip(middle, "addr", "add", f"{self.middle_address(i)}/24", "dev", port)
            self._ip(middle, "link", "set", port, "up")
            self._ip(ns, "link", "set", "lo", "up")
            self._ip(ns, "addr", "add", f"{self.address(i)}/24", "dev", NODE_IFACE)
            self._ip(ns, "link", "set", NODE_IFACE, "up")

    def partition(self, group_a: Iterable[NodeRef], group_b: Iterable[NodeRef]) -> None:
        raise LabError("a split lab has no partitions: its nodes cannot reach each other anyway")

    def drop_inbound(self, receivers: Iterable[NodeRef], senders: Iterable[NodeRef], *, oneway: bool = False) -> None:
        raise LabError("a split lab has no inbound drops: its nodes cannot reach each other anyway")


# --- NAT lab ---------------------------------------------------------------------------------------
PUBLIC = "public"
PORT_PRESERVING = "port-preserving"
SYMMETRIC = "symmetric"
NAT_KINDS = (PUBLIC, PORT_PRESERVING, SYMMETRIC)
#: the lab's "internet": TEST-NET-2, never routed anywhere, so observed addresses look public
INTERNET_PREFIX = "198.51.100"
NAT_TABLE = "kairos_nat"


class NatLab(Lab):
    """Nodes on a public "internet" bridge, directly or each behind its own NAT router.

    ``kinds[i-1]`` says what node ``i`` sits behind: :data:`PUBLIC` (an interface on the internet
    bridge, address ``198.51.100.<i>``), :data:`PORT_PRESERVING` or :data:`SYMMETRIC`. A NATed node
    is alone on a LAN ``192.168.<i>.0/24`` (it is ``.2``) behind a router namespace
    ``<prefix>-r<i>`` whose WAN address is ``198.51.100.<i>``. Every router masquerades what leaves
    its WAN (plain ``masquerade`` keeps the source port when it can; ``masquerade random`` gives
    each flow a random port: a symmetric NAT) and forwards inbound only for connections its
    conntrack knows, as home and office routers do: unsolicited inbound is dropped, also to the
    router itself.

    ``address(i)`` is the address node ``i`` holds (inside its LAN when NATed): what it listens on,
    so :class:`~kairos_testing.labnodes.LabNetwork` works unchanged; ``public_address(i)`` is where
    the internet sees it. Partitions and inbound drops are not offered here.
    """

    def __init__(self, kinds: Sequence[str], prefix: str | None = None) -> None:
        kinds = list(kinds)
        unknown = [kind for kind in kinds if kind not in NAT_KINDS]
        if unknown:
            raise ValueError(f"unknown NAT kind(s) {unknown}: choose from {', '.join(NAT_KINDS)}")
        super().__init__(prefix, nodes=len(kinds))
        self.kinds = kinds

    def kind(self, node: NodeRef) -> str:
        """What node ``node`` sits behind: public, port-preserving or symmetric."""
        return self.kinds[self.index(node) - 1]

    def address(self, node: NodeRef) -> str:
        index = self.index(node)
        return f"{INTERNET_PREFIX}.{index}" if self.kinds[index - 1] == PUBLIC else f"192.168.{index}.2"

    def public_address(self, node: NodeRef) -> str:
        """The address the internet sees node ``node`` at (its router's WAN address when NATed)."""
        return f"{INTERNET_PREFIX}.{self.index(node)}"

    def router(self, node: NodeRef) -> str:
        """The namespace of node ``node``'s router; ``KeyError`` for a public node."""
        if self.kind(node) == PUBLIC:
            raise KeyError(f"node {node} is public: it has no router")
        return f"{self.prefix}-r{self.index(node)}"

    def _build(self) -> None:
        internet = self.bridge_namespace
        self._add_namespace(internet)
        self._ip(internet, "link", "set", "lo", "up")
        self._ip(internet, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0")
        self._ip(internet, "link", "set", BRIDGE, "up")
        for i in range(1, self.size + 1):
            ns, port = self.namespace(i), f"p{i}"
            if self.kinds[i - 1] == PUBLIC:
                self._add_namespace(ns)
                self._ip(internet, "link", "add", port, "type", "veth", "peer", "name", NODE_IFACE, "netns", ns)
                self._ip(internet, "link", "set", port, "master", BRIDGE, "up")
                self._ip(ns, "link", "set", "lo", "up")
                self._ip(ns, "addr", "add", f"{self.address(i)}/24", "dev", NODE_IFACE)
                self._ip(ns, "link", "set", NODE_IFACE, "up")
                continue
            router = f"{self.prefix}-r{i}"
            self._add_namespace(router)
            self._add_namespace(ns)
            self._ip(internet, "link", "add", port, "type", "veth", "peer", "name", "wan", "netns", router)
            self._ip(internet, "link", "set", port, "master", BRIDGE, "up")
            self._ip(router, "link", "add", "lan", "type", "veth", "peer", "name", NODE_IFACE, "netns", ns)
            self._ip(router, "link", "set", "lo", "up")
            self._ip(router, "addr", "add", f"{self.public_address(i)}/24", "dev", "wan")
            self._ip(router, "addr", "add", f"192.168.{i}.1/24", "dev", "lan")
            self._ip(router, "link", "set", "wan", "up")
            self._ip(router, "link", "set", "lan", "up")
            self._ip(ns, "link", "set", "lo", "up")
            self._ip(ns, "addr", "add", f"{self.address(i)}/24", "dev", NODE_IFACE)
            self._ip(ns, "link", "set", NODE_IFACE, "up")
            self._ip(ns, "route", "add", "default", "via", f"192.168.{i}.1")
            checked(["ip", "netns", "exec", router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
            checked(
                ["ip", "netns", "exec", router, "nft", "-f", "-"], stdin=_nat_rules(random_ports=self.kinds[i - 1] == SYMMETRIC)
            )

    def partition(self, group_a: Iterable[NodeRef], group_b: Iterable[NodeRef]) -> None:
        raise LabError("a NAT lab has no partitions: build a Lab for those")

    def drop_inbound(self, receivers: Iterable[NodeRef], senders: Iterable[NodeRef], *, oneway: bool = False) -> None:
        raise LabError("a NAT lab has no inbound drops: its routers already drop unsolicited inbound")


def _nat_rules(*, random_ports: bool) -> str:
    """The router's ruleset: masquerade out of the WAN, stateful filter on forward and input."""
    masquerade = "masquerade random" if random_ports else "masquerade"
    return (
        f"add table ip {NAT_TABLE}\n"
        f"add chain ip {NAT_TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n"
        f'add rule ip {NAT_TABLE} postrouting oifname "wan" {masquerade}\n'
        f"add chain ip {NAT_TABLE} forward {{ type filter hook forward priority filter; policy drop; }}\n"
        f"add rule ip {NAT_TABLE} forward ct state established,related accept\n"
        f'add rule ip {NAT_TABLE} forward iifname "lan" oifname "wan" accept\n'
        f"add chain ip {NAT_TABLE} input {{ type filter hook input priority filter; policy drop; }}\n"
        f"add rule ip {NAT_TABLE} input ct state established,related accept\n"
        f'add rule ip {NAT_TABLE} input iifname {{ "lo", "lan" }} accept\n'
    )
