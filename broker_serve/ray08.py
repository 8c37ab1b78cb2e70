"""Ray Serve 0.8's API: endpoints, backends and the traffic split between them (seed 003).

A 0.8 program runs with `import ray.serve as serve` changed to `from broker_serve import serve`
and `ray.get(ref)` to `ref.result()`. What each call becomes (docs/architecture.md, "Ray Serve
0.8's API"):

- **A backend is an application named by its tag** (`backend_app_name`: ':' and the other
  characters an application or queue name cannot hold are escaped, so "echo:v1" is
  "echo+3Av1"),
  deployed with no route prefix through `serve.run`. Its one deployment runs
  `replica.backend.Backend` around the user's function or class, which gives it 0.8's calling
  convention and `@serve.accept_batch`.
- **Its BackendConfig** maps to the deployment's options: `num_replicas` as such, the resources
  to `ray_actor_options`, and the serve-side fields (`max_batch_size`) to its `user_config`,
  which running replicas take through `reconfigure()`. So `set_backend_config` changes
  `num_replicas` and `max_batch_size` without a restart; a change of resources starts new
  replicas, as 0.8 restarted them.
- **An endpoint is a traffic record** (`serve.set_traffic`): its name, route, methods and
  split. `split` and `link` rewrite the split; the proxies route the next request by it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt

from .client.api import run, start
from .client.application import Deployment
from .client.build import pickle_user_module_by_value
from .client.deployed import read_deployed
from .client.handle import DeploymentHandle
from .client.runtime import Runtime, current_runtime, get_runtime
from .client.stats import set_history_window
from .client.traffic import TrafficHandle, get_traffic, set_traffic
from .config import DeploymentConfig, ProxyLocation, user_config_hash
from .exceptions import DeployFailed, RayServeException
from .replica.backend import Backend, accepts_batch
from .schema import WEIGHT_TOLERANCE, ApplicationStatus
from .state.apps import app_version, write_app
from .state.records import AppRecord, DeploymentEntry

__all__ = [
    "BackendConfig", "RoutePolicy", "backend_app_name", "backend_tag", "create_backend",
    "create_endpoint", "get_backend_config", "get_handle", "init", "link", "route",
    "set_backend_config", "split",
]

log = logging.getLogger("broker_serve")

# A backend's replicas take this many requests at once, Ray 1.x's max_concurrent_queries
# default: 0.8 bounded nothing per replica, and a batch can be no bigger than this.
BACKEND_MAX_ONGOING = 100
POLL_S = 0.05

# What a backend's application name keeps of its tag: the characters valid in an application
# name (schema.check_app_name), in queue names (AMQP's "a-zA-Z0-9-_.:@#,/+ ") and in a REST
# path. Each other character's UTF-8 bytes become "+XX" ('+' itself too), so "echo:v1" is
# "echo+3Av1".
_KEPT = re.compile(r"[A-Za-z0-9_.,@-]")
_ESCAPE = re.compile(r"(?:\+[0-9A-F]{2})+")


# names ----------------------------------------------------------------------------------------
def backend_app_name(tag: str) -> str:
    """The application that is backend `tag`: a valid name, which `backend_tag` reverses."""
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"a backend tag must be a non-empty string, got {tag!r}")
    return "".join(char if _KEPT.fullmatch(char) else
                   "".join(f"+{byte:02X}" for byte in char.encode()) for char in tag)


def backend_tag(app_name: str) -> str:
    return _ESCAPE.sub(lambda match: bytes.fromhex(match.group().replace("+", "")).decode(),
                       app_name)


# configuration --------------------------------------------------------------------------------
class RoutePolicy(enum.Enum):
    """0.8's policies for choosing among an endpoint's backends. Accepted by `serve.init`;
    broker-serve always chooses by the split's weights (docs/architecture.md)."""

    Random = "Random"
    RoundRobin = "RoundRobin"
    PowerOfTwo = "PowerOfTwo"
    FixedPacking = "FixedPacking"


class BackendConfig(BaseModel):
    """A backend's properties, with 0.8's fields. Assigning a field checks it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_replicas: PositiveInt = 1
    max_batch_size: PositiveInt | None = Field(default=None, le=BACKEND_MAX_ONGOING)
    resources: dict[str, NonNegativeFloat] | None = None
    num_cpus: NonNegativeFloat | None = None
    num_gpus: NonNegativeFloat | None = None
    memory: NonNegativeFloat | None = None
    object_store_memory: NonNegativeFloat | None = None  # kept; there is no object store
    # Set by create_backend: whether the code is @serve.accept_batch.
    has_accept_batch_annotation: bool = False


_RESOURCE_FIELDS = ("resources", "num_cpus", "num_gpus", "memory", "object_store_memory")
_BATCH_NOT_ACCEPTED = (
    "max_batch_size is set in config but the function or method does not accept batching. "
    "Please use @serve.accept_batch to explicitly mark the function or method as batchable "
    "and takes in list as arguments.")


def _deployment_options(config: BackendConfig) -> dict[str, Any]:
    """The deployment options a backend config maps to."""
    actor = {name: value for name in _RESOURCE_FIELDS
             if (value := getattr(config, name)) is not None}
    return {
        "num_replicas": config.num_replicas,
        "max_ongoing_requests": BACKEND_MAX_ONGOING,
        "ray_actor_options": actor,
        # What Backend.reconfigure() reads; has_accept_batch_annotation, so it reads back.
        "user_config": {"max_batch_size": config.max_batch_size,
                        "has_accept_batch_annotation": config.has_accept_batch_annotation},
    }


# serve.init -----------------------------------------------------------------------------------
def init(kv_store_connector: Any = None, kv_store_path: Any = None, blocking: bool = False,
         start_server: bool = True, http_host: str | None = None, http_port: int | None = None,
         ray_init_kwargs: Any = None, gc_window_seconds: float = 3600,
         queueing_policy: RoutePolicy | str = RoutePolicy.Random,
         policy_kwargs: Mapping[str, Any] | None = None) -> None:
    """Connect to the cluster, or start a local one, as 0.8's `serve.init` started Serve.

    `http_host` and `http_port` (default: BROKER_SERVE_HTTP_HOST / _PORT, else 127.0.0.1:8000)
    set the proxy, `start_server=False` runs none, and `gc_window_seconds` is how long the
    cluster keeps metrics history for `serve.stat`. The state lives in Redis, so the
    key-value store arguments and `ray_init_kwargs` are accepted and unused; `serve.init`
    returns once the cluster answers, whatever `blocking` says.
    """
    policy = _route_policy(queueing_policy)
    if policy is not RoutePolicy.Random or policy_kwargs:
        log.warning("queueing_policy %s%s: broker-serve chooses each request's backend by the "
                    "split's weights (RoutePolicy.Random), and the broker gives it to a "
                    "replica with a free slot", policy.name,
                    f" with {dict(policy_kwargs)}" if policy_kwargs else "")
    options: dict[str, Any] = {}
    if http_host is not None:
        options["host"] = http_host
    if http_port is not None:
        options["port"] = http_port
    start(http_options=options,
          proxy_location=ProxyLocation.HeadOnly if start_server else ProxyLocation.Disabled)
    set_history_window(gc_window_seconds)


def _route_policy(value: RoutePolicy | str) -> RoutePolicy:
    if isinstance(value, RoutePolicy):
        return value
    try:
        return RoutePolicy[str(value)]
    except KeyError:
        raise ValueError(f"queueing_policy must be one of {[p.name for p in RoutePolicy]}, "
                         f"got {value!r}") from None


# endpoints ------------------------------------------------------------------------------------
def create_endpoint(endpoint_name: str, route: str | None = None,
                    methods: Sequence[str] = ("GET",)) -> None:
    """An endpoint: HTTP requests to `route` (None: handles only) with one of `methods` (others
    get 405) go to the backends `link` or `split` give it; until then its route answers 503.
    Creating an endpoint again changes its route and methods and keeps its split."""
    if isinstance(methods, str):
        raise TypeError(f"methods must be a list of HTTP methods, got {methods!r}")
    _cluster()
    current = get_traffic(endpoint_name)
    set_traffic(route, current["split"] if current else {},
                shadow=current["shadow"] if current else None, name=endpoint_name,
                methods=[str(method).upper() for method in methods])


def link(endpoint_name: str, backend_tag: str) -> None:
    """Send all of the endpoint's traffic to one backend: `split(endpoint, {backend: 1.0})`."""
    split(endpoint_name, {backend_tag: 1.0})


def split(endpoint_name: str, traffic_policy_dictionary: Mapping[str, float]) -> None:
    """Split the endpoint's requests between backends by weight; the weights must sum to 1.
    The next request is routed by the new split."""
    endpoint = _endpoint(endpoint_name)
    if not isinstance(traffic_policy_dictionary, Mapping) or not traffic_policy_dictionary:
        raise ValueError("the traffic policy must be a non-empty dict of backend tag to weight, "
                         f"got {traffic_policy_dictionary!r}")
    for tag, weight in traffic_policy_dictionary.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
            raise ValueError(f"the weight of backend {tag!r} must be a number greater than 0, "
                             f"got {weight!r}")
    total = sum(traffic_policy_dictionary.values())
    if abs(total - 1) > WEIGHT_TOLERANCE:
        raise ValueError(f"the weights of endpoint {endpoint_name!r}'s split must sum to 1, "
                         f"they sum to {total:g}: {dict(traffic_policy_dictionary)}")
    runtime = _cluster()
    apps = runtime.run_sync(runtime.store.apps())
    weights = {}
    for tag, weight in traffic_policy_dictionary.items():
        app = backend_app_name(tag)
        _backend_entry(apps.get(app), tag)  # raises if it is no backend
        weights[app] = float(weight)
    set_traffic(endpoint["route_prefix"], weights, shadow=endpoint["shadow"],
                name=endpoint_name, methods=endpoint["methods"])


def _endpoint(name: str) -> dict[str, Any]:
    record = get_traffic(name)
    if record is None:
        raise RayServeException(f"endpoint {name!r} is not registered: create it with "
                                "serve.create_endpoint first")
    return record


def get_handle(endpoint_name: str, relative_slo_ms: float | None = None,
               absolute_slo_ms: float | None = None, missing_ok: bool = False, *,
               sync: bool | None = None) -> TrafficHandle | DeploymentHandle:
    """A handle to an endpoint: each call goes to one of its backends, chosen by weight, with
    the call's keyword arguments; `relative_slo_ms` / `absolute_slo_ms` give its calls a
    deadline. `missing_ok` skips the check that the endpoint exists.

    Ray 1.x's `serve.get_handle(deployment_name)` works too: a name that is no endpoint but an
    application (one deployed with `.deploy()`) gives a handle to its ingress deployment.
    `sync` is accepted: the handle serves sync and async callers alike.
    """
    slos = (("relative_slo_ms", relative_slo_ms), ("absolute_slo_ms", absolute_slo_ms))
    deadlines: dict[str, Any] = {name: value for name, value in slos if value is not None}
    if not missing_ok and get_traffic(endpoint_name) is None:
        runtime = _runtime()
        record = runtime.run_sync(runtime.store.app(endpoint_name))
        if record is None:
            raise RayServeException(f"there is no endpoint (nor deployment) named "
                                    f"{endpoint_name!r}")
        deployment = DeploymentHandle(record["ingress"], endpoint_name)
        return deployment.options(**deadlines) if deadlines else deployment
    handle = TrafficHandle(endpoint_name)
    return handle.options(**deadlines) if deadlines else handle


# backends -------------------------------------------------------------------------------------
def create_backend(func_or_class: Any, backend_tag: str, *actor_init_args: Any,
                   backend_config: BackendConfig | Mapping[str, Any] | None = None) -> None:
    """Deploy a backend: a function, or a class (constructed with `actor_init_args`) whose
    `__call__` serves. Returns once its replicas run. Creating a backend again replaces it."""
    if not callable(func_or_class):
        raise TypeError(f"Backend must be a function or class, it is {type(func_or_class)}.")
    config = _backend_config(backend_config)
    _cluster()
    batches = accepts_batch(func_or_class)
    if config.max_batch_size is not None and not batches:
        raise RayServeException(_BATCH_NOT_ACCEPTED)
    config.has_accept_batch_annotation = batches
    pickle_user_module_by_value(func_or_class)  # the user's module travels with it
    deployment: Deployment[Backend] = Deployment(
        Backend, _deployment_name(func_or_class),
        DeploymentConfig.model_validate(_deployment_options(config)))
    run(deployment.bind(func_or_class, *actor_init_args), name=backend_app_name(backend_tag),
        route_prefix=None)


def _deployment_name(func_or_class: Any) -> str:
    """The function's (or class's) name, as far as a deployment and queue name can hold it."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", str(getattr(func_or_class, "__name__", "")))
    return name.strip("_") or "backend"


def _backend_config(value: BackendConfig | Mapping[str, Any] | None) -> BackendConfig:
    if value is None:
        return BackendConfig()
    if isinstance(value, BackendConfig):
        return value.model_copy()
    if isinstance(value, Mapping):
        return BackendConfig.model_validate(dict(value))
    raise TypeError(f"backend_config must be a BackendConfig (or a dict), got {value!r}")


def get_backend_config(backend_tag: str) -> BackendConfig:
    """The backend's config as it runs now."""
    runtime = _runtime()
    record = runtime.run_sync(runtime.store.app(backend_app_name(backend_tag)))
    return _read_config(record, backend_tag)


def _read_config(record: AppRecord | None, tag: str) -> BackendConfig:
    config = _backend_entry(record, tag)["config"]
    actor = config.get("ray_actor_options") or {}
    user = config["user_config"]
    return BackendConfig(
        num_replicas=config["num_replicas"], max_batch_size=user["max_batch_size"],
        has_accept_batch_annotation=user["has_accept_batch_annotation"],
        **{name: actor[name] for name in _RESOURCE_FIELDS if name in actor})


def _backend_entry(record: AppRecord | None, tag: str) -> DeploymentEntry:
    """The deployment entry of backend `tag`; raises if there is no such backend."""
    entry = record["deployments"].get(record["ingress"]) if record else None
    user = entry["config"].get("user_config") if entry else None
    if entry is None or not isinstance(user, dict) or "has_accept_batch_annotation" not in user:
        raise RayServeException(f"backend {tag!r} is not registered: create it with "
                                "serve.create_backend first")
    return entry


def set_backend_config(backend_tag: str, backend_config: BackendConfig | Mapping[str, Any]
                       ) -> None:
    """Apply a backend config; returns once the backend runs by it. `num_replicas` and
    `max_batch_size` apply to the running replicas, without a restart; a change of the
    resources replaces the replicas, as in Ray Serve 0.8."""
    config = _backend_config(backend_config)
    app = backend_app_name(backend_tag)
    runtime = _cluster()
    record = runtime.run_sync(runtime.store.app(app))
    current = _read_config(record, backend_tag)
    assert record is not None
    if config.max_batch_size is not None and not current.has_accept_batch_annotation:
        raise RayServeException(_BATCH_NOT_ACCEPTED)
    config.has_accept_batch_annotation = current.has_accept_batch_annotation
    options = _deployment_options(config)
    if any(getattr(config, name) != getattr(current, name) for name in _RESOURCE_FIELDS):
        _redeploy(app, record["ingress"], options, backend_tag)
    else:
        runtime.run_sync(_apply_live(runtime, record, options))


def _redeploy(app: str, deployment: str, options: dict[str, Any], tag: str) -> None:
    """Deploy the backend again from its stored definition, with new options."""
    deployed = read_deployed(app, deployment)
    if deployed is None:
        raise RayServeException(f"backend {tag!r} was deleted meanwhile")
    config = DeploymentConfig.model_validate({**deployed.config.model_dump(), **options})
    again: Deployment[Any] = Deployment(deployed.func_or_class, deployment, config)
    run(again.bind(*deployed.init_args, **deployed.init_kwargs), name=app, route_prefix=None)


async def _apply_live(runtime: Runtime, record: AppRecord, options: dict[str, Any]) -> None:
    """Change live options in the app record (its spec, so its replicas, stay) and wait
    until the controller reports the backend running by them."""
    entry = record["deployments"][record["ingress"]]
    entry["config"].update({name: options[name] for name in ("num_replicas", "user_config")})
    entry["num_replicas"] = options["num_replicas"]
    entry["user_config_hash"] = user_config_hash(options["user_config"])
    record["version"] = app_version(record["route_prefix"], record["deployments"])
    await write_app(runtime.store, record, {})
    await _wait_running(runtime, record)


async def _wait_running(runtime: Runtime, record: AppRecord) -> None:
    name, timeout_s = record["name"], runtime.settings.deploy_timeout_s
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = await runtime.store.app_status(name)
        if status is not None and status.get("deploy_id") == record.get("deploy_id"):
            if status["status"] == ApplicationStatus.RUNNING:
                return
            if status["status"] == ApplicationStatus.DEPLOY_FAILED:
                raise DeployFailed(f"backend {backend_tag(name)!r} failed to apply its "
                                   f"config: {status['message']}")
        await asyncio.sleep(POLL_S)
    raise DeployFailed(f"backend {backend_tag(name)!r} did not apply its config within "
                       f"{timeout_s:.0f}s")


# @serve.route ---------------------------------------------------------------------------------
class route:  # Ray 0.8's name: a decorator class in lower case
    """`@serve.route("/path")`: make the function (or class) a backend `"<name>:v0"` and an
    endpoint `<name>` at `/path` linked to it, and return the endpoint's handle."""

    def __init__(self, url_route: str) -> None:
        self.route = url_route

    def __call__(self, func_or_class: Callable[..., Any]) -> TrafficHandle | DeploymentHandle:
        name = func_or_class.__name__
        tag = f"{name}:v0"
        create_backend(func_or_class, tag)
        create_endpoint(name, self.route)
        link(name, tag)
        return get_handle(name)


def _runtime() -> Runtime:
    return current_runtime() or get_runtime()


def _cluster() -> Runtime:
    """The runtime of a running cluster. A 0.8 program calls `serve.init` first; a call that
    changes the cluster before any controller leads it would wait for nobody."""
    runtime = _runtime()
    if runtime.run_sync(runtime.store.lease_holder()) is None:
        raise RayServeException("no broker-serve cluster is running: call serve.init() (or "
                                "serve.start()) first, as Ray Serve 0.8 asked")
    return runtime
