"""A worker node: registers its capacity and runs the replica processes assigned to it.

The controller writes assignments to `node:<id>:assign`; the node starts a process for each
assignment it is not running and stops (SIGTERM, then SIGKILL after the graceful timeout) each
process no longer assigned. When a replica process exits, the node marks its record DEAD, or
FAILED if it never became RUNNING, so the controller replaces it. Replica processes die with
their node (PR_SET_PDEATHSIG), so a killed node leaves no orphans serving stale code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass

from tenacity import AsyncRetrying, retry_if_result, stop_after_delay, stop_never, wait_fixed

from ..config import ProxyLocation
from ..credentials import HOW_TO_SET, cluster_secret
from ..exceptions import BrokerServeError, ProtocolError, RuntimeEnvError
from ..lifecycle import die_with_parent_env, heartbeat_loop, stop_on_signals
from ..observability.entry_point import run_entry_point
from ..observability.metrics import NodeMetricsServer
from ..protocol import messages
from ..runtime_env import venvs
from ..runtime_env.cache import HostCache
from ..runtime_env.environment import NOTHING, Environment, Prepared, cache_entries, prepare, unseal
from ..runtime_env.progress import ProgressReporter
from ..schema import ReplicaState
from ..settings import Settings
from ..state.liveness import process_id
from ..state.records import Assignment, ReplicaEndState
from ..state.store import Store, now

log = logging.getLogger("broker_serve.node.worker")

SYNC_PERIOD_S = 1.0
HEARTBEAT_INTERVAL_S = 2.0
KILL_MARGIN_S = 5.0
PROXY_RESTART_S = 5.0  # a node proxy that exits is started again at most this often
PRUNE_PERIOD_S = 600.0  # how often the runtime_env cache is pruned
# An exit in these states is a failure to start.
_STARTING_STATES = (ReplicaState.PENDING, ReplicaState.STARTING, ReplicaEndState.FAILED)


@dataclass
class ReplicaProcess:
    replica_id: str
    process: subprocess.Popen[bytes]
    graceful_s: float
    stop_sent: float | None = None
    assignment: Assignment | None = None
    environment: Environment | None = None  # its runtime_env, whose cache entries it uses


async def _until_exited(replicas: Iterable[ReplicaProcess], timeout_s: float | None) -> bool:
    """Whether every process exited within `timeout_s` (None: however long it takes), looking
    every 50 ms."""
    async def exited() -> bool:
        return all(r.process.poll() is not None for r in replicas)

    stop = stop_never if timeout_s is None else stop_after_delay(timeout_s)
    return bool(await AsyncRetrying(stop=stop, wait=wait_fixed(0.05),
                                    retry=retry_if_result(lambda done: not done),
                                    retry_error_callback=lambda state: False)(exited))


class WorkerNode:
    def __init__(self, settings: Settings, node_id: str | None = None,
                 num_cpus: float | None = None, resources: dict[str, float] | None = None,
                 proxy: bool | None = None, proxy_port: int | None = None) -> None:
        self.settings = settings
        self.secret = b""  # verifies the runtime_env in specs (credentials.py)
        self.node_id = node_id or process_id()
        self.store = Store(settings.redis_url, settings.cluster, settings.client_tls())
        self.names = self.store.names
        self.resources = {"CPU": float(num_cpus if num_cpus is not None else os.cpu_count() or 1),
                          **(resources or {})}
        self.processes: dict[str, ReplicaProcess] = {}
        # None: run a proxy if the cluster's proxy location is EveryNode; True: always (unless
        # Disabled); False: never (the local cluster runs its own).
        self.wants_proxy = proxy
        self.proxy_port = proxy_port
        self.proxy: subprocess.Popen[bytes] | None = None
        self._proxy_started = -PROXY_RESTART_S
        self._exited: set[str] = set()
        # Replicas whose runtime_env is being prepared, before their process starts.
        self.preparing: dict[str, asyncio.Task[None]] = {}
        self.cache = HostCache(settings.runtime_env_cache())
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()
        # The replicas' metrics, at :9500/metrics (docs/architecture.md, "Observability").
        self.metrics = NodeMetricsServer(settings.metrics_host, settings.metrics_port)
        self.metrics_port: int | None = None

    async def run(self) -> None:
        stop_on_signals(self._stopping)
        await self.startup()
        beat = lambda: self.store.heartbeat(self.names.node_alive(self.node_id))
        tasks = [
            asyncio.create_task(self.store.watch_events(self._on_event, SYNC_PERIOD_S,
                                                        self._stopping)),
            asyncio.create_task(heartbeat_loop(beat, HEARTBEAT_INTERVAL_S, self._stopping)),
            asyncio.create_task(self._reap_loop()),
            asyncio.create_task(self._prune_loop()),
        ]
        await self._stopping.wait()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.shutdown()

    async def startup(self) -> None:
        self.secret = cluster_secret(self.settings)
        if not self.secret:
            log.warning("worker node without a cluster secret: its replicas cannot start; %s",
                        HOW_TO_SET)
        await self.store.ping()
        await self.store.heartbeat(self.names.node_alive(self.node_id))
        self.metrics_port = self.metrics.start()
        await self._register()
        log.info("worker node %s joined cluster %r with %s", self.node_id,
                 self.settings.cluster, self.resources)
        await self.store.announce("nodes")

    async def _register(self) -> None:
        await self.store.put_node({
            "node_id": self.node_id, "host": socket.gethostname(), "pid": os.getpid(),
            "resources": self.resources, "started": now(), "metrics_port": self.metrics_port,
        })

    async def shutdown(self) -> None:
        log.info("worker node %s stopping %d replica(s)", self.node_id, len(self.processes))
        for task in self.preparing.values():
            task.cancel()
        venvs.stop_installs()  # their threads would keep this process alive until pip ends
        await self._stop_proxy()
        for replica in self.processes.values():
            self._terminate(replica)
        grace_s = max([r.graceful_s for r in self.processes.values()] or [0]) + KILL_MARGIN_S
        if not await _until_exited(self.processes.values(), grace_s):
            for replica in self.processes.values():
                if replica.process.poll() is None:
                    replica.process.kill()
            await _until_exited(self.processes.values(), None)
        await self._reap()
        try:
            await self.store.deregister_node(self.node_id)
            await self.store.announce("nodes")
        except BrokerServeError as exc:  # the node's liveness key expires on its own
            log.warning("could not deregister: %s", exc)
        self.metrics.stop()
        await self.store.close()

    async def _reap_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._reap()
                self._kill_overdue()
            except Exception:  # one failed pass must not stop the reaping
                log.exception("reaping replica processes failed")
            await asyncio.sleep(0.2)

    async def _prune_loop(self) -> None:
        """Prune this host's runtime_env cache every PRUNE_PERIOD_S, first marking what the
        running replicas use as used (docs/architecture.md, "Runtime environments")."""
        while not self._stopping.is_set():
            try:
                for replica in list(self.processes.values()):
                    for kind, key in cache_entries(replica.environment):
                        self.cache.touch(kind, key)
                await asyncio.to_thread(self.cache.prune, self.settings.runtime_env_cache_ttl_s)
            except Exception:  # one failed pass must not stop the node
                log.exception("pruning the runtime_env cache failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), PRUNE_PERIOD_S)

    async def _on_event(self, event: str | None) -> None:
        if event not in (None, f"node:{self.node_id}"):
            return
        async with self._lock:
            try:
                await self._sync()
            except Exception:  # one failed tick must not stop the node
                log.exception("syncing assignments failed; retrying on the next tick")

    async def _sync(self) -> None:
        await self._sync_proxy()
        if not await self.store.is_seeded():
            # Redis restarted empty (or no controller ever led): stop nothing until a
            # controller writes the state back, and be a node it can see meanwhile.
            await self._register()
            return
        assigned = await self.store.assignments(self.node_id)
        for replica_id, assignment in assigned.items():
            if replica_id not in self.processes and replica_id not in self._exited \
                    and replica_id not in self.preparing:
                await self._spawn(replica_id, assignment)
        for replica_id, replica in self.processes.items():
            if replica_id not in assigned and replica.stop_sent is None:
                log.info("stopping replica %s", replica_id)
                self._terminate(replica)
        for replica_id, task in list(self.preparing.items()):
            if replica_id not in assigned:
                log.info("replica %s is no longer assigned; it will not start", replica_id)
                task.cancel()
        self._exited &= set(assigned)

    async def _spawn(self, replica_id: str, assignment: Assignment) -> None:
        """Start the replica's process, once its runtime_env is prepared on this node. One that
        needs preparing is prepared in a task of its own: the node goes on syncing and beating
        while pip runs."""
        try:
            environment = await self._environment(assignment)
        except (RuntimeEnvError, ProtocolError) as exc:
            await self._failed_to_start(replica_id, str(exc))
            return
        if environment is None:
            await self._start_process(replica_id, assignment, NOTHING)
            return
        task = asyncio.create_task(self._prepare_and_start(replica_id, assignment, environment))
        self.preparing[replica_id] = task
        task.add_done_callback(lambda done: self._prepared(replica_id, done))

    def _prepared(self, replica_id: str, task: asyncio.Task[None]) -> None:
        self.preparing.pop(replica_id, None)
        if not task.cancelled() and task.exception() is not None:
            # Redis went away, say: the next sync tries again, the cache keeps what is done.
            log.warning("preparing replica %s failed: %s; trying again", replica_id,
                        task.exception())

    async def _environment(self, assignment: Assignment) -> Environment | None:
        blob = await self.store.spec(assignment["app"], assignment["deployment"],
                                     assignment["version"])
        if blob is None:
            return None  # the replica reports the missing spec itself
        return unseal(messages.unpack(blob), self.secret)

    async def _prepare_and_start(self, replica_id: str, assignment: Assignment,
                                 environment: Environment) -> None:
        async def show(message: str) -> None:
            await self.store.update_replica(replica_id, message=message, updated=now())

        progress = ProgressReporter(show)
        timeout_s = environment["setup_timeout_s"]
        try:
            try:
                prepared = await asyncio.wait_for(
                    prepare(environment, self.cache, self.store,
                            self.settings.runtime_env_max_mb << 20, progress), timeout_s)
            finally:
                await progress.close()
        except TimeoutError:
            await self._failed_to_start(replica_id, f"preparing the runtime_env took more than "
                                                    f"{timeout_s:.0f}s (setup_timeout_seconds)")
            return
        except (RuntimeEnvError, OSError) as exc:  # OSError: this node's disk, say
            await self._failed_to_start(replica_id, f"preparing the runtime_env failed: {exc}")
            return
        async with self._lock:
            if replica_id in await self.store.assignments(self.node_id):
                await self._start_process(replica_id, assignment, prepared, environment)

    async def _failed_to_start(self, replica_id: str, message: str) -> None:
        log.error("could not start replica %s: %s", replica_id, message)
        await self.store.update_replica(replica_id, state=ReplicaEndState.FAILED,
                                        message=message, updated=now())
        self._exited.add(replica_id)

    async def _start_process(self, replica_id: str, assignment: Assignment,
                             prepared: Prepared, environment: Environment | None = None) -> None:
        command = [prepared.python, "-m", "broker_serve.replica",
                   "--app", assignment["app"], "--deployment", assignment["deployment"],
                   "--replica-id", replica_id, "--version", assignment["version"]]
        # A config's code is imported by reference from the app dir (docs/architecture.md,
        # "Declarative configs and the REST API"); replicas run there, or in their runtime_env's
        # working_dir, as Ray's do.
        app_dir = os.path.abspath(self.settings.app_dir or os.getcwd())
        env = {**os.environ, **prepared.env_vars, **self.settings.env(), **self.metrics.env()}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [*prepared.paths, app_dir,
                                                          env.get("PYTHONPATH")]))
        try:
            # fork and exec off the loop: a node starting many replicas keeps beating
            process = await asyncio.to_thread(
                subprocess.Popen, command, env={**env, **die_with_parent_env()},
                cwd=prepared.cwd or app_dir)
        except OSError as exc:
            await self._failed_to_start(replica_id, f"could not start the process: {exc}")
            return
        log.info("started replica %s (pid %d)", replica_id, process.pid)
        self.processes[replica_id] = ReplicaProcess(
            replica_id, process, float(assignment.get("graceful_shutdown_timeout_s", 20.0)),
            assignment=assignment, environment=environment,
        )

    async def _sync_proxy(self) -> None:
        """Run this node's proxy or not, as `--proxy` and the cluster's `location` say."""
        options = await self.store.http_options()
        wanted = options.location != ProxyLocation.Disabled and (
            self.wants_proxy or (self.wants_proxy is None
                                 and options.location == ProxyLocation.EveryNode))
        running = self.proxy is not None and self.proxy.poll() is None
        if running and not wanted:
            log.info("stopping this node's proxy (proxy location %s)", options.location.value)
            await self._stop_proxy()
        elif wanted and not running and time.monotonic() - self._proxy_started > PROXY_RESTART_S:
            if self.proxy is not None:
                log.warning("this node's proxy exited (code %s); starting it again",
                            self.proxy.returncode)
            port = self.proxy_port if self.proxy_port is not None else options.port
            self._proxy_started = time.monotonic()
            self.proxy = await asyncio.to_thread(
                subprocess.Popen,
                [sys.executable, "-m", "broker_serve", "proxy", "--host", options.host,
                 "--port", str(port)],
                env={**os.environ, **self.settings.env(), **die_with_parent_env()})
            log.info("started this node's proxy on %s:%d (pid %d)", options.host, port,
                     self.proxy.pid)

    async def _stop_proxy(self) -> None:
        proxy, self.proxy = self.proxy, None
        if proxy is not None and proxy.poll() is None:
            proxy.terminate()
            try:  # uvicorn finishes open requests first
                await asyncio.to_thread(proxy.wait, 35)
            except subprocess.TimeoutExpired:
                proxy.kill()

    def _terminate(self, replica: ReplicaProcess) -> None:
        if replica.process.poll() is None and replica.stop_sent is None:
            replica.process.terminate()
        replica.stop_sent = replica.stop_sent or time.monotonic()

    def _kill_overdue(self) -> None:
        for replica in self.processes.values():
            if replica.stop_sent is None or replica.process.poll() is not None:
                continue
            if time.monotonic() - replica.stop_sent > replica.graceful_s + KILL_MARGIN_S:
                log.warning("replica %s ignored SIGTERM; killing it", replica.replica_id)
                replica.process.kill()

    async def _reap(self) -> None:
        for replica_id, replica in list(self.processes.items()):
            code = replica.process.poll()
            if code is None:
                continue
            del self.processes[replica_id]
            self._exited.add(replica_id)
            self.metrics.process_exited(replica.process.pid)
            record = await self.store.replica(replica_id)
            if record is None:
                continue  # the controller already let it go
            # One this node stopped ended as asked, even if it had not started yet.
            if record.get("state") in _STARTING_STATES and code != 0 and replica.stop_sent is None:
                message = record.get("message") or f"the process exited with code {code}"
                await self.store.update_replica(replica_id, state=ReplicaEndState.FAILED,
                                                message=message, updated=now())
            elif replica.stop_sent is None:
                log.warning("replica %s exited unexpectedly (code %s)", replica_id, code)
                # The controller lists it among the recent failures (the status page).
                await self.store.update_replica(
                    replica_id, state=ReplicaEndState.DEAD, updated=now(), exited_unexpectedly=True,
                    message=f"the process exited unexpectedly with code {code}")
            else:
                await self.store.update_replica(replica_id, state=ReplicaEndState.DEAD,
                                                updated=now())
            await self.store.announce("replicas")


def main(settings: Settings | None = None, node_id: str | None = None,
         num_cpus: float | None = None, resources: dict[str, float] | None = None,
         proxy: bool | None = None, proxy_port: int | None = None) -> None:
    run_entry_point(WorkerNode(settings or Settings.from_env(), node_id, num_cpus, resources,
                               proxy, proxy_port).run(), "worker node")
