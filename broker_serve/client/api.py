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
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn

from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_after_delay, wait_fixed

from ..config import HTTPOptions, ProxyLocation, gRPCOptions
from ..context import _in_replica
from ..exceptions import BrokerServeError, DeployFailed
from ..runtime_env.cache import HostCache
from ..runtime_env.environment import upload
from ..schema import ApplicationStatus, ServeStatus, check_app_name, check_route_prefix
from ..state.apps import write_app
from ..state.records import AppRecord, AppStatusRecord, RouteTableRecord
from ..state.status import read_status
from .application import Application, Deployment
from .build import build_application, driver_paths
from .handle import DeploymentHandle
from .local_cluster import LocalCluster
from .runtime import Runtime, current_runtime, get_runtime, reset_runtime

log = logging.getLogger("broker_serve")

DEFAULT_APP_NAME = "default"
_DEFAULT_PREFIX = object()
POLL_S = 0.05
PROXY_ROUTES_TIMEOUT_S = 30.0

_local_cluster: LocalCluster | None = None
_started_apps: set[str] = set()
_cluster_lock = threading.Lock()


# cluster connection ------------------------------------------------------------------------------
def _connect(http_options: HTTPOptions | None = None, start_if_missing: bool = True,
             grpc_options: gRPCOptions | None = None) -> Runtime:
    """The runtime of a running cluster, starting a local one if none answers."""
    runtime = current_runtime() or get_runtime()
    runtime.refuse_unsupported("the cluster's control API (serve.start, serve.status, "
                               "Deployment.deploy, serve.run without _local_testing_mode)")
    if _in_replica():
        return runtime
    with _cluster_lock:
        if http_options is not None:
            runtime.run_sync(runtime.store.put_http_options(http_options))
        if grpc_options is not None:  # before a local cluster starts: its proxy reads them
            # The proxies import the servicer modules from where the driver's replicas do;
            # signed, as they import what it names ("Trust").
            runtime.run_sync(runtime.store.put_grpc_options(grpc_options, driver_paths(),
                                                            runtime.secret))
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
        http_options = runtime.run_sync(runtime.store.http_options())
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
    except BrokerServeError as exc:  # the cluster stops below, its apps with it
        log.warning("could not delete the applications of this script: %s", exc)
    cluster.stop()
    try:
        reset_runtime()
    except (BrokerServeError, TimeoutError) as exc:  # the process is leaving anyway
        log.warning("could not close the connections to the cluster: %s", exc)


# serve.start / run ------------------------------------------------------------------------------
def start(http_options: HTTPOptions | dict[str, Any] | None = None, *, detached: bool = True,
          proxy_location: Any = None,
          grpc_options: gRPCOptions | dict[str, Any] | None = None, **kwargs: Any) -> None:
    """Connect to (or start) a cluster with these HTTP and gRPC options.

    `proxy_location` (or `http_options["location"]`) says where proxies run: HeadOnly, the
    proxy of the cluster `serve.start` started (plus nodes started with `--proxy`); EveryNode,
    one on every worker node too; Disabled, none. `grpc_options` with servicer functions start
    a gRPC server in every proxy (docs/architecture.md, "gRPC ingress"). `detached` is accepted
    so Ray programs port: a cluster always outlives its drivers' connections.
    """
    options = (http_options if isinstance(http_options, HTTPOptions)
               else HTTPOptions.model_validate(http_options or {}))
    if proxy_location is not None:  # Ray 2.x's spelling of http_options["location"]
        options = options.model_copy(
            update={"location": HTTPOptions.model_validate({"location": proxy_location}).location})
    grpc = (grpc_options if isinstance(grpc_options, gRPCOptions) or grpc_options is None
            else gRPCOptions.model_validate(grpc_options))
    _connect(options, grpc_options=grpc)


def run(target: Application, *, blocking: bool = False, name: str = DEFAULT_APP_NAME,
        route_prefix: Any = _DEFAULT_PREFIX, logging_config: Any = None) -> DeploymentHandle:
    """Deploy an application and return a handle to its ingress deployment.

    `logging_config` is accepted so Ray programs port; logging is set per process with
    BROKER_SERVE_LOG_LEVEL. `serve.run(..., _local_testing_mode=True)` is served
    above this layer, in `local_testing/api.py`.
    """
    target, route_prefix = checked_target(target, name, route_prefix)
    runtime = _connect()
    record, specs = build_application(target, name, route_prefix, runtime.names, runtime.secret)
    try:
        _deploy_and_wait(runtime, record, specs)
    except _ControllerGone:
        # The controller this driver found (a dying one, say, of a script just killed) went
        # away: start a local cluster and deploy again, as if none had answered at first.
        if not _may_start_local_cluster():
            raise
        log.info("the controller of cluster %r went away; starting a local one",
                 runtime.settings.cluster)
        runtime = _connect()
        _deploy_and_wait(runtime, record, specs)
    _started_apps.add(name)
    handle = DeploymentHandle(record["ingress"], name)
    if blocking:
        _block_forever()
    return handle


def checked_target(target: Application | Deployment[Any], name: str,
                   route_prefix: Any) -> tuple[Application, str | None]:
    """What serve.run deploys: the application (a deployment bound without arguments) and
    its route prefix, both checked."""
    if isinstance(target, Deployment):
        target = target.bind()
    if not isinstance(target, Application):
        raise TypeError("serve.run expects an Application: call `.bind()` on your deployment")
    if route_prefix is _DEFAULT_PREFIX:
        route_prefix = target.deployment.route_prefix or "/"
    check_app_name(name)
    check_route_prefix(route_prefix)
    return target, route_prefix


class _ControllerGone(DeployFailed):
    """No controller leads any more while a deploy waits for one."""


def _deploy_and_wait(runtime: Runtime, record: AppRecord, specs: dict[str, bytes]) -> None:
    """Deploy from this (sync) thread; a deploy that hangs past its timeouts is DeployFailed."""
    timeout_s = runtime.settings.deploy_timeout_s + PROXY_ROUTES_TIMEOUT_S
    try:
        runtime.run_sync(_deploy(runtime, record, specs), timeout_s)
    except TimeoutError:
        raise DeployFailed(f"application {record['name']!r} was not deployed within "
                           f"{timeout_s:.0f}s") from None


def _poll(timeout_s: float, on_timeout: Callable[[RetryCallState], Any]) -> AsyncRetrying:
    """Calls a check every POLL_S until it returns True; after `timeout_s`, `on_timeout`."""
    return AsyncRetrying(stop=stop_after_delay(timeout_s), wait=wait_fixed(POLL_S),
                         retry=retry_if_result(lambda done: not done),
                         retry_error_callback=on_timeout)


async def _deploy(runtime: Runtime, record: AppRecord, specs: dict[str, bytes]) -> None:
    await upload(runtime.store, HostCache(runtime.settings.runtime_env_cache()), specs)
    await write_app(runtime.store, record, specs)
    await _wait_running(runtime, record)
    if record["route_prefix"] is not None:
        await _wait_proxies(runtime, record["name"], record["route_prefix"])
    runtime.forget_delivery(record["name"])


async def _wait_running(runtime: Runtime, record: AppRecord) -> None:
    """Wait for the status of this very deploy: a status an earlier deploy left (a killed run
    of the same script, say) may carry the same version and say RUNNING."""
    name = record["name"]
    timeout_s = runtime.settings.deploy_timeout_s
    store = runtime.store

    async def running() -> bool:
        status = await store.app_status(name)
        if status and _describes_deploy(status, record):
            if status["status"] == ApplicationStatus.RUNNING:
                return True
            if status["status"] == ApplicationStatus.DEPLOY_FAILED:
                raise DeployFailed(f"application {name!r} failed to deploy: {status['message']}")
        if await store.lease_holder() is None:
            await asyncio.sleep(1.0)
            if await store.lease_holder() is None:
                raise _ControllerGone("no controller is running for cluster "
                                      f"{runtime.settings.cluster!r}")
        return False

    def not_running(state: RetryCallState) -> NoReturn:
        raise DeployFailed(f"application {name!r} was not running after {timeout_s:.0f}s")

    await _poll(timeout_s, not_running)(running)


def _describes_deploy(status: AppStatusRecord, record: AppRecord) -> bool:
    """Whether an app status describes this record's deploy."""
    if "deploy_id" in status:
        return bool(status["deploy_id"] == record["deploy_id"])
    return bool(status.get("version") == record["version"])  # a controller of before deploy ids


async def _wait_proxies(runtime: Runtime, name: str, prefix: str | None) -> None:
    """Wait until every live proxy routes `prefix` to the app (or, with no prefix, routes
    nothing to it any more), so the next request sees the change."""
    def settled(table: RouteTableRecord) -> bool:
        if prefix is None:
            return all(route["app"] != name for route in table["routes"].values())
        route = table["routes"].get(prefix)
        return bool(route and route["app"] == name and route["ready"])

    await wait_for_proxies(runtime, settled, repr(name))


async def wait_for_proxies(runtime: Runtime, settled: Callable[[RouteTableRecord], bool],
                           what: str) -> None:
    """Wait until the route table is `settled` and every live proxy loaded it (or a later
    one); after PROXY_ROUTES_TIMEOUT_S, warn and return."""
    store, names = runtime.store, runtime.names

    async def seen() -> bool:
        table = await store.routes()
        if settled(table):
            proxies = await store.proxies()
            alive = await store.alive([names.proxy_alive(p) for p in proxies])
            versions = [p["routes_version"] for p, ok in zip(proxies.values(), alive) if ok]
            return all(v >= table["version"] for v in versions)
        return False

    def unseen(state: RetryCallState) -> None:
        log.warning("not every proxy saw the routes of %s change within %.0fs", what,
                    PROXY_ROUTES_TIMEOUT_S)

    await _poll(PROXY_ROUTES_TIMEOUT_S, unseen)(seen)


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

    async def removed() -> bool:
        store = runtime.store
        if await store.app_status(name) is None:
            await _wait_proxies(runtime, name, None)
            return True
        if await store.lease_holder() is None:
            # No controller to act on it now: the next one to lead will.
            log.warning("no controller is running; application %r is deleted from the "
                        "desired state and stops when a controller leads again", name)
            return True
        return False

    async def remove() -> None:
        store = runtime.store
        await store.delete_field(store.names.apps, name)
        await store.delete_field(store.names.app_builds, name)
        await store.announce("apps")
        if _blocking:  # a controller that does not act in time leaves it deleted later
            await _poll(runtime.settings.deploy_timeout_s, lambda state: None)(removed)

    runtime.run_sync(remove())
    _started_apps.discard(name)


def status() -> ServeStatus:
    runtime = _connect(start_if_missing=False)

    return runtime.run_sync(read_status(runtime.store))


def shutdown() -> None:
    """Delete every application. A local cluster this script started is stopped too.

    Raises ClusterUnavailable if Redis or RabbitMQ cannot be reached: the applications may
    still be running, so saying nothing would mislead.
    """
    runtime = current_runtime() or get_runtime()
    apps = runtime.run_sync(runtime.store.apps())
    for name in apps:
        delete(name)
    runtime.run_sync(_delete_all_traffic(runtime))
    _stop_local_cluster()


async def _delete_all_traffic(runtime: Runtime) -> None:
    """The traffic records go with the applications they route to."""
    names = list(await runtime.store.traffic())
    if names:
        await runtime.store.delete_traffic(*names)
        await runtime.store.announce("traffic")


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
