"""A worker node: registers its capacity and runs the replica processes assigned to it.

The controller writes assignments to `node:<id>:assign`; the node starts a process for each
assignment it is not running and stops (SIGTERM, then SIGKILL after the graceful timeout) each
process no longer assigned. When a replica process exits, the node marks its record DEAD, or
FAILED if it never became RUNNING, so the controller replaces it. Replica processes die with
their node (PR_SET_PDEATHSIG), so a killed node leaves no orphans serving stale code.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ._lifecycle import heartbeat_loop, stop_on_signals
from ._settings import Settings
from ._store import Store, now

log = logging.getLogger("broker_serve.worker")

SYNC_PERIOD_S = 1.0
HEARTBEAT_INTERVAL_S = 2.0
KILL_MARGIN_S = 5.0


@dataclass
class ReplicaProcess:
    replica_id: str
    process: subprocess.Popen[bytes]
    graceful_s: float
    stop_sent: float | None = None
    assignment: dict[str, Any] = field(default_factory=dict)


def die_with_parent() -> None:
    """Run in the child before exec: get SIGTERM when the parent dies (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class WorkerNode:
    def __init__(self, settings: Settings, node_id: str | None = None,
                 num_cpus: float | None = None, resources: dict[str, float] | None = None) -> None:
        self.settings = settings
        self.node_id = node_id or f"{socket.gethostname()}-{os.getpid()}"
        self.store = Store(settings.redis_url, settings.cluster)
        self.names = self.store.names
        self.resources = {"CPU": float(num_cpus if num_cpus is not None else os.cpu_count() or 1),
                          **(resources or {})}
        self.processes: dict[str, ReplicaProcess] = {}
        self._exited: set[str] = set()
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()

    async def run(self) -> None:
        stop_on_signals(self._stopping)
        await self.startup()
        beat = lambda: self.store.heartbeat(self.names.node_alive(self.node_id))  # noqa: E731
        tasks = [
            asyncio.create_task(self.store.watch_events(self._on_event, SYNC_PERIOD_S,
                                                        self._stopping)),
            asyncio.create_task(heartbeat_loop(beat, HEARTBEAT_INTERVAL_S, self._stopping)),
            asyncio.create_task(self._reap_loop()),
        ]
        await self._stopping.wait()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.shutdown()

    async def startup(self) -> None:
        await self.store.ping()
        await self.store.heartbeat(self.names.node_alive(self.node_id))
        await self.store.put(self.names.nodes, self.node_id, {
            "node_id": self.node_id, "host": socket.gethostname(), "pid": os.getpid(),
            "resources": self.resources, "started": now(),
        })
        log.info("worker node %s joined cluster %r with %s", self.node_id,
                 self.settings.cluster, self.resources)
        await self.store.announce("nodes")

    async def shutdown(self) -> None:
        log.info("worker node %s stopping %d replica(s)", self.node_id, len(self.processes))
        for replica in self.processes.values():
            self._terminate(replica)
        deadline = time.monotonic() + max([r.graceful_s for r in self.processes.values()] or [0])
        while any(r.process.poll() is None for r in self.processes.values()):
            if time.monotonic() > deadline + KILL_MARGIN_S:
                for replica in self.processes.values():
                    if replica.process.poll() is None:
                        replica.process.kill()
            await asyncio.sleep(0.05)
        await self._reap()
        try:
            await self.store.delete_field(self.names.nodes, self.node_id)
            await self.store.redis.delete(self.names.node_alive(self.node_id),
                                          self.names.node_assignments(self.node_id))
            await self.store.announce("nodes")
        except Exception as exc:
            log.warning("could not deregister: %s", exc)
        await self.store.close()

    async def _reap_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self._reap()
                self._kill_overdue()
            except Exception:
                log.exception("reaping replica processes failed")
            await asyncio.sleep(0.2)

    async def _on_event(self, event: str | None) -> None:
        if event not in (None, f"node:{self.node_id}"):
            return
        async with self._lock:
            try:
                await self._sync()
            except Exception:
                log.exception("syncing assignments failed; retrying on the next tick")

    async def _sync(self) -> None:
        assigned = await self.store.get_all(self.names.node_assignments(self.node_id))
        for replica_id, assignment in assigned.items():
            if replica_id not in self.processes and replica_id not in self._exited:
                await self._spawn(replica_id, assignment)
        for replica_id, replica in self.processes.items():
            if replica_id not in assigned and replica.stop_sent is None:
                log.info("stopping replica %s", replica_id)
                self._terminate(replica)
        self._exited &= set(assigned)

    async def _spawn(self, replica_id: str, assignment: dict[str, Any]) -> None:
        command = [sys.executable, "-m", "broker_serve.replica",
                   "--app", assignment["app"], "--deployment", assignment["deployment"],
                   "--replica-id", replica_id, "--version", assignment["version"]]
        try:
            process = subprocess.Popen(command, env={**os.environ, **self.settings.env()},
                                       preexec_fn=die_with_parent)
        except OSError as exc:
            log.error("could not start replica %s: %s", replica_id, exc)
            await self.store.update(self.names.replicas, replica_id, state="FAILED",
                                    message=f"could not start the process: {exc}")
            self._exited.add(replica_id)
            return
        log.info("started replica %s (pid %d)", replica_id, process.pid)
        self.processes[replica_id] = ReplicaProcess(
            replica_id, process, float(assignment.get("graceful_shutdown_timeout_s", 20.0)),
            assignment=assignment,
        )

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
            record = await self.store.get_one(self.names.replicas, replica_id)
            if record is None:
                continue  # the controller already let it go
            if record.get("state") in ("PENDING", "STARTING", "FAILED") and code != 0:
                message = record.get("message") or f"the process exited with code {code}"
                await self.store.update(self.names.replicas, replica_id, state="FAILED",
                                        message=message, updated=now())
            else:
                if replica.stop_sent is None:
                    log.warning("replica %s exited unexpectedly (code %s)", replica_id, code)
                await self.store.update(self.names.replicas, replica_id, state="DEAD",
                                        updated=now())
            await self.store.announce("replicas")


def main(settings: Settings | None = None, node_id: str | None = None,
         num_cpus: float | None = None, resources: dict[str, float] | None = None) -> None:
    asyncio.run(WorkerNode(settings or Settings.from_env(), node_id, num_cpus, resources).run())
