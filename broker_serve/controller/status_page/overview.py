"""What the status page shows, in one JSON document read from the cluster's state.

Applications and deployments come from the view `serve.status()` and the REST API's GET show
(`state/status.py`); the page adds what that view leaves out: each replica's version, message
and ongoing requests (its heartbeat), each deployment's queue depth (read by the controller
that serves the page), the route table, the proxies and worker nodes, and the controller's
recent failures (`failures`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ...exceptions import BrokerServeError
from ...schema import ApplicationDetails, DeploymentDetails
from ...state.records import AppRecord, NodeRecord, ReplicaRecord, RouteTableRecord
from ...state.status import read_details
from ...state.store import Store

# The messages waiting in each of these request queues, as far as the controller knows them
# (a standby knows none).
QueueDepths = Callable[[list[str]], Awaitable[dict[str, int]]]

# Depths are read with one passive declare per queue: every viewer's poll shares a reading
# this young.
DEPTH_MAX_AGE_S = 1.0
DEPTH_TIMEOUT_S = 3.0


class Overview:
    def __init__(self, store: Store, queue_depths: QueueDepths | None) -> None:
        self.store = store
        self._queue_depths = queue_depths
        self._depths: dict[str, int] = {}
        self._depths_at = -1e9
        self._depths_lock = asyncio.Lock()

    async def read(self) -> dict[str, Any]:
        store = self.store
        details = await read_details(store)
        apps = await store.apps()
        records = await store.replicas()
        shown = [r.replica_id for app in details.applications.values()
                 for dep in app.deployments.values() for r in dep.replicas]
        beats = await store.heartbeats([store.names.replica_alive(r) for r in shown])
        ongoing = {replica_id: _ongoing(beat) for replica_id, beat in zip(shown, beats)}
        nodes = await store.nodes()
        queues = [dep["queue"] for app in apps.values() for dep in app["deployments"].values()]
        depths = await self._depths_of(queues)
        routes = await store.routes()
        return {
            "cluster": store.names.cluster,
            "time": time.time(),
            "controller": details.controller_info.actor_id,
            "applications": [
                _application(app, apps.get(app.name), records, ongoing, depths, nodes)
                for app in details.applications.values()],
            "routes": _routes(routes),
            "proxies": await self._proxies(routes),
            "nodes": await self._nodes(nodes, [records.get(r, {}) for r in shown]),
            "failures": await store.failures(),
        }

    async def _depths_of(self, queues: list[str]) -> dict[str, int]:
        if self._queue_depths is None or not queues:
            return {}
        async with self._depths_lock:
            if time.monotonic() - self._depths_at >= DEPTH_MAX_AGE_S or \
                    not set(queues) <= self._depths.keys():
                try:
                    self._depths = await asyncio.wait_for(self._queue_depths(queues),
                                                          DEPTH_TIMEOUT_S)
                except (TimeoutError, BrokerServeError):
                    self._depths = {}
                self._depths_at = time.monotonic()
            return self._depths

    async def _proxies(self, routes: RouteTableRecord) -> list[dict[str, Any]]:
        records = dict(sorted((await self.store.proxies()).items()))
        alive = await self.store.alive([self.store.names.proxy_alive(p) for p in records])
        return [{"proxy_id": proxy_id, "address": f"{record['host']}:{record['port']}",
                 "hostname": record.get("hostname"), "healthy": ok,
                 "routes_version": record.get("routes_version"),
                 "routes_current": record.get("routes_version") == routes["version"]}
                for (proxy_id, record), ok in zip(records.items(), alive)]

    async def _nodes(self, nodes: dict[str, NodeRecord], replicas: list[ReplicaRecord]
                     ) -> list[dict[str, Any]]:
        nodes = dict(sorted(nodes.items()))
        alive = await self.store.alive([self.store.names.node_alive(n) for n in nodes])
        on_node: dict[str, int] = {}
        for record in replicas:
            on_node[record.get("node", "")] = on_node.get(record.get("node", ""), 0) + 1
        return [{"node_id": node_id, "host": record.get("host"), "alive": ok,
                 "resources": record.get("resources", {}), "replicas": on_node.get(node_id, 0)}
                for (node_id, record), ok in zip(nodes.items(), alive)]


def _ongoing(beat: bytes | None) -> int | None:
    """A replica's heartbeat holds the number of requests it runs."""
    return int(beat) if beat is not None and beat.isdigit() else None


def _application(app: ApplicationDetails, record: AppRecord | None,
                 replicas: dict[str, ReplicaRecord], ongoing: dict[str, int | None],
                 depths: dict[str, int], nodes: dict[str, NodeRecord]) -> dict[str, Any]:
    entries = record["deployments"] if record else {}
    return {
        "name": app.name, "status": app.status.value, "message": app.message,
        "route_prefix": app.route_prefix, "source": app.source,
        "last_deployed_time_s": app.last_deployed_time_s,
        "version": record["version"] if record else None,
        "ingress": record["ingress"] if record else None,
        "deployments": [
            _deployment(dep, entries.get(dep.name), replicas, ongoing, depths, nodes)
            for dep in app.deployments.values()],
    }


def _deployment(dep: DeploymentDetails, entry: Any, records: dict[str, ReplicaRecord],
                ongoing: dict[str, int | None], depths: dict[str, int],
                nodes: dict[str, NodeRecord]) -> dict[str, Any]:
    queue = entry["queue"] if entry else None
    replicas = [_replica(r.replica_id, records.get(r.replica_id, {}), r.state,
                         ongoing.get(r.replica_id), nodes) for r in dep.replicas]
    return {
        "name": dep.name, "status": dep.status.value, "status_trigger": dep.status_trigger,
        "message": dep.message, "version": entry["version"] if entry else None,
        "target_replicas": dep.target_num_replicas, "queue": queue,
        "queue_depth": depths.get(queue) if queue else None,
        "ongoing_requests": _sum_known(r["ongoing_requests"] for r in replicas),
        "autoscaling": dep.autoscaling.model_dump(mode="json") if dep.autoscaling else None,
        "pending_jobs": dep.pending_jobs,
        "replicas": replicas,
    }


def _replica(replica_id: str, record: ReplicaRecord, state: str, ongoing: int | None,
             nodes: dict[str, NodeRecord]) -> dict[str, Any]:
    node = record.get("node")
    return {"replica_id": replica_id, "state": state, "message": record.get("message", ""),
            "node": node, "host": nodes[node]["host"] if node in nodes else None,
            "version": record.get("version"), "pid": record.get("pid"),
            "start_time": record.get("start_time"), "ongoing_requests": ongoing}


def _sum_known(values: Iterable[int | None]) -> int | None:
    known = [value for value in values if value is not None]
    return sum(known) if known else None


def _routes(table: RouteTableRecord) -> dict[str, Any]:
    return {"version": table["version"], "routes": [
        {"prefix": prefix, "app": route["app"], "deployment": route["deployment"],
         "status": route["status"], "ready": route["ready"], "methods": route.get("methods"),
         "split": [{"app": t["app"], "weight": t["weight"]} for t in route.get("split", [])],
         "shadow": [{"app": t["app"], "fraction": t["fraction"]}
                    for t in route.get("shadow", [])]}
        for prefix, route in sorted(table["routes"].items())]}

