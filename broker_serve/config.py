"""Configuration models users pass to `serve.deployment`, `serve.start` and config files.

Names and defaults follow Ray Serve 2.x so that existing programs and configs port unchanged.
"""

from __future__ import annotations

import enum
import hashlib
import importlib
from typing import Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveInt,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict


class ProxyLocation(str, enum.Enum):
    Disabled = "Disabled"
    HeadOnly = "HeadOnly"
    EveryNode = "EveryNode"


class AutoscalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)
    initial_replicas: int | None = Field(default=None, ge=0)
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    metrics_interval_s: float = Field(default=10.0, gt=0)
    look_back_period_s: float = Field(default=30.0, gt=0)
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)
    upscaling_factor: float | None = Field(default=None, gt=0)
    downscaling_factor: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self


class RetryWait(BaseModel):
    """The wait before each retry of a failed job, in tenacity's vocabulary (docs/protocol.md,
    "The job message"): `wait` names the strategy, the other fields are its arguments in
    seconds."""

    model_config = ConfigDict(extra="forbid")

    wait: Literal["fixed", "exponential", "random_exponential", "incrementing", "none"] = (
        "exponential")
    multiplier: NonNegativeFloat = 1.0
    exp_base: float = Field(default=2.0, gt=1)
    min: NonNegativeFloat = 0.0
    max: NonNegativeFloat = 60.0
    start: NonNegativeFloat = 0.0
    increment: NonNegativeFloat = 1.0
    seconds: NonNegativeFloat = 1.0  # `fixed`'s wait


class JobConfig(BaseModel):
    """How a deployment runs jobs (docs/architecture.md, "Jobs"): how often a failed one runs
    again, how long it waits before each retry, and how long its result is kept. A job may
    override the first two."""

    model_config = ConfigDict(extra="forbid")

    max_retries: int = Field(default=3, ge=0, le=100)
    retry_wait: RetryWait = Field(default_factory=RetryWait)
    result_ttl_s: int = Field(default=86_400, ge=1, le=2_592_000)


# Options that running replicas take on without a restart: changing only these keeps the
# deployment's version, so its replicas stay (docs/architecture.md, "Updates").
LIVE_OPTIONS = frozenset({
    "num_replicas", "autoscaling_config", "user_config", "graceful_shutdown_wait_loop_s",
    "graceful_shutdown_timeout_s", "health_check_period_s", "health_check_timeout_s",
    "job_config",
})


def is_bounded(config: dict[str, Any]) -> bool:
    """A deployment's config (in JSON form) has max_queued_requests: publishes to its queue
    wait for the broker's confirm, which says when it is full."""
    return int(config.get("max_queued_requests", -1)) > 0


def is_durable(config: dict[str, Any]) -> bool:
    """A deployment's config has a quorum queue: its requests are published persistent, with
    confirms, and retried on another node (docs/architecture.md, "Durable mode")."""
    return config.get("queue_type") == "quorum"


def is_ordered(config: dict[str, Any]) -> bool:
    """A deployment's config has order_by_deadline: a request with a deadline and no explicit
    priority gets its deadline's (docs/architecture.md, "Deadlines and ordering")."""
    return bool(config.get("order_by_deadline"))


def user_config_hash(user_config: Any) -> str:
    """What replicas report once `reconfigure()` took this user_config."""
    return hashlib.sha256(orjson.dumps(user_config, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


class DeploymentConfig(BaseModel):
    """The options of one deployment. `num_replicas="auto"` turns autoscaling on."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: PositiveInt | None = 1
    max_ongoing_requests: PositiveInt = 5
    max_queued_requests: int = Field(default=-1, ge=-1)
    # Declares the queue with priorities, so requests with nearer deadlines (SLOs) are
    # delivered first (docs/architecture.md, "Deadlines and ordering"); not in Ray 2.x.
    order_by_deadline: bool = False
    # The request queue's type (docs/architecture.md, "Durable mode"): "quorum" replicates it
    # across a RabbitMQ cluster and makes its requests persistent and confirmed. None: the
    # cluster's BROKER_SERVE_QUEUE_TYPE, read where the application is built.
    queue_type: Literal["classic", "quorum"] | None = None
    user_config: Any = None
    autoscaling_config: AutoscalingConfig | None = None
    # broker-serve's: retries and result TTL of the jobs it runs (not in Ray 2.x).
    job_config: JobConfig = Field(default_factory=JobConfig)
    graceful_shutdown_wait_loop_s: NonNegativeFloat = 2.0
    graceful_shutdown_timeout_s: NonNegativeFloat = 20.0
    health_check_period_s: float = Field(default=10.0, gt=0)
    health_check_timeout_s: float = Field(default=30.0, gt=0)
    ray_actor_options: dict[str, Any] = Field(default_factory=dict)
    # A plainer spelling of what a replica needs from its node: {"CPU": 2, "model_slot": 1}.
    resources: dict[str, NonNegativeFloat] = Field(default_factory=dict)

    @field_validator("ray_actor_options")
    @classmethod
    def _actor_options(cls, value: dict[str, Any]) -> dict[str, Any]:
        for name in ("num_cpus", "num_gpus", "memory"):
            amount = value.get(name)
            if amount is not None and (not isinstance(amount, (int, float)) or amount < 0):
                raise ValueError(f"ray_actor_options.{name} must be a number >= 0")
        custom = value.get("resources") or {}
        if not isinstance(custom, dict) or not all(
                isinstance(v, (int, float)) and v >= 0 for v in custom.values()):
            raise ValueError("ray_actor_options.resources must map names to numbers >= 0")
        return value

    def replica_resources(self) -> dict[str, float]:
        """What one replica needs from its node. Unlike Ray, nothing by default: replicas are
        processes that share their node's CPUs unless they ask for a share."""
        options = self.ray_actor_options
        wanted = {"CPU": options.get("num_cpus"), "GPU": options.get("num_gpus"),
                  "memory": options.get("memory"), **(options.get("resources") or {}),
                  **self.resources}
        return {name: float(amount) for name, amount in wanted.items() if amount}

    @model_validator(mode="after")
    def _quorum_is_unordered(self) -> DeploymentConfig:
        if self.queue_type == "quorum" and self.order_by_deadline:
            raise ValueError("order_by_deadline needs a classic queue: RabbitMQ's quorum queues "
                             "have no priorities")
        return self

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_bound(cls, value: int) -> int:
        if value == 0:
            raise ValueError("max_queued_requests must be -1 (no bound) or at least 1")
        return value

    def target_replicas(self) -> int:
        if self.autoscaling_config is not None:
            auto = self.autoscaling_config
            return auto.initial_replicas if auto.initial_replicas is not None else auto.min_replicas
        return self.num_replicas or 1


class MiddlewareSpec(BaseModel):
    """A Starlette middleware as it travels to proxies: an import path and its arguments.

    `serve.start(http_options={"middlewares": [Middleware(CORSMiddleware, ...)]})` is turned into
    this form; a config file writes it directly. The arguments must be plain data.
    """

    model_config = ConfigDict(extra="forbid")

    import_path: str = Field(pattern=r"^[\w.]+:[\w.]+$")
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    def load(self) -> Any:
        module, _, name = self.import_path.partition(":")
        target: Any = importlib.import_module(module)
        for part in name.split("."):
            target = getattr(target, part)
        return target


class _DefaultProxyAddress(BaseSettings):
    """BROKER_SERVE_HTTP_HOST and BROKER_SERVE_HTTP_PORT let an operator (or a test) move the
    default proxy without editing code. Read here, not in `settings`, which sits above this
    module: HTTPOptions are built in every layer."""

    model_config = SettingsConfigDict(env_prefix="BROKER_SERVE_HTTP_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000


class HTTPOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(default_factory=lambda: _DefaultProxyAddress().host)
    port: int = Field(default_factory=lambda: _DefaultProxyAddress().port, ge=0, le=65535)
    root_path: str = ""
    request_timeout_s: float | None = None
    keep_alive_timeout_s: float = 5.0
    max_body_bytes: int = Field(default=100 * 1024 * 1024, gt=0)
    # Limits on what a client may send (docs/architecture.md, "Limits on untrusted input"):
    # over them a request gets 431, or 503 with Retry-After, and a WebSocket session is
    # closed with 1009; none is in Ray's HTTPOptions.
    max_header_count: int = Field(default=100, gt=0)
    max_header_bytes: int = Field(default=64 * 1024, gt=0)
    max_websocket_message_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    max_inflight_requests: int = Field(default=10_000, gt=0)
    middlewares: list[MiddlewareSpec] = Field(default_factory=list)
    location: ProxyLocation = ProxyLocation.HeadOnly

    @field_validator("location", mode="before")
    @classmethod
    def _location(cls, value: Any) -> Any:
        # Ray 1.x spelled "no proxy" as "NoServer" or None.
        if value is None or value == "NoServer" or value == "DeploymentMode.NoServer":
            return ProxyLocation.Disabled
        return getattr(value, "value", value)

    @field_validator("middlewares", mode="before")
    @classmethod
    def _middleware_specs(cls, value: Any) -> Any:
        return [_as_spec(item) for item in value or ()]


def _as_spec(item: Any) -> Any:
    """A starlette `Middleware(cls, *args, **kwargs)` (or a bare class) as a MiddlewareSpec."""
    target = getattr(item, "cls", item)
    if isinstance(item, (dict, MiddlewareSpec)) or not callable(target):
        return item
    return {"import_path": f"{target.__module__}:{target.__qualname__}",
            "args": list(getattr(item, "args", ())), "kwargs": dict(getattr(item, "kwargs", {}))}


class gRPCOptions(BaseModel):  # Ray's name, lower-case g and all
    """The proxies' gRPC server (docs/architecture.md, "gRPC ingress"). As in Ray, it runs
    only when `grpc_servicer_functions` names at least one service."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(default=9000, ge=0, le=65535)
    grpc_servicer_functions: list[str] = Field(default_factory=list)
    request_timeout_s: float | None = Field(default=None, gt=0)

    @field_validator("grpc_servicer_functions")
    @classmethod
    def _import_paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if "." not in path.strip("."):
                raise ValueError(f"grpc_servicer_functions entries are 'module.function' "
                                 f"import paths, got {path!r}")
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.grpc_servicer_functions)
