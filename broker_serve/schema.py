"""Config, status and detail schemas, with Ray Serve's names and fields (`ray.serve.schema`).

Config schemas, what a config file and `PUT /api/serve/applications/` hold:

    ServeDeploySchema
     ├── HTTPOptionsSchema, gRPCOptionsSchema
     ├── TrafficSchema                 broker-serve's: weighted splits and shadows of a route
     └── ServeApplicationSchema        (alone: the V1 single-application config)
          └── DeploymentSchema          per-deployment overrides of the options in code
               └── RayActorOptionsSchema

A field a config leaves out stays unset (`model_fields_set`): only the options it names override
the code's, and a stored config dumps back as it was written (`exclude_unset=True`).

Response schemas: `ServeStatusSchema` (V1), `ServeInstanceDetails` → `ApplicationDetails` →
`DeploymentDetails` → `ReplicaDetails` (V2), and `ServeStatus`, what `serve.status()` returns and
`broker-serve status` prints.
"""

from __future__ import annotations

import enum
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    field_serializer,
    field_validator,
    model_validator,
)

from .config import AutoscalingConfig, JobConfig, ProxyLocation

__all__ = [
    "ApplicationDetails",
    "ApplicationStatus",
    "ApplicationStatusInfo",
    "ApplicationStatusOverview",
    "AutoscalingState",
    "DeploymentDetails",
    "DeploymentSchema",
    "DeploymentStatus",
    "DeploymentStatusInfo",
    "DeploymentStatusOverview",
    "HTTPOptionsSchema",
    "ProxyDetails",
    "ProxyStatus",
    "RayActorOptionsSchema",
    "ReplicaDetails",
    "ReplicaState",
    "ServeActorDetails",
    "ServeApplicationSchema",
    "ServeDeploySchema",
    "ServeInstanceDetails",
    "ServeStatus",
    "ServeStatusSchema",
    "TrafficSchema",
    "gRPCOptionsSchema",
]


# statuses --------------------------------------------------------------------------------------
# What an AMQP queue name may hold, as the AMQP client checks it (pamqp), less ':', which would
# blur Redis key patterns, and the space. An application's name is part of its queues' names.
_APP_NAME = re.compile(r"[A-Za-z0-9_\-.@#,/+]+")


# A request queue is `bs.<cluster>.<app>.<deployment>`; these first words name a process's
# own queues (`bs.<cluster>.reply.<id>`, ...), which the per-role RabbitMQ permissions grant by
# prefix (protocol/permissions.py): an application so named would have its queues granted too.
RESERVED_APP_WORDS = frozenset({"reply", "inbox", "cancels", "affinity"})


def check_app_name(name: str) -> None:
    if not isinstance(name, str) or not _APP_NAME.fullmatch(name):
        raise ValueError(f"invalid application name {name!r}: use letters, digits and "
                         "'_-.@#,/+' only")
    if name.split(".", 1)[0] in RESERVED_APP_WORDS:
        raise ValueError(f"invalid application name {name!r}: {name.split('.', 1)[0]!r} (before "
                         f"any '.') names a process's own queues; reserved: "
                         f"{', '.join(sorted(RESERVED_APP_WORDS))}")


def check_route_prefix(prefix: str | None) -> None:
    if prefix is None:
        return
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise ValueError(f"route_prefix must start with '/', got {prefix!r}")
    if prefix != "/" and prefix.endswith("/"):
        raise ValueError(f"route_prefix must not end with '/', got {prefix!r}")
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"route_prefix may not contain wildcards, got {prefix!r}")


# HTTP methods are tokens (RFC 9110): letters, digits and a few marks.
_METHOD = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~")
# Weights are floats: 0.1 + 0.2 + 0.7 is not exactly 1.
WEIGHT_TOLERANCE = 1e-6


def check_traffic(name: str, split: Mapping[str, float], shadow: Mapping[str, float],
                  methods: list[str] | None) -> list[str] | None:
    """Check a traffic record's parts (docs/architecture.md, "Traffic policy") and return its
    methods upper-cased, without repeats. Raises ValueError saying what is wrong, for a wrong
    type too: pydantic's validators turn only ValueError into a validation error."""
    if not isinstance(name, str) or not name or any(c in name for c in "* \t\n"):
        raise ValueError(f"invalid traffic name {name!r}: no '*' or whitespace")
    for kind, parts in (("split", split), ("shadow", shadow)):
        if not isinstance(parts, Mapping):
            raise ValueError(  # noqa: TRY004
                f"{kind} must be a dict of application name to number, got {parts!r}")
        for app, value in parts.items():
            check_app_name(app)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(  # noqa: TRY004
                    f"the {kind} of {app!r} must be a number, got {value!r}")
    bad = sorted(app for app, weight in split.items() if not weight > 0)
    if bad:
        raise ValueError(f"split weights must be greater than 0; {bad} are not")
    total = sum(split.values())
    if split and abs(total - 1) > WEIGHT_TOLERANCE:
        raise ValueError(f"split weights must sum to 1, got {total:g} for {dict(split)}")
    bad = sorted(app for app, fraction in shadow.items() if not 0 < fraction <= 1)
    if bad:
        raise ValueError(f"shadow fractions must be in (0, 1]; {bad} are not")
    return _check_methods(methods)


def _check_methods(methods: list[str] | None) -> list[str] | None:
    if methods is None:
        return None
    if isinstance(methods, str) or not methods:
        raise ValueError(f"methods must be a non-empty list of HTTP methods, got {methods!r}")
    upper: list[str] = []
    for method in methods:
        if not isinstance(method, str) or not method or not set(method.upper()) <= _METHOD:
            raise ValueError(f"{method!r} is not an HTTP method")
        if method.upper() not in upper:
            upper.append(method.upper())
    return upper


class ApplicationStatus(str, enum.Enum):
    NOT_STARTED = "NOT_STARTED"
    DEPLOYING = "DEPLOYING"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    RUNNING = "RUNNING"
    UNHEALTHY = "UNHEALTHY"
    DELETING = "DELETING"


class DeploymentStatus(str, enum.Enum):
    UPDATING = "UPDATING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DEPLOY_FAILED = "DEPLOY_FAILED"
    UPSCALING = "UPSCALING"
    DOWNSCALING = "DOWNSCALING"


class ReplicaState(str, enum.Enum):
    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"


class ProxyStatus(str, enum.Enum):
    STARTING = "STARTING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"


# config schemas -------------------------------------------------------------------------------
class RayActorOptionsSchema(BaseModel):
    """Ray's per-replica actor options. `num_cpus`, `num_gpus`, `memory` and `resources` are
    what a replica needs from the worker node it is placed on; the rest are accepted so that
    configs port."""

    model_config = ConfigDict(extra="forbid")

    runtime_env: dict[str, Any] = Field(default_factory=dict)
    num_cpus: NonNegativeFloat | None = None
    num_gpus: NonNegativeFloat | None = None
    memory: NonNegativeFloat | None = None
    object_store_memory: NonNegativeFloat | None = None
    resources: dict[str, float] = Field(default_factory=dict)
    accelerator_type: str | None = None


# Ray's fields that have no counterpart here: accepted, and not passed to the deployment.
_IGNORED_OPTIONS = frozenset({"placement_group_bundles", "placement_group_strategy",
                              "max_replicas_per_node", "logging_config"})
# Options for which an explicit null means something; any other null means "as in the code".
_NULLABLE_OPTIONS = frozenset({"num_replicas", "user_config", "autoscaling_config"})


class DeploymentSchema(BaseModel):
    """Overrides of one deployment's options, found by its name in the application."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    num_replicas: PositiveInt | Literal["auto"] | None = None
    max_ongoing_requests: PositiveInt | None = None
    max_concurrent_queries: PositiveInt | None = None  # the name before Ray 2.7
    max_queued_requests: int | None = Field(default=None, ge=-1)
    order_by_deadline: bool | None = None  # broker-serve's: SLO ordering (architecture.md)
    queue_type: Literal["classic", "quorum"] | None = None  # broker-serve's: "Durable mode"
    job_config: JobConfig | None = None  # broker-serve's: "Jobs"
    user_config: Any = None
    autoscaling_config: AutoscalingConfig | None = None
    graceful_shutdown_wait_loop_s: NonNegativeFloat | None = None
    graceful_shutdown_timeout_s: NonNegativeFloat | None = None
    health_check_period_s: PositiveFloat | None = None
    health_check_timeout_s: PositiveFloat | None = None
    ray_actor_options: RayActorOptionsSchema | None = None
    resources: dict[str, NonNegativeFloat] | None = None  # broker-serve's plainer spelling
    placement_group_bundles: list[dict[str, float]] | None = None
    placement_group_strategy: str | None = None
    max_replicas_per_node: PositiveInt | None = None
    logging_config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> DeploymentSchema:
        if isinstance(self.num_replicas, int) and self.autoscaling_config is not None:
            raise ValueError("num_replicas and autoscaling_config are exclusive: set "
                             "num_replicas to 'auto' or leave it out")
        return self

    def options(self) -> dict[str, Any]:
        """What this schema sets, as keyword arguments of `Deployment.options()`."""
        options = self.model_dump(mode="json", exclude_unset=True, exclude={"name"})
        return {key: value for key, value in options.items()
                if key not in _IGNORED_OPTIONS
                and (value is not None or key in _NULLABLE_OPTIONS)}


class ServeApplicationSchema(BaseModel):
    """One application: where its code is, and how to change what the code says.

    `import_path` is `module:attribute` or `module.attribute`, naming an Application, a
    Deployment, or a builder function that gets `args`. `runtime_env` may hold a local
    `working_dir` to import from. `host` and `port` are the deprecated single-application
    fields: accepted, and unused.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "default"
    route_prefix: str | None = "/"
    import_path: str = Field(pattern=r"^[A-Za-z_][\w.]*([:.][\w.]+)$")
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    deployments: list[DeploymentSchema] = Field(default_factory=list)
    args: dict[str, Any] = Field(default_factory=dict)
    logging_config: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:

        check_app_name(value)
        return value

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix(cls, value: str | None) -> str | None:

        check_route_prefix(value)
        return value

    @field_validator("deployments")
    @classmethod
    def _unique_deployments(cls, value: list[DeploymentSchema]) -> list[DeploymentSchema]:
        names = [d.name for d in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"deployment names must be unique; repeated: {duplicates}")
        return value


class HTTPOptionsSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    root_path: str = ""
    request_timeout_s: PositiveFloat | None = None
    keep_alive_timeout_s: NonNegativeFloat = 5
    # broker-serve's limits on what clients send (docs/architecture.md, "Limits on untrusted
    # input"), as in config.HTTPOptions.
    max_header_count: PositiveInt = 100
    max_header_bytes: PositiveInt = 64 * 1024
    max_websocket_message_bytes: PositiveInt = 16 * 1024 * 1024
    max_inflight_requests: PositiveInt = 10_000


class gRPCOptionsSchema(BaseModel):  # Ray's name
    model_config = ConfigDict(extra="forbid")

    port: int = Field(default=9000, ge=0, le=65535)
    grpc_servicer_functions: list[str] = Field(default_factory=list)
    request_timeout_s: PositiveFloat | None = None


class TrafficSchema(BaseModel):
    """A traffic record: who serves one route prefix (or handle-only endpoint) by weight, and
    who gets a copy of a fraction of its requests (docs/architecture.md, "Traffic policy")."""

    model_config = ConfigDict(extra="forbid")

    name: str
    route_prefix: str | None = None
    methods: list[str] | None = None
    split: dict[str, float] = Field(default_factory=dict)
    shadow: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _checked(self) -> TrafficSchema:
        check_route_prefix(self.route_prefix)
        self.methods = check_traffic(self.name, self.split, self.shadow, self.methods)
        return self

    def targets(self) -> set[str]:
        """The applications it names."""
        return set(self.split) | set(self.shadow)


class ServeDeploySchema(BaseModel):
    """A multi-application config: the whole desired state of the cluster's applications,
    and (`traffic`, broker-serve's) the traffic records of its route prefixes."""

    model_config = ConfigDict(extra="forbid")

    proxy_location: ProxyLocation = ProxyLocation.EveryNode
    http_options: HTTPOptionsSchema = Field(default_factory=HTTPOptionsSchema)
    grpc_options: gRPCOptionsSchema = Field(default_factory=gRPCOptionsSchema)
    logging_config: dict[str, Any] | None = None
    applications: list[ServeApplicationSchema]
    target_capacity: float | None = Field(default=None, ge=0, le=100)
    traffic: list[TrafficSchema] = Field(default_factory=list)

    @field_validator("applications")
    @classmethod
    def _unique(cls, value: list[ServeApplicationSchema]) -> list[ServeApplicationSchema]:
        names = [app.name for app in value]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"application names must be unique; repeated: {duplicates}")
        prefixes = [app.route_prefix for app in value if app.route_prefix is not None]
        duplicates = sorted({p for p in prefixes if prefixes.count(p) > 1})
        if duplicates:
            raise ValueError(f"route prefixes must be unique; repeated: {duplicates}")
        return value

    @model_validator(mode="after")
    def _traffic_names_its_applications(self) -> ServeDeploySchema:
        """A config replaces the cluster's applications, so its traffic may name only its
        own; and a prefix an application serves goes to traffic only if that application
        is in the split."""
        names = [record.name for record in self.traffic]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"traffic names must be unique; repeated: {duplicates}")
        prefixes = [r.route_prefix for r in self.traffic if r.route_prefix is not None]
        duplicates = sorted({p for p in prefixes if prefixes.count(p) > 1})
        if duplicates:
            raise ValueError(f"traffic route prefixes must be unique; repeated: {duplicates}")
        apps = {app.name: app for app in self.applications}
        for record in self.traffic:
            unknown = sorted(record.targets() - set(apps))
            if unknown:
                raise ValueError(f"traffic {record.name!r} names {unknown}, which this "
                                 "config does not deploy")
            owners = sorted(name for name, app in apps.items()
                            if record.route_prefix is not None
                            and app.route_prefix == record.route_prefix
                            and name not in record.split)
            if owners:
                raise ValueError(f"traffic {record.name!r}: route_prefix "
                                 f"{record.route_prefix!r} is served by application(s) "
                                 f"{owners}, which are not in its split")
        return self

    def application(self, name: str) -> ServeApplicationSchema | None:
        return next((app for app in self.applications if app.name == name), None)


# status (serve.status(), `broker-serve status`) ------------------------------------------------
class AutoscalingState(BaseModel):
    """What the autoscaler says about a deployment (the `autoscaling` of its status record)."""

    model_config = ConfigDict(extra="allow")

    target_replicas: int | None = None
    last_decision: Any = None


class DeploymentStatusOverview(BaseModel):
    status: DeploymentStatus
    status_trigger: str = ""
    replica_states: dict[str, int] = Field(default_factory=dict)
    message: str = ""
    autoscaling: AutoscalingState | None = None
    # broker-serve's: the deployment's jobs waiting to run (PENDING, over every priority).
    pending_jobs: int = 0


class ApplicationStatusOverview(BaseModel):
    status: ApplicationStatus
    message: str = ""
    last_deployed_time_s: float = 0.0
    deployments: dict[str, DeploymentStatusOverview] = Field(default_factory=dict)


class ServeStatus(BaseModel):
    """What `serve.status()` returns: `.applications[name].status`, `.deployments[name]`."""

    proxies: dict[str, ProxyStatus] = Field(default_factory=dict)
    applications: dict[str, ApplicationStatusOverview] = Field(default_factory=dict)
    target_capacity: float | None = None

    @classmethod
    def from_records(cls, statuses: dict[str, dict[str, Any]], proxies: dict[str, bool],
                     pending_jobs: Mapping[tuple[str, str], int] | None = None) -> ServeStatus:
        pending_jobs = pending_jobs or {}
        applications = {}
        for name, record in statuses.items():
            deployments = {
                dep: DeploymentStatusOverview(
                    status=d["status"], replica_states=d.get("replica_states", {}),
                    message=d.get("message", ""), status_trigger=status_trigger(d),
                    autoscaling=d.get("autoscaling"), pending_jobs=pending_jobs.get((name, dep), 0),
                )
                for dep, d in record.get("deployments", {}).items()
            }
            applications[name] = ApplicationStatusOverview(
                status=record["status"], message=record.get("message", ""),
                last_deployed_time_s=record.get("last_deployed_time_s", 0.0),
                deployments=deployments,
            )
        return cls(
            proxies={p: ProxyStatus.HEALTHY if ok else ProxyStatus.UNHEALTHY
                     for p, ok in proxies.items()},
            applications=applications,
        )

    def for_display(self) -> dict[str, Any]:
        """The YAML `broker-serve status` prints: Ray's shape, `autoscaling` only where set."""
        data = self.model_dump(mode="json")
        for app in data["applications"].values():
            for deployment in app["deployments"].values():
                if deployment["autoscaling"] is None:
                    del deployment["autoscaling"]
        return data


def status_trigger(record: Mapping[str, Any]) -> str:
    """Ray's status_trigger, from the controller's record or else from the status."""
    if record.get("status_trigger"):
        return str(record["status_trigger"])
    return {"HEALTHY": "CONFIG_UPDATE_COMPLETED", "UPDATING": "CONFIG_UPDATE_STARTED",
            "UNHEALTHY": "REPLICA_STARTUP_FAILED", "UPSCALING": "AUTOSCALING",
            "DOWNSCALING": "AUTOSCALING"}.get(str(record.get("status")), "UNSPECIFIED")


# V1 REST response ----------------------------------------------------------------------------
class ApplicationStatusInfo(BaseModel):
    status: ApplicationStatus
    message: str = ""
    deployment_timestamp: float = 0.0


class DeploymentStatusInfo(BaseModel):
    name: str
    status: DeploymentStatus
    message: str = ""
    status_trigger: str = ""


class ServeStatusSchema(BaseModel):
    """V1: one application's status and its deployments' statuses."""

    name: str = "default"
    app_status: ApplicationStatusInfo
    deployment_statuses: list[DeploymentStatusInfo] = Field(default_factory=list)


# V2 REST response ----------------------------------------------------------------------------
class ServeActorDetails(BaseModel):
    """Where a process of the cluster runs. Ray's actor fields name our process ids."""

    node_id: str | None = None
    node_ip: str | None = None
    actor_id: str | None = None
    actor_name: str | None = None
    worker_id: str | None = None
    log_file_path: str | None = None


class ProxyDetails(ServeActorDetails):
    status: ProxyStatus


class ReplicaDetails(ServeActorDetails):
    replica_id: str
    # PENDING, STARTING, RUNNING, STOPPING (and UNHEALTHY until replaced)
    state: str
    pid: int | None = None
    start_time_s: float = 0.0


class DeploymentDetails(BaseModel):
    name: str
    status: DeploymentStatus
    status_trigger: str = ""
    message: str = ""
    deployment_config: DeploymentSchema
    target_num_replicas: int = 0
    required_resources: dict[str, float] = Field(default_factory=dict)
    replicas: list[ReplicaDetails] = Field(default_factory=list)
    autoscaling: AutoscalingState | None = None
    pending_jobs: int = 0  # as in DeploymentStatusOverview


class ApplicationDetails(BaseModel):
    name: str
    route_prefix: str | None = None
    docs_path: str | None = None
    status: ApplicationStatus
    message: str = ""
    last_deployed_time_s: float = 0.0
    deployed_app_config: ServeApplicationSchema | None = None
    source: Literal["imperative", "declarative"] = "imperative"
    deployments: dict[str, DeploymentDetails] = Field(default_factory=dict)

    @field_serializer("deployed_app_config")
    def _as_written(self, config: ServeApplicationSchema | None) -> dict[str, Any] | None:
        return None if config is None else config.model_dump(mode="json", exclude_unset=True)


class ServeInstanceDetails(BaseModel):
    """V2: the cluster, its proxies and every application in detail."""

    controller_info: ServeActorDetails = Field(default_factory=ServeActorDetails)
    proxy_location: ProxyLocation | None = None
    http_options: HTTPOptionsSchema | None = None
    grpc_options: gRPCOptionsSchema | None = None
    proxies: dict[str, ProxyDetails] = Field(default_factory=dict)
    deploy_mode: str = "MULTI_APP"
    applications: dict[str, ApplicationDetails] = Field(default_factory=dict)
    target_capacity: float | None = None

    def to_status(self) -> ServeStatus:
        """The summary `serve status` shows."""
        return ServeStatus(
            proxies={proxy_id: proxy.status for proxy_id, proxy in self.proxies.items()},
            applications={
                name: ApplicationStatusOverview(
                    status=app.status, message=app.message,
                    last_deployed_time_s=app.last_deployed_time_s,
                    deployments={
                        dep_name: DeploymentStatusOverview(
                            status=dep.status, status_trigger=dep.status_trigger,
                            replica_states=dict(Counter(r.state for r in dep.replicas)),
                            message=dep.message, autoscaling=dep.autoscaling,
                            pending_jobs=dep.pending_jobs,
                        )
                        for dep_name, dep in app.deployments.items()
                    },
                )
                for name, app in self.applications.items()
            },
            target_capacity=self.target_capacity,
        )
