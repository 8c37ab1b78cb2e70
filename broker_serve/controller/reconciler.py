"""The controller: turns desired applications into replicas on worker nodes, and publishes the
route table and statuses.

It is a reconcile loop over the state in Redis, run on every change event and once a second, so a
restarted or standby controller picks up where the last one stopped. Only the holder of the
Redis lease acts, and it checks that it still may before every write (`leadership.py`).
Nothing here is on the request path.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from aio_pika import ExchangeType
from aio_pika.abc import AbstractRobustChannel

from ..config import AutoscalingConfig, DeploymentConfig, is_bounded, is_durable, is_ordered
from ..credentials import HOW_TO_SET, cluster_secret
from ..exceptions import BrokerServeError, PreconditionFailed
from ..lifecycle import heartbeat_loop, stop_on_signals
from ..observability.entry_point import run_entry_point
from ..observability.metrics import ControllerMetrics
from ..protocol import priorities
from ..runtime_env import venvs
from ..runtime_env.cache import HostCache
from ..runtime_env.pruning import PeriodicPruning
from ..schema import ApplicationStatus, DeploymentStatus, ReplicaState
from ..settings import Settings
from ..state.liveness import process_id
from ..state.records import (
    AppRecord,
    AppStatusRecord,
    Assignment,
    DeploymentEntry,
    DeploymentStatusRecord,
    NodeRecord,
    ReplicaEndState,
    ReplicaRecord,
    Route,
    RouteTableRecord,
    TrafficRecord,
)
from ..state.store import Store, now
from ..transport.broker import Broker, connection_name
from ..transport.dead_letters import DeadLetters
from ..transport.errors import map_amqp_errors
from .autoscaler import Autoscaler
from .leadership import Leadership, LeadershipLost
from .placement import place
from .reseed import StateCopy
from .rest import serve_rest_api
from .traffic import traffic_routes

log = logging.getLogger("broker_serve.controller.reconciler")

RECONCILE_PERIOD_S = 1.0
MAX_START_FAILURES = 3
HEARTBEAT_GRACE_S = 12.0
REDECLARE_EVERY_S = 10.0
# A quorum queue dead-letters a request returned this often, as a backstop: replicas answer a
# request that killed 3 of them first (docs/architecture.md, "Requests that kill replicas"),
# and live replicas that give requests back (a drain, a lost channel) return them too.
QUORUM_DELIVERY_LIMIT = 20
AMQP_TIMEOUT_S = 10.0
SHUTDOWN_TIMEOUT_S = 10.0
HEARTBEAT_INTERVAL_S = 2.0
# A replica in one of these is replaced.
_ENDED_STATES = tuple(ReplicaEndState)
# A deployment in one of these serves at its target (or scales towards it).
_SERVING_STATES = (DeploymentStatus.HEALTHY, DeploymentStatus.UPSCALING,
                   DeploymentStatus.DOWNSCALING)


@dataclass
class StartFailures:
    """How often the replicas one deploy started for a deployment failed to start.

    Only replicas started for the application's current deploy (its record's `deploy_id`)
    count: a leftover of an earlier deploy, such as the replica record of a killed script's
    run, never makes the wanted one fail.
    """
    deploy_id: str | None
    count: int = 0
    last_error: str = ""


@dataclass
class _DeploymentRound:
    """One deployment in one reconcile: its entry in the app record, its replica target
    (`num_replicas`, or the autoscaler's), its live replicas (including those started in this
    round), and the replicas told to stop whose processes still run."""
    app: str
    name: str
    spec: DeploymentEntry
    version: str  # the spec's
    deploy_id: str | None
    replicas: list[ReplicaRecord]
    target: int
    stopping: list[ReplicaRecord] = field(default_factory=list)

    def current(self) -> list[ReplicaRecord]:
        """The replicas of the wanted version."""
        return [r for r in self.replicas if r.get("version") == self.version]

    def old(self) -> list[ReplicaRecord]:
        return [r for r in self.replicas if r.get("version") != self.version]

    def draining_old(self) -> bool:
        """Whether a replica of an earlier version still runs, stopping: until it exits it
        may take requests, so the update is not done."""
        return any(r.get("version") != self.version for r in self.stopping)

    def stop(self, record: ReplicaRecord) -> None:
        self.replicas.remove(record)
        self.stopping.append(record)

    def running(self) -> int:
        return sum(1 for r in self.current() if r.get("state") == ReplicaState.RUNNING)


class Controller:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.controller_id = process_id()
        self.store = Store(settings.redis_url, settings.cluster, settings.client_tls())
        self.names = self.store.names
        self.broker = Broker(settings.amqp_url,
                             connection_name(settings.cluster, "controller", self.controller_id),
                             cancel_exchange=self.names.cancel_exchange,
                             tls=settings.client_tls())
        self.leader = False
        self._leadership = Leadership(self.store, self.controller_id)
        self._declared: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._dead_letter_arguments: dict[str, Any] = {}  # as startup declared the queue
        self._failures: dict[tuple[str, str], StartFailures] = {}
        self._autoscalers: dict[tuple[str, str], Autoscaler] = {}
        self._unplaceable: dict[tuple[str, str], str] = {}  # logged once, not every tick
        self._state = StateCopy(HostCache(settings.runtime_env_cache()))
        self._pruning = PeriodicPruning(settings)  # runtime_env packages and caches
        self._copied_at = -1e9
        # After writing the state back, heartbeats need a moment to reappear.
        self._restored_at = -1e9
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        self.metrics = ControllerMetrics()  # served at /metrics by the REST API

    # lifecycle ---------------------------------------------------------------------------------
    async def run(self) -> None:
        stop_on_signals(self._stopping)
        await self.startup()
        main = asyncio.create_task(
            self.store.watch_events(self._on_event, RECONCILE_PERIOD_S, self._stopping)
        )
        beat = asyncio.create_task(heartbeat_loop(self._heartbeat, HEARTBEAT_INTERVAL_S,
                                                  self._stopping))
        await self._stopping.wait()
        # A reconcile may be stuck on an unreachable broker or Redis: cancel it, don't wait.
        main.cancel()
        await asyncio.gather(main, beat, return_exceptions=True)
        await asyncio.wait_for(self.shutdown(), SHUTDOWN_TIMEOUT_S)

    async def _check_secret(self) -> None:
        """Warn without a cluster secret (configs cannot be deployed), and delete the copy an
        older version kept in Redis: whoever read it could sign."""
        if not cluster_secret(self.settings):
            log.warning("controller without a cluster secret: configs cannot be deployed; %s",
                        HOW_TO_SET)
        if await self.store.delete_legacy_secret():
            log.warning("deleted %s, the cluster secret an older version kept in Redis: the "
                        "cluster signs with the operator's secret now, and applications "
                        "deployed before the upgrade must be deployed again",
                        self.names.legacy_secret)

    async def startup(self) -> None:
        await self.store.ping()
        await self._heartbeat()
        await self._check_secret()
        await self.broker.connect()  # declares the cancel exchange
        channel = await self.broker.channel()
        await self._declare_dead_letters(channel)
        self._channel = channel
        # Waits for its port in the background while another controller on this host has it.
        self._rest = await serve_rest_api(
            self.settings, self.store,
            lambda: self.metrics.render(self._ready_messages, self.store.jobs.counts,
                                        self._dead_letters_waiting),
            DeadLetters(self.broker, self.names, self.store), self._queue_depths)
        log.info("controller %s started for cluster %r", self.controller_id, self.settings.cluster)

    async def _declare_dead_letters(self, channel: AbstractRobustChannel) -> None:
        """The dead-letter queue, on the controller's robust channel, so that aio-pika
        declares it again after a reconnect. In durable mode (BROKER_SERVE_QUEUE_TYPE=quorum)
        it is a quorum queue, so that it outlives a node as the request queues do: a classic
        one lives on one node, and declaring it again while that node is down fails. One that
        exists with the other type is kept, dead letters and all: delete it to change it."""
        queue = self.names.dead_letters
        arguments = ({"x-queue-type": "quorum"} if self.settings.queue_type == "quorum"
                     else {})
        recorded = await self.store.queue_arguments(queue)
        if recorded is not None and recorded != arguments:
            log.warning("the dead-letter queue %s exists with %s, not %s; delete it (its dead "
                        "letters too) to change its type", queue, recorded, arguments)
            arguments = recorded
        with map_amqp_errors(f"cannot declare {queue}"):
            await channel.declare_queue(queue, durable=True, arguments=arguments)
        await self.store.put_queue_arguments(queue, arguments)
        self._dead_letter_arguments = arguments

    async def _heartbeat(self) -> None:
        # Its value, this process's stamp, lets a driver or controller on this machine see at
        # once that the lease holder died (_liveness.py).
        await self.store.heartbeat(self.names.controller_alive(self.controller_id))

    async def shutdown(self) -> None:
        venvs.stop_installs()  # a config build's pip must not hold the controller up
        await self._rest.stop()
        try:
            if self.leader:
                await self.store.release_lease(self.controller_id)
            await self.store.drop_heartbeat(self.names.controller_alive(self.controller_id))
        except BrokerServeError as exc:  # the lease and the liveness key expire on their own
            log.warning("could not give up the lease of %s: %s", self.controller_id, exc)
        try:
            await asyncio.wait_for(self.broker.close(), AMQP_TIMEOUT_S)
        except (BrokerServeError, TimeoutError) as exc:
            log.warning("could not close the RabbitMQ connection cleanly: %s", exc)
        await self.store.close()

    async def _on_event(self, event: str | None) -> None:
        async with self._lock:
            try:
                if await self._hold_lease():
                    if await self._state.restore_if_lost(self.store, self._leadership.check):
                        self._restored_at = time.monotonic()
                    await self.reconcile()
                if time.monotonic() - self._copied_at >= RECONCILE_PERIOD_S:
                    self._copied_at = time.monotonic()
                    await self._state.take(self.store)
                await self._pruning.maybe_prune(self.store, leader=self.leader,
                                                before_delete=self._leadership.check)
            except LeadershipLost:  # stalled past the lease: another may lead by now
                self._stand_by()
            except Exception:  # one failed tick must not stop the controller
                log.exception("reconcile failed; retrying on the next tick")

    async def _hold_lease(self) -> bool:
        if not await self._leadership.hold():
            self._stand_by()
            return False
        if not self.leader:
            log.info("controller %s is now the leader", self.controller_id)
        self.leader = True
        self.metrics.set_leader(True)
        return True

    def _stand_by(self) -> None:
        if self.leader:
            log.warning("controller %s lost the lease; standing by", self.controller_id)
            # Another leader may have changed both meanwhile: start afresh on leading again.
            self._declared.clear()
            self._autoscalers.clear()
        self.leader = False
        self.metrics.set_leader(False)

    # reconcile ---------------------------------------------------------------------------------
    async def reconcile(self) -> None:
        apps = await self.store.apps()
        nodes = await self._live_nodes()
        replicas, stopping = await self._live_replicas(nodes, apps)
        by_deployment: dict[tuple[str, str], list[ReplicaRecord]] = defaultdict(list)
        for record in replicas.values():
            by_deployment[(record["app"], record["deployment"])].append(record)
        stopping_by_deployment: dict[tuple[str, str], list[ReplicaRecord]] = defaultdict(list)
        for record in stopping.values():
            stopping_by_deployment[(record["app"], record["deployment"])].append(record)

        statuses: dict[str, AppStatusRecord] = {}
        for app_name, app in apps.items():
            statuses[app_name] = await self._reconcile_app(app_name, app, by_deployment,
                                                           stopping_by_deployment, nodes)
        await self._remove_deleted_apps(apps, by_deployment)
        await self._write_statuses(statuses)
        self.metrics.set_deployments(apps, statuses)
        await self._write_routes(apps, statuses, await self.store.traffic())
        await self._forget_dead_proxies()
        await self._leadership.check()
        await self.store.prune_tombstones(int(time.time() * 1000))

    async def _forget_dead_proxies(self) -> None:
        proxies = await self.store.proxies()
        alive = await self.store.alive([self.names.proxy_alive(p) for p in proxies])
        dead = [proxy for proxy, ok in zip(proxies, alive) if not ok]
        if dead:
            await self._leadership.check()
            await self.store.delete_field(self.names.proxies, *dead)

    async def _live_nodes(self) -> dict[str, NodeRecord]:
        nodes = await self.store.nodes()
        alive = await self.store.alive([self.names.node_alive(n) for n in nodes])
        live = {}
        settling = time.monotonic() - self._restored_at < HEARTBEAT_GRACE_S
        for (node_id, record), is_alive in zip(nodes.items(), alive):
            if is_alive or settling:
                live[node_id] = record
                continue
            log.warning("worker node %s is gone (its process ended or its heartbeats stopped);"
                        " dropping it and its replicas", node_id)
            await self._record_failure(
                "node-lost", None, "its process ended or its heartbeats stopped; its "
                "replicas go elsewhere", node_id)
            await self._leadership.check()
            await self.store.delete_field(self.names.nodes, node_id)
            await self._leadership.check()
            await self.store.drop_assignments(node_id)
        return live

    async def _live_replicas(self, nodes: dict[str, NodeRecord], apps: dict[str, AppRecord]
                             ) -> tuple[dict[str, ReplicaRecord], dict[str, ReplicaRecord]]:
        """Replica records that still count, after removing dead and failed ones; and those
        no longer assigned whose processes still beat (stopping)."""
        records = await self.store.replicas()
        assigned: dict[str, str] = {}
        for node_id in nodes:
            for replica_id in await self.store.assigned_replica_ids(node_id):
                assigned[replica_id] = node_id
        beats = await self.store.heartbeats([self.names.replica_alive(r) for r in records])
        live, stopping = {}, {}
        for (replica_id, record), beat in zip(records.items(), beats):
            is_alive = beat is not None
            record["ongoing"] = int(beat) if beat is not None and beat.isdigit() else 0
            state = record.get("state")
            stale = (state == ReplicaState.RUNNING and not is_alive
                     and now() - record.get("updated", 0) > HEARTBEAT_GRACE_S
                     and time.monotonic() - self._restored_at > HEARTBEAT_GRACE_S)
            if "app" not in record or "deployment" not in record:
                # Written only in part (a node marked a record the controller had just
                # removed): it names no deployment, so drop it rather than trip on it.
                await self._remove_replica(replica_id, record, assigned.get(replica_id))
                continue
            if replica_id not in assigned and is_alive and state not in _ENDED_STATES:
                # Told to stop (or its node is gone) but still running: its record goes when
                # its node marks it DEAD, or its heartbeat runs out.
                stopping[replica_id] = record
                continue
            if state in _ENDED_STATES or replica_id not in assigned or stale:
                if state == ReplicaEndState.UNHEALTHY:
                    log.warning("replica %s is unhealthy (%s); replacing it", replica_id,
                                record.get("message"))
                    await self._record_failure("replica-unhealthy", record,
                                               record.get("message", ""))
                elif state == ReplicaEndState.FAILED:
                    log.warning("replica %s failed: %s", replica_id, record.get("message"))
                    self._count_failure(record, apps.get(record["app"]))
                    await self._record_failure("replica-failed", record,
                                               record.get("message", ""))
                elif stale:
                    log.warning("replica %s stopped heartbeating; replacing it", replica_id)
                    await self._record_failure("replica-lost", record,
                                               "it stopped heartbeating; replaced")
                elif state == ReplicaEndState.DEAD and record.get("exited_unexpectedly"):
                    await self._record_failure("replica-died", record,
                                               record.get("message", ""))
                await self._remove_replica(replica_id, record, assigned.get(replica_id))
                continue
            live[replica_id] = record
        return live, stopping

    async def _record_failure(self, kind: str, replica: ReplicaRecord | None, message: str,
                              node: str | None = None) -> None:
        """Keep the failure for the status page (`failures`, the latest few)."""
        await self._leadership.check()
        await self.store.add_failure({
            "time": now(), "kind": kind, "message": message,
            "app": replica.get("app") if replica else None,
            "deployment": replica.get("deployment") if replica else None,
            "replica": replica.get("replica_id") if replica else None,
            "node": node or (replica.get("node") if replica else None)})

    def _count_failure(self, record: ReplicaRecord, app: AppRecord | None) -> None:
        """Count a replica's failure to start against its deployment, if it was started for
        the deploy that is wanted now."""
        if app is None or record.get("deploy_id") != app.get("deploy_id") \
                or record["deployment"] not in app["deployments"]:
            return
        failures = self._start_failures(record["app"], record["deployment"], app.get("deploy_id"))
        failures.count += 1
        failures.last_error = record.get("message", "")

    def _start_failures(self, app: str, deployment: str, deploy_id: str | None) -> StartFailures:
        failures = self._failures.get((app, deployment))
        if failures is None or failures.deploy_id != deploy_id:
            failures = self._failures[(app, deployment)] = StartFailures(deploy_id)
        return failures

    async def _unassign(self, record: ReplicaRecord) -> None:
        """Tell the replica's node to stop it. Its record stays until the node marks it DEAD,
        so that the update waits for the process to be gone (Ray's STOPPING)."""
        node_id = record.get("node")
        if node_id:
            await self._leadership.check()
            await self.store.delete_field(self.names.node_assignments(node_id),
                                          record["replica_id"])
            await self.store.announce(f"node:{node_id}")

    async def _remove_replica(self, replica_id: str, record: ReplicaRecord,
                              node_id: str | None) -> None:
        node_id = node_id or record.get("node")
        if node_id:
            await self._leadership.check()
            await self.store.delete_field(self.names.node_assignments(node_id), replica_id)
            await self.store.announce(f"node:{node_id}")
        await self._leadership.check()
        await self.store.delete_field(self.names.replicas, replica_id)

    async def _reconcile_app(self, app_name: str, app: AppRecord,
                             by_deployment: dict[tuple[str, str], list[ReplicaRecord]],
                             stopping: dict[tuple[str, str], list[ReplicaRecord]],
                             nodes: dict[str, NodeRecord]) -> AppStatusRecord:
        deployments: dict[str, DeploymentStatusRecord] = {}
        for dep_name, dep in app["deployments"].items():
            config = dep.get("config", {})
            queue_problem = await self._declare(
                dep["queue"], self.names.deployment_exchange(app_name, dep_name),
                int(config.get("max_queued_requests", -1)), quorum=is_durable(config))
            deployment = _DeploymentRound(
                app_name, dep_name, dep, dep["version"], app.get("deploy_id"),
                replicas=by_deployment.get((app_name, dep_name), []),
                target=int(dep["num_replicas"]),
                stopping=stopping.get((app_name, dep_name), []))
            status = deployments[dep_name] = await self._reconcile_deployment(deployment, nodes)
            if queue_problem:
                status["status"], status["message"] = DeploymentStatus.UPDATING, queue_problem
        app_status, message = _app_status(deployments)
        return {
            "name": app_name,
            "version": app["version"],
            # Echoed so that serve.run waits for the status of its own deploy, never for one
            # an earlier run of the same code left behind.
            "deploy_id": app.get("deploy_id"),
            "route_prefix": app.get("route_prefix"),
            "ingress": app["ingress"],
            "last_deployed_time_s": app.get("deployed_at", 0.0),
            "deployments": deployments,
            "status": app_status,
            "message": message,
        }

    async def _reconcile_deployment(self, deployment: _DeploymentRound,
                                    nodes: dict[str, NodeRecord]) -> DeploymentStatusRecord:
        """Start and stop replicas of one deployment towards its target; its status."""
        autoscaler = await self._autoscale(deployment.app, deployment.name, deployment.spec,
                                           deployment.replicas)
        if autoscaler is not None:
            deployment.target = autoscaler.target
        failures = self._start_failures(deployment.app, deployment.name, deployment.deploy_id)
        failed = failures.count >= MAX_START_FAILURES
        if failed:
            message = (f"The deployment failed to start {failures.count} times in a row. "
                       f"Last error: {failures.last_error}")
        else:
            message = await self._start_missing(deployment, nodes)
            self._note_unplaceable(deployment, message)
        await self._stop_extra(deployment)
        if deployment.running() >= deployment.target:
            await self._stop_old(deployment)
            failures.count = 0
        return _deployment_status(deployment, autoscaler, failed, message)

    async def _start_missing(self, deployment: _DeploymentRound,
                             nodes: dict[str, NodeRecord]) -> str:
        """Start replicas of the wanted version up to the target; why not all fit, or ""."""
        missing = deployment.target - len(deployment.current())
        if missing <= 0:
            return ""
        message = "" if nodes else "Waiting for a worker node to place replicas on."
        for _ in range(missing):
            record, why = await self._start_replica(
                deployment.app, deployment.name, deployment.version, deployment.deploy_id,
                deployment.spec, nodes)
            if record is None:
                return message or why
            deployment.replicas.append(record)
        return message

    def _note_unplaceable(self, deployment: _DeploymentRound, message: str) -> None:
        """Log why replicas cannot be placed when that changes, not on every tick."""
        key = (deployment.app, deployment.name)
        if message != self._unplaceable.get(key, ""):
            if message:
                log.warning("%s/%s: %s", deployment.app, deployment.name, message)
            self._unplaceable[key] = message

    async def _stop_extra(self, deployment: _DeploymentRound) -> None:
        """Stop replicas of the wanted version past the target, those not running first."""
        current = deployment.current()
        running_last = sorted(current, key=lambda r: r.get("state") == ReplicaState.RUNNING)
        for extra in running_last[deployment.target:]:
            await self._unassign(extra)
            deployment.stop(extra)

    async def _stop_old(self, deployment: _DeploymentRound) -> None:
        """Stop the replicas of earlier versions, once the wanted version's are running."""
        for record in deployment.old():
            await self._unassign(record)
            deployment.stop(record)

    async def _autoscale(self, app: str, name: str, dep: DeploymentEntry,
                         mine: list[ReplicaRecord]) -> Autoscaler | None:
        """Sample the deployment's load when due and return its autoscaler, if it has one."""
        raw = dep.get("config", {}).get("autoscaling_config")
        key = (app, name)
        if raw is None:
            self._autoscalers.pop(key, None)
            return None
        config = AutoscalingConfig.model_validate(raw)
        autoscaler = self._autoscalers.get(key)
        if autoscaler is None or autoscaler.config != config:
            if autoscaler is not None:
                start = autoscaler.target
            elif mine:  # a controller taking over: keep what runs
                start = len(mine)
            else:
                start = config.initial_replicas if config.initial_replicas is not None \
                    else config.min_replicas
            start = max(config.min_replicas, min(config.max_replicas, start))
            autoscaler = self._autoscalers[key] = Autoscaler(config, start)
        clock = time.monotonic()
        if autoscaler.due(clock):
            try:
                queued = await self._ready_messages(dep["queue"])
            except (LookupError, TimeoutError, BrokerServeError) as exc:  # no sample this time
                log.warning("could not read the depth of %s: %s", dep["queue"], exc)
                return autoscaler
            ongoing = sum(int(r.get("ongoing", 0)) for r in mine)
            # The depth read may have stalled: decide only while this controller may act.
            await self._leadership.check()
            before = autoscaler.target
            autoscaler.observe(clock, queued, ongoing)
            autoscaler.decide(clock)
            if autoscaler.target != before:
                log.info("autoscaling %s/%s: %s", app, name, autoscaler.reason)
                self.metrics.autoscaled(app, name, "up" if autoscaler.target > before else "down")
        return autoscaler

    async def _start_replica(self, app: str, deployment: str, version: str,
                             deploy_id: str | None, dep: DeploymentEntry,
                             nodes: dict[str, NodeRecord]
                             ) -> tuple[ReplicaRecord | None, str]:
        """Assign a new replica to a node; or None and why it fits on none."""
        request = DeploymentConfig.model_validate(dep["config"]).replica_resources()
        node_id, why = await self._place(nodes, app, deployment, request)
        if node_id is None:
            return None, why
        replica_id = f"{app}#{deployment}#{secrets.token_urlsafe(6)}"
        assignment: Assignment = {
            "app": app, "deployment": deployment, "version": version,
            "graceful_shutdown_timeout_s": dep.get("graceful_shutdown_timeout_s", 20.0),
            "resources": request}
        # The state's value, not the member: it is a key of `replica_states`, and orjson
        # writes only plain str keys.
        record: ReplicaRecord = {
            "replica_id": replica_id, "app": app, "deployment": deployment, "version": version,
            "deploy_id": deploy_id, "node": node_id, "state": ReplicaState.PENDING.value,
            "start_time": now(), "updated": now()}
        await self._leadership.check()
        await self.store.put_replica(record)
        await self._leadership.check()
        await self.store.put_assignment(node_id, replica_id, assignment)
        await self.store.announce(f"node:{node_id}")
        log.info("starting replica %s on node %s", replica_id, node_id)
        return record, ""

    async def _place(self, nodes: dict[str, NodeRecord], app: str, deployment: str,
                     request: dict[str, float]) -> tuple[str | None, str]:
        assignments = {node_id: await self.store.assignments(node_id) for node_id in nodes}
        return place(nodes, assignments, app, deployment, request)

    async def _declare(self, queue: str, exchange: str, bound: int, *,
                       quorum: bool = False) -> str:
        """Declare a request queue with its arguments, and its deployment exchange bound to
        it; returns why it could not, or "".

        RabbitMQ refuses (and closes the channel on) a declare with other arguments than the
        queue has, so the arguments this cluster declared each queue with are kept in Redis
        (`queue_arguments`), and a changed max_queued_requests or queue type re-creates the
        queue once no request waits in it; the new version's replicas consume the new queue.
        A classic queue declared before priorities existed (without `x-max-priority: 9`) is
        re-created so once too."""
        arguments: dict[str, Any] = {
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": self.names.dead_letters,
        }
        if bound > 0:  # max_queued_requests: past it RabbitMQ nacks the publish
            arguments.update({"x-max-length": bound, "x-overflow": "reject-publish"})
        arguments.update(priorities.queue_arguments(quorum=quorum))
        if quorum:  # replicated across the RabbitMQ cluster ("Durable mode")
            arguments.update({"x-queue-type": "quorum", "x-delivery-limit": QUORUM_DELIVERY_LIMIT})
        declared_at, declared_with = self._declared.get(queue, (-1e9, None))
        if declared_with == arguments and time.monotonic() - declared_at < REDECLARE_EVERY_S:
            return ""
        recorded = await self.store.queue_arguments(queue)
        try:
            if recorded is not None and recorded != arguments:
                waiting = await self._depth(queue)
                if waiting:
                    return (f"waiting for {waiting} queued request(s) to drain before applying "
                            f"the queue's new arguments")
                await self._leadership.check()
                with map_amqp_errors(f"cannot delete queue {queue}"):
                    await asyncio.wait_for(self._channel.queue_delete(queue), AMQP_TIMEOUT_S)
                log.info("re-creating queue %s with %s", queue, arguments)
            await self._leadership.check()
            await self._declare_on_own_channel(queue, exchange, arguments)
        except PreconditionFailed:
            # Declared with other arguments by a cluster whose record Redis lost.
            log.error("queue %s exists with other arguments than %s and Redis has no record "
                      "of them; delete the queue to apply them", queue, arguments)
            return "the queue exists with other arguments; delete it to apply the change"
        await self._leadership.check()
        await self.store.put_queue_arguments(queue, arguments)
        self._declared[queue] = (time.monotonic(), arguments)
        return ""

    async def _declare_on_own_channel(self, queue: str, exchange: str,
                                      arguments: dict[str, Any]) -> None:
        """On a channel of its own, closed after: the controller's channel must not re-declare
        the queue with these arguments after a reconnect, when they may have changed. The
        deployment's exchange is bound to it each time: a re-created queue lost its binding."""
        channel = await self.broker.channel()
        with map_amqp_errors(f"cannot declare queue {queue}"):
            try:
                declared = await asyncio.wait_for(
                    channel.declare_queue(queue, durable=True, arguments=arguments),
                    AMQP_TIMEOUT_S)
                fanout = await asyncio.wait_for(
                    channel.declare_exchange(exchange, ExchangeType.FANOUT, durable=True),
                    AMQP_TIMEOUT_S)
                await asyncio.wait_for(declared.bind(fanout), AMQP_TIMEOUT_S)
            finally:
                if not channel.is_closed:
                    await channel.close()

    async def _ready_messages(self, queue: str) -> int:
        """Requests waiting in a queue this controller declared (autoscaling, metrics)."""
        if queue not in self._declared:  # a passive declare of a missing one: a channel error
            raise LookupError(f"queue {queue} is not declared (any more)")
        return await self._depth(queue)

    async def _queue_depths(self, queues: list[str]) -> dict[str, int]:
        """The depths of the request queues this controller declared (the status page), under
        the reconcile lock, so that none is deleted between the check and the declare."""
        depths = {}
        async with self._lock:
            for queue in queues:
                try:
                    depths[queue] = await self._ready_messages(queue)
                except (LookupError, TimeoutError, BrokerServeError):  # not known here
                    continue
        return depths

    async def _dead_letters_waiting(self) -> int:
        """Messages in the dead-letter queue (metrics). Declared as startup declared it, not
        passively: one deleted meanwhile is made again instead of a channel error."""
        return await self._depth(self.names.dead_letters, self._dead_letter_arguments)

    async def _depth(self, queue: str, arguments: dict[str, Any] | None = None) -> int:
        """A passive declare's message count; with `arguments`, a declare's with them."""
        channel = await self.broker.channel()
        with map_amqp_errors(f"cannot read the depth of {queue}"):
            try:
                declare = (channel.declare_queue(queue, passive=True) if arguments is None else
                           channel.declare_queue(queue, durable=True, arguments=arguments))
                existing = await asyncio.wait_for(declare, AMQP_TIMEOUT_S)
                return int(existing.declaration_result.message_count or 0)
            finally:
                if not channel.is_closed:
                    await channel.close()

    async def _remove_deleted_apps(self, apps: dict[str, AppRecord],
                                   by_deployment: dict[tuple[str, str], list[ReplicaRecord]]
                                   ) -> None:
        leftovers = {app for app, _ in by_deployment} - set(apps)
        for key in [key for key in self._autoscalers if key[0] not in apps]:
            del self._autoscalers[key]
        for (app, _), records in by_deployment.items():
            if app not in apps:
                for record in records:
                    await self._remove_replica(record["replica_id"], record, None)
        old_statuses = await self.store.app_statuses()
        for app_name, status in old_statuses.items():
            if app_name in apps or app_name in leftovers:
                continue
            if await self.store.app_exists(app_name):
                continue  # deployed again since this reconcile read `apps`: next tick's work
            for dep_name in status.get("deployments", {}):
                queue = self.names.request_queue(app_name, dep_name)
                self._declared.pop(queue, None)
                try:
                    await self._leadership.check()
                    with map_amqp_errors(f"cannot delete queue {queue}"):
                        await asyncio.wait_for(self._channel.queue_delete(queue), AMQP_TIMEOUT_S)
                        await asyncio.wait_for(self._channel.exchange_delete(
                            self.names.deployment_exchange(app_name, dep_name)), AMQP_TIMEOUT_S)
                    await self._leadership.check()
                    await self.store.delete_queue_arguments(queue)
                except (BrokerServeError, TimeoutError) as exc:  # the app is gone either way;
                    # say what was left behind
                    log.warning("could not delete queue %s (%s); delete it by hand", queue,
                                exc or type(exc).__name__)
            # Not a plain delete: a spec that a record written meanwhile names must stay.
            await self._leadership.check()
            await self.store.delete_unnamed_specs(app_name)
            # The status goes last: serve.delete returns once it is gone, so by then the app's
            # specs and queues are gone too.
            await self._leadership.check()
            await self.store.delete_field(self.names.key("app_status"), app_name)
            for key in [key for key in self._failures if key[0] == app_name]:
                del self._failures[key]
            log.info("application %s deleted", app_name)

    async def _write_statuses(self, statuses: dict[str, AppStatusRecord]) -> None:
        for app_name, status in statuses.items():
            await self._leadership.check()
            await self.store.put_app_status(app_name, status)

    async def _write_routes(self, apps: dict[str, AppRecord],
                            statuses: dict[str, AppStatusRecord],
                            traffic: dict[str, TrafficRecord]) -> None:
        routes: dict[str, Route] = {}
        for app_name, app in apps.items():
            prefix = app.get("route_prefix")
            if prefix is None:
                continue
            status = statuses[app_name]
            ingress = status["deployments"][app["ingress"]]
            routes[prefix] = {
                "app": app_name,
                "deployment": app["ingress"],
                "queue": app["deployments"][app["ingress"]]["queue"],
                "status": status["status"],
                "message": status["message"],
                "ready": ingress["ready"],
                # Publishes to a bounded queue wait for the broker's confirm (503 when full),
                # to a durable one too, and are retried on another node.
                "bounded": is_bounded(app["deployments"][app["ingress"]]["config"]),
                "durable": is_durable(app["deployments"][app["ingress"]]["config"]),
                # A deadline gives a request its priority only here.
                "ordered": is_ordered(app["deployments"][app["ingress"]]["config"]),
            }
        # A traffic record's prefix is its own, over an application's entry there.
        routes.update(traffic_routes(traffic, apps, statuses))
        current = await self.store.routes()
        if current.get("routes") != routes:
            table: RouteTableRecord = {"version": int(current.get("version", 0)) + 1,
                                       "routes": routes}
            await self._leadership.check()
            await self.store.put_routes(table)
            await self.store.announce("routes")


def _deployment_status(deployment: _DeploymentRound, autoscaler: Autoscaler | None,
                       failed: bool, message: str) -> DeploymentStatusRecord:
    running, target = deployment.running(), deployment.target
    old = deployment.old() or deployment.draining_old()
    # A new user_config is applied by reconfigure() on the live replicas; until each says so,
    # the deployment is UPDATING.
    reconfiguring = any(r.get("user_config_hash") != deployment.spec.get("user_config_hash")
                        for r in deployment.current() if r.get("state") == ReplicaState.RUNNING)
    settled = running >= target and not old and not reconfiguring
    status = DeploymentStatus.UNHEALTHY if failed else (
        DeploymentStatus.HEALTHY if settled else DeploymentStatus.UPDATING)
    if autoscaler is not None:
        if status == DeploymentStatus.UPDATING and not old and not reconfiguring:
            status = DeploymentStatus.UPSCALING if running < target \
                else DeploymentStatus.DOWNSCALING
        message = message or autoscaler.reason
    replicas = deployment.replicas
    record: DeploymentStatusRecord = {
        "name": deployment.name,
        "status": status,
        "message": message,
        "replica_states": dict(Counter(r.get("state", ReplicaState.PENDING.value)
                                       for r in replicas)),
        # An autoscaled deployment takes requests at zero replicas: they wait in its
        # queue, and the wait starts a replica.
        "ready": autoscaler is not None or any(r.get("state") == ReplicaState.RUNNING
                                               for r in replicas),
        "target_replicas": target,
    }
    if autoscaler is not None:
        record["autoscaling"] = {"target_replicas": target, "last_decision": autoscaler.reason}
        record["status_trigger"] = "AUTOSCALING"
    return record


def _app_status(deployments: dict[str, DeploymentStatusRecord]
                ) -> tuple[ApplicationStatus, str]:
    states = [d["status"] for d in deployments.values()]
    if DeploymentStatus.UNHEALTHY in states:
        failed = next(d for d in deployments.values()
                      if d["status"] == DeploymentStatus.UNHEALTHY)
        return (ApplicationStatus.DEPLOY_FAILED,
                f"Deployment {failed['name']!r} failed: {failed['message']}")
    if all(state in _SERVING_STATES for state in states):
        return ApplicationStatus.RUNNING, ""
    waiting = [d["message"] for d in deployments.values() if d["message"]]
    return ApplicationStatus.DEPLOYING, waiting[0] if waiting else ""



def main(settings: Settings | None = None) -> None:
    run_entry_point(Controller(settings or Settings.from_env()).run(), "controller")
