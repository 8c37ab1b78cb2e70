"""The functions behind `serve.run`, `serve.start`, `serve.status`, `serve.delete` and friends.

A driver writes an application's desired state to Redis (a JSON record plus one signed pickle
per deployment), announces it, and waits for the controller to report it RUNNING and for every
live proxy to have loaded its route. If no controller answers, the driver first starts a local
cluster as child processes that stop when the script exits, as Ray does; so does a driver whose
controller vanishes while it waits.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
from typing import Any

from ..config import HTTPOptions, ProxyLocation
from ..context import _in_replica
from ..exceptions import DeployFailed
from ..schema import ServeStatus, check_app_name, check_route_prefix
from ..state.apps import write_app
from ..state.status import read_status
from .application import Application, Deployment
from .build import build_application
from .handle import DeploymentHandle
from .local_cluster import LocalCluster
from .runtime import Runtime, current_runtime, get_runtime, reset_runtime

log = logging.getLogger("broker_serve")

DEFAULT_APP_NAME = "default"
_DEFAULT_PREFIX = object()
DEPLOY_TIMEOUT_S = float(os.environ.get("BROKER_SERVE_DEPLOY_TIMEOUT_S", "300"))

_local_cluster: LocalCluster | None = None
_started_apps: set[str] = set()
_cluster_lock = threading.Lock()


# cluster connection ------------------------------------------------------------------------------
def _connect(http_options: HTTPOptions | None = None, start_if_missing: bool = True) -> Runtime:
    """The runtime of a running cluster, starting a local one if none answers."""
    runtime = current_runtime() or get_runtime()
    if _in_replica():
        return runtime
    with _cluster_lock:
        if http_options is not None:
            runtime.run_sync(runtime.store.redis.set(
                runtime.names.http_options, http_options.model_dump_json()
            ))
        # A lease left by a controller that was killed on this machine does not count.
        leader = runtime.run_sync(runtime.store.lease_holder())
        if leader is None and _local_cluster is None and start_if_missing:
            _start_local_cluster(runtime, http_options)
    return runtime


def _may_start_local_cluster() -> bool:
    return _local_cluster is None and not _in_replica()


def _start_local_cluster(runtime: Runtime, http_options: HTTPOptions | None) -> None:
    global _local_cluster
    if http_options is None:
        stored = runtime.run_sync(runtime.store.redis.get(runtime.names.http_options))
        http_options = HTTPOptions.model_validate_json(stored) if stored else HTTPOptions()
    log.info("no broker-serve cluster %r answers; starting a local one", runtime.settings.cluster)
    cluster = LocalCluster(runtime.settings, http_options.host, http_options.port,
                           proxy=http_options.location != ProxyLocation.Disabled)
    cluster.start()
    _local_cluster = cluster
    atexit.register(_stop_local_cluster)


def _stop_local_cluster() -> None:
    """At exit of a script that started its own cluster: remove its apps and stop the cluster."""
    global _local_cluster
    cluster, _local_cluster = _local_cluster, None
    if cluster is None:
        return
    try:
        for name in list(_started_apps):
            delete(name, _blocking=False)
    except Exception:
        pass
    cluster.stop()
    try:
        reset_runtime()
    except Exception:
        pass


# serve.start / run ------------------------------------------------------------------------------
def start(http_options: HTTPOptions | dict[str, Any] | None = None, *, detached: bool = True,
          proxy_location: Any = None, grpc_options: Any = None, **kwargs: Any) -> None:
    """Connect to (or start) a cluster with these HTTP options.

    `proxy_location` (or `http_options["location"]`) says where proxies run: HeadOnly, the
    proxy of the cluster `serve.start` started (plus nodes started with `--proxy`); EveryNode,
    one on every worker node too; Disabled, none. `detached` and `grpc_options` are accepted so
    Ray programs port: a cluster always outlives its drivers' connections, and there is no gRPC
    proxy yet.
    """
    options = (http_options if isinstance(http_options, HTTPOptions)
               else HTTPOptions.model_validate(http_options or {}))
    if proxy_location is not None:  # Ray 2.x's spelling of http_options["location"]
        options = options.model_copy(
            update={"location": HTTPOptions.model_validate({"location": proxy_location}).location})
    _connect(options)


def run(target: Application, *, blocking: bool = False, name: str = DEFAULT_APP_NAME,
        route_prefix: Any = _DEFAULT_PREFIX, logging_config: Any = None,
        _local_testing_mode: bool = False) -> DeploymentHandle:
    """Deploy an application and return a handle to its ingress deployment.

    `logging_config` and `_local_testing_mode` are accepted so Ray programs port; logging is
    set per process with BROKER_SERVE_LOG_LEVEL.
    """
    if isinstance(target, Deployment):
        target = target.bind()
    if not isinstance(target, Application):
        raise TypeError("serve.run expects an Application: call `.bind()` on your deployment")
    if route_prefix is _DEFAULT_PREFIX:
        route_prefix = target.deployment.route_prefix or "/"
    check_app_name(name)
    check_route_prefix(route_prefix)
    runtime = _connect()
    record, specs = build_application(target, name, route_prefix, runtime.names, runtime.secret)
    try:
        runtime.run_sync(_deploy(runtime, record, specs), DEPLOY_TIMEOUT_S + 30)
    except _ControllerGone:
        # The controller this driver found (a dying one, say, of a script just killed) went
        # away: start a local cluster and deploy again, as if none had answered at first.
        if not _may_start_local_cluster():
            raise
        log.info("the controller of cluster %r went away; starting a local one",
                 runtime.settings.cluster)
        runtime = _connect()
        runtime.run_sync(_deploy(runtime, record, specs), DEPLOY_TIMEOUT_S + 30)
    _started_apps.add(name)
    handle = DeploymentHandle(record["ingress"], name)
    if blocking:
        _block_forever()
    return handle


class _ControllerGone(DeployFailed):
    """No controller leads any more while a deploy waits for one."""


async def _deploy(runtime: Runtime, record: dict[str, Any], specs: dict[str, bytes]) -> None:
    await write_app(runtime.store, record, specs)
    await _wait_running(runtime, record)
    if record["route_prefix"] is not None:
        await _wait_proxies(runtime, record["name"], record["route_prefix"])


async def _wait_running(runtime: Runtime, record: dict[str, Any]) -> None:
    """Wait for the status of this very deploy: a status an earlier deploy left (a killed run
    of the same script, say) may carry the same version and say RUNNING."""
    name = record["name"]
    deadline = time.monotonic() + DEPLOY_TIMEOUT_S
    store = runtime.store
    while time.monotonic() < deadline:
        status = await store.get_one(store.names.key("app_status"), name)
        if status and _describes_deploy(status, record):
            if status["status"] == "RUNNING":
                return
            if status["status"] == "DEPLOY_FAILED":
                raise DeployFailed(f"application {name!r} failed to deploy: {status['message']}")
        if await store.lease_holder() is None:
            await asyncio.sleep(1.0)
            if await store.lease_holder() is None:
                raise _ControllerGone("no controller is running for cluster "
                                      f"{runtime.settings.cluster!r}")
        await asyncio.sleep(0.05)
    raise DeployFailed(f"application {name!r} was not running after {DEPLOY_TIMEOUT_S:.0f}s")


def _describes_deploy(status: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether an app status describes this record's deploy."""
    if "deploy_id" in status:
        return bool(status["deploy_id"] == record["deploy_id"])
    return bool(status.get("version") == record["version"])  # a controller of before deploy ids


async def _wait_proxies(runtime: Runtime, name: str, prefix: str | None) -> None:
    """Wait until every live proxy routes `prefix` to the app (or, with no prefix, routes
    nothing to it any more), so the next request sees the change."""
    store, names = runtime.store, runtime.names
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        table = await store.routes()
        if prefix is None:
            settled = all(route["app"] != name for route in table["routes"].values())
        else:
            route = table["routes"].get(prefix)
            settled = bool(route and route["app"] == name and route["ready"])
        if settled:
            proxies = await store.get_all(names.proxies)
            alive = await store.alive([names.proxy_alive(p) for p in proxies])
            versions = [p["routes_version"] for p, ok in zip(proxies.values(), alive) if ok]
            if all(v >= table["version"] for v in versions):
                return
        await asyncio.sleep(0.05)
    log.warning("not every proxy saw the routes of %r change within 30s", name)


def _block_forever() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


# the rest of the API ----------------------------------------------------------------------------
def delete(name: str, _blocking: bool = True) -> None:
    """Delete an application: its replicas stop and its route goes away."""
    runtime = _connect(start_if_missing=False)

    async def remove() -> None:
        store = runtime.store
        await store.delete_field(store.names.apps, name)
        await store.delete_field(store.names.app_builds, name)
        await store.announce("apps")
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while _blocking and time.monotonic() < deadline:
            if await store.get_one(store.names.key("app_status"), name) is None:
                await _wait_proxies(runtime, name, None)
                return
            if await store.lease_holder() is None:
                # No controller to act on it now: the next one to lead will.
                log.warning("no controller is running; application %r is deleted from the "
                            "desired state and stops when a controller leads again", name)
                return
            await asyncio.sleep(0.05)

    runtime.run_sync(remove())
    _started_apps.discard(name)


def status() -> ServeStatus:
    runtime = _connect(start_if_missing=False)

    return runtime.run_sync(read_status(runtime.store))


def shutdown() -> None:
    """Delete every application. A local cluster this script started is stopped too."""
    runtime = current_runtime()
    if runtime is None:
        try:
            runtime = get_runtime()
        except Exception:
            return
    apps = runtime.run_sync(runtime.store.apps())
    for name in apps:
        delete(name)
    _stop_local_cluster()


def get_app_handle(name: str) -> DeploymentHandle:
    runtime = current_runtime() or get_runtime()

    if runtime.in_loop_thread():
        # Inside a replica (a constructor or a method) no blocking lookup is allowed: the
        # handle finds the app's ingress on its first call.
        return DeploymentHandle(None, name)
    return DeploymentHandle(runtime.run_sync(runtime.ingress_of(name)), name)


def get_deployment_handle(deployment_name: str, app_name: str | None = None) -> DeploymentHandle:
    if app_name is None:
        from ..context import get_replica_context

        app_name = get_replica_context().app_name if _in_replica() else DEFAULT_APP_NAME
    return DeploymentHandle(deployment_name, app_name)
