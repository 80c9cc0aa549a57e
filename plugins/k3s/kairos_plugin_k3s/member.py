"""One node's part in the cluster: a reconciliation loop.

Each round, on a timer and whenever the ledger, the membership or the leader changes:

1. the leader (and only while it holds the lease) assigns roles to nodes that have none, every
   write stamped with its epoch;
2. the node reads its own role; once it has one and what it needs (its VPN address; for joiners
   the server address and the node token), it computes the k3s launch, lets other plugins prepare
   (``k3s_before_start``) and hands the launch to the runner, which restarts k3s only on change;
3. a master that created the cluster publishes ``ip-master`` and the node token (and, with
   ``k3s.share_kubeconfig``, the kubeconfig) under its own peer id as soon as k3s has written
   them; joiners use them only from a master (see :mod:`.cluster_state`).

Every value from the ledger, k3s's files or other plugins' hooks is checked (:mod:`.validate`)
before it reaches a file, the environment or a command line. Masters serve the kubeconfig on
demand over a stream, and the CLI asks its own node through a local socket (:mod:`.service`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

from .addresses import own_address, vpn_address, vpn_interface
from .cluster_state import (
    KUBECONFIG_KEY,
    MASTER_IP_KEY,
    MAX_KUBECONFIG_BYTES,
    TOKEN_KEY,
    ClusterState,
    address_key,
    clean_kubeconfig,
    own_key,
)
from .launch import Join, K3sLaunch, build_launch, server_url
from .paths import K3sPaths
from .roles import MASTER, WORKER, is_server, joins_cluster, plan_roles, stale_roles, starts_cluster
from .runners import ServiceRunner, make_runner, resolve_binary
from .service import (
    MAX_MASTERS_ASKED,
    PROTOCOL,
    ControlSocket,
    KubeconfigUnavailable,
    request_kubeconfig,
    serve_stream,
    socket_path,
)
from .settings import K3sSettings
from .validate import MAX_TOKEN_LENGTH, clean_host, clean_ip, clean_token

if TYPE_CHECKING:
    from kairos_core.plugin import NodeView

log = logging.getLogger(__name__)


class ClusterMember:
    """Drives k3s on one node from the shared ledger.

    :param node: the running node.
    :param settings: the plugin's settings from the node's config.
    :param runner: how k3s runs; default: the one ``k3s.runner`` names.
    """

    def __init__(self, node: NodeView, settings: K3sSettings, runner: ServiceRunner | None = None) -> None:
        self.node = node
        self.settings = settings
        self.paths = K3sPaths.under(settings.root)
        self.state = ClusterState(node.ledger, node.network_id, lease_holder=node.lease_holder, auto=settings.auto_enable)
        self.runner = runner or make_runner(
            settings.runner,
            self.paths,
            systemctl=settings.systemctl,
            rc_service=settings.rc_service,
            rc_update=settings.rc_update,
        )
        self.launch: K3sLaunch | None = None
        self.role: str | None = None
        self._waiting_for: str | None = None
        self.counters: Counter[str] = Counter()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_error: str | None = None
        self._last_notes: tuple[str, ...] = ()
        self._reported: set[str] = set()  # local problems already logged
        self._purged = False  # legacy join keys deleted, once per process
        self.control: ControlSocket | None = None

    @property
    def waiting_for(self) -> str | None:
        """What the node waits for before it can run k3s ("a role", "the VPN address", …), or None."""
        return self._waiting_for

    @waiting_for.setter
    def waiting_for(self, value: str | None) -> None:
        # Reported through the node, so that `kairos status` says why k3s does not start yet.
        if value != self._waiting_for:
            self._waiting_for = value
            self.node.set_state("k3s", f"waiting for {value}" if value else None)

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Announce this node as a k3s node, serve the kubeconfig, and start reconciling."""
        if self.settings.enabled:
            self.state.announce_candidate(self.node.peer_id, self.node.hostname, self.settings.role_hint)
        self.node.serve(PROTOCOL, lambda stream: serve_stream(self, stream))
        if self.node.api_socket is not None:
            # Beside the API socket and as private: whoever may use the node's API may ask.
            self.control = ControlSocket(self, socket_path(self.node.api_socket))
            try:
                await self.control.start()
            except OSError as exc:
                log.error("k3s: cannot serve %s: %s (kairos get-kubeconfig will not work)", self.control.path, exc)
                self.control = None
        self._task = asyncio.get_running_loop().create_task(self._run(), name="k3s-reconcile")

    def wake(self) -> None:
        """Reconcile now rather than at the next tick."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop reconciling; a directly supervised k3s stops too, a service keeps running.

        The runner is stopped whatever happens before: a k3s child must not outlive its node, even
        when this stop is cancelled (the node's shutdown hook timed out) or a step fails.
        """
        self.waiting_for = None
        try:
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
                self._task = None
            if self.control is not None:
                await self.control.stop()
                self.control = None
        finally:
            await self.runner.stop()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.reconcile()
                self._last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a failing service manager must not end the loop
                self.counters["errors"] += 1
                message = f"{type(exc).__name__}: {exc}"
                if message != self._last_error:  # once per distinct problem, not every round
                    log.error("k3s on %s: %s", self.node.hostname, message)
                    self._last_error = message
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.reconcile_interval)
            except TimeoutError:
                pass

    # --- one round -----------------------------------------------------------------------
    async def reconcile(self) -> None:
        """Schedule (when leader), then bring k3s in line with this node's role."""
        self.counters["rounds"] += 1
        if self.settings.auto_enable:
            self.schedule()
        self.state.audit()
        if not self.settings.enabled:
            return
        role = self.own_role()
        self.role = role
        if role is None:
            self.waiting_for = "a role"
            return
        address = self.address()
        if address is None:
            self.waiting_for = "the VPN address"
            return
        join = None
        if joins_cluster(role):
            join = await self.join_info(role)
            if join is None:
                return
        launch = await self.build(role, address, join)
        await self.node.call_hook("k3s_before_start", role=role, paths=self.paths)
        if await self.runner.apply(launch):
            self.counters["starts"] += 1
            log.info("k3s on %s: started as %s (%s)", self.node.hostname, role, self.runner.name)
        self.launch = launch
        self.waiting_for = None
        self.state.put(address_key(self.node.peer_id), address)
        if is_server(role):
            await self.publish(role, address)

    def schedule(self) -> dict[str, str]:
        """As the leader, assign roles to candidates that have none; returns what was written."""
        leader = self.node.leader
        if leader is None or leader[0] != self.node.peer_id:
            return {}
        epoch = leader[1]
        alive = set(self.node.members()) | {self.node.peer_id}
        candidates = {peer: hint for peer, hint in self.state.candidates().items() if peer in alive}
        assigned = {peer: record.role for peer, record in self.state.roles().items()}
        if self.settings.dynamic_roles:
            for peer in stale_roles(assigned, alive):
                if self.node.leader != (self.node.peer_id, epoch):
                    return {}
                self.state.unassign(peer, epoch, self.node.peer_id)
                log.info(
                    "leader (epoch %d): %s is no longer a member; its role %s is free again", epoch, peer, assigned.pop(peer)
                )
        plan = plan_roles(
            candidates,
            assigned,
            ha=self.settings.ha_enable,
            masters=self.settings.masters_total,
            minimum_nodes=self.settings.minimum_nodes,
        )
        for peer, role in plan.items():
            # Re-check right before each write: a leader deposed meanwhile writes nothing more.
            if self.node.leader != (self.node.peer_id, epoch):
                break
            self.state.assign(peer, role, epoch, self.node.peer_id)
            log.info("leader (epoch %d): %s is %s", epoch, peer, role)
        return plan

    def own_role(self) -> str | None:
        """The role the ledger gives this node, or the fixed one ``p2p.role`` asks for."""
        record = self.state.role_of(self.node.peer_id)
        if record is not None:
            return record.role
        hint = self.settings.role_hint
        if hint == WORKER:
            return WORKER
        if hint == MASTER and not self.settings.auto_enable:
            return MASTER  # nobody schedules: a fixed master creates its own cluster
        return None

    def address(self) -> str | None:
        """This node's k3s address: configured, else its VPN address, else its own."""
        if self.settings.node_ip:
            return clean_ip(self.settings.node_ip)  # refused with the config when it is not an IP
        if vpn_interface(self.node.config) is not None:
            return vpn_address(self.node.ledger, self.node.peer_id)
        return own_address(self.node.addresses()) or "127.0.0.1"

    async def server_address(self) -> str | None:
        """The API address joiners dial: a plugin's (kubevip's EIP), else ``ip-master``."""
        answer = await self._address_from_plugins()
        return answer or self.state.master_address

    async def join_info(self, role: str) -> Join | None:
        """Server URL and token for a joining role, or None while either is unknown."""
        token = self.state.node_token
        external = is_server(role) and bool(self.settings.external_db)
        server = None if external else await self.server_address()
        if token is None or (server is None and not external):
            self.waiting_for = "the node token" if token is None else "the master address"
            return None
        return Join(server_url(server, self.settings.api_port) if server else None, token)

    async def build(self, role: str, address: str, join: Join | None) -> K3sLaunch:
        """The launch for ``role``, with other plugins' flags and SANs."""
        server = is_server(role)
        if server:
            extra = await self._strings("k3s_server_args", role=role)
            sans = await self._strings("k3s_tls_sans")
        else:
            extra = await self._strings("k3s_agent_args")
            sans = []
        launch = build_launch(
            role,
            flags=self.settings.server if server else self.settings.agent,
            binary=self._binary(),
            paths=self.paths,
            node_ip=address,
            interface=vpn_interface(self.node.config),
            tls_sans=sans,
            plugin_args=extra,
            join=join,
            external_db=self.settings.external_db if server else "",
            embedded_registry=server and self.settings.embedded_registry,
        )
        if launch.notes != self._last_notes:
            for note in launch.notes:
                log.warning("k3s on %s: %s", self.node.hostname, note)
            self._last_notes = launch.notes
        return launch

    async def publish(self, role: str, address: str) -> None:
        """Share what joiners need, under this node's own keys; the init master always, other
        masters only what no master has published. Joiners trust it because a valid leader made
        this node a master, not because of where it is written."""
        me = self.node.peer_id
        origin = starts_cluster(role)
        if origin:
            self.state.put(own_key(me, MASTER_IP_KEY), await self.server_address_for_master(address))
        token = self._read_local(self.paths.node_token, 4 * MAX_TOKEN_LENGTH)
        if token is not None and clean_token(token.strip()) is None:
            self._report_once("bad-token", "the node token k3s wrote is not a plain k3s token: not published")
        elif token is not None and (origin or self.state.node_token is None):
            if self.state.put(own_key(me, TOKEN_KEY), token.strip()):
                log.info("k3s on %s: published %s", self.node.hostname, TOKEN_KEY)
        if self.settings.share_kubeconfig:
            text = self.own_kubeconfig()
            if text is not None and (origin or self.state.kubeconfig is None):
                if self.state.put(own_key(me, KUBECONFIG_KEY), text):
                    log.info("k3s on %s: published %s (k3s.share_kubeconfig)", self.node.hostname, KUBECONFIG_KEY)
        elif self.state.remove(own_key(me, KUBECONFIG_KEY)):
            log.info("k3s on %s: withdrew the shared kubeconfig (k3s.share_kubeconfig is off)", self.node.hostname)
        if not self._purged:
            self._purged = True
            gone = self.state.purge_legacy()
            if gone:
                log.info(
                    "k3s on %s: deleted the legacy keys %s from the open bucket %s",
                    self.node.hostname,
                    ", ".join(gone),
                    self.state.legacy_bucket,
                )

    async def server_address_for_master(self, address: str) -> str:
        """What the init master publishes as ``ip-master``: a plugin's address (EIP) or its own."""
        return await self._address_from_plugins() or address

    async def _address_from_plugins(self) -> str | None:
        """The first valid ``k3s_server_address`` answer; a malformed one is counted and skipped."""
        # All answers, not firstresult: a malformed first answer must not hide a valid later one
        # (the hookspec promises the first *valid* answer wins).
        for answer in await self.node.call_hook("k3s_server_address"):
            host = clean_host(answer)
            if host is not None:
                return host
            if answer:
                self.counters["bad_hook_results"] += 1
        return None

    # --- the admin kubeconfig ------------------------------------------------------------
    def own_kubeconfig(self) -> str | None:
        """The kubeconfig k3s wrote on this node, when it runs a k3s server; else None."""
        if not self.settings.enabled or not is_server(self.role):
            return None
        text = self._read_local(self.paths.kubeconfig, MAX_KUBECONFIG_BYTES)
        return clean_kubeconfig(text) if text is not None else None

    async def fetch_kubeconfig(self) -> tuple[str, str]:
        """The admin kubeconfig and where it came from (a peer id, or ``ledger``).

        From this node's own file on a master; else from a master's shared copy in the ledger
        (``k3s.share_kubeconfig``); else asked over :data:`~.service.PROTOCOL` from the masters,
        the init master first. :class:`~.service.KubeconfigUnavailable` when none has it.
        """
        own = self.own_kubeconfig()
        if own is not None:
            return own, self.node.peer_id
        shared = self.state.kubeconfig
        if shared is not None:
            return shared, "ledger"
        masters = [peer for peer in self.state.masters() if peer != self.node.peer_id][:MAX_MASTERS_ASKED]
        if not masters:
            raise KubeconfigUnavailable("no master is known yet")
        admitted = self.node.neighbours()
        problems = []
        for peer in masters:
            if peer not in admitted:
                problems.append(f"{peer}: not connected")
                continue
            try:
                return await request_kubeconfig(self.node, peer), peer
            except KubeconfigUnavailable as exc:
                problems.append(f"{peer}: {exc}")
        raise KubeconfigUnavailable("no master sent it (" + "; ".join(problems) + ")")

    def _read_local(self, path: Any, limit: int) -> str | None:
        """A file k3s wrote, as text; None while it is missing, larger than ``limit`` or not text."""
        try:
            with open(path, "rb") as handle:
                data = handle.read(limit + 1)
        except OSError:
            return None  # k3s has not written it yet: next round
        if len(data) > limit:
            self._report_once(f"size:{path}", f"{path} is larger than {limit} bytes: ignored")
            return None
        try:
            return data.decode()
        except UnicodeDecodeError:
            return None

    def _report_once(self, key: str, message: str) -> None:
        if key in self._reported:
            return  # the same problem every round: logged and counted once
        self._reported.add(key)
        self.counters["local_problems"] += 1
        log.error("k3s on %s: %s", self.node.hostname, message)

    async def _strings(self, hook: str, **kwargs: Any) -> list[str]:
        values: list[str] = []
        for answer in await self.node.call_hook(hook, **kwargs):
            if isinstance(answer, (list, tuple)):
                values.extend(str(item) for item in answer if item is not None and str(item))
            else:
                self.counters["bad_hook_results"] += 1
        return values

    def _binary(self) -> str:
        return resolve_binary(self.settings.binary)
