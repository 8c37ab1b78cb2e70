"""The records the cluster keeps in Redis, one shape each, and who writes them.

They are TypedDicts, not classes: a record is what orjson reads, a plain dict, so typing it
costs nothing where records are read while serving (the proxy's routes, a replica's live
options). Statuses hold the values of the `str` enums of `schema` (and `ReplicaEndState`):
writers write the members, which orjson writes as their values, and readers compare with the
members. They are typed `str`, since what a reader gets back is a plain string. The Store
(`store.py`) owns every key; the key of each family is in `Names`.
"""

from __future__ import annotations

import enum
from typing import Any, Literal, NotRequired, TypedDict

from ..schema import ReplicaState


class ReplicaEndState(str, enum.Enum):
    """The states, besides `schema.ReplicaState`'s, after which the controller replaces a
    replica. Only replica records hold them; status views show UNHEALTHY until the
    replacement and drop the others."""

    UNHEALTHY = "UNHEALTHY"
    FAILED = "FAILED"  # it did not start, or its process died while starting
    DEAD = "DEAD"  # its process exited


ReplicaRecordState = ReplicaState | ReplicaEndState


# desired applications (`apps`, written by serve.run and the REST API) ------------------------
class DeploymentEntry(TypedDict):
    version: str  # of the deployment's spec (`spec:<app>:<deployment>:<version>`)
    queue: str
    num_replicas: int
    graceful_shutdown_timeout_s: float
    config: dict[str, Any]  # DeploymentConfig in JSON form, with the live options
    user_config_hash: str


class AppRecord(TypedDict):
    name: str
    route_prefix: str | None
    ingress: str
    version: str
    deployments: dict[str, DeploymentEntry]
    deployed_at: float
    deploy_id: NotRequired[str]  # new for each write (`apps.write_app`)
    source: NotRequired[Literal["declarative"]]


class TrafficRecord(TypedDict):
    """`traffic`: who serves a route prefix (or a handle-only endpoint) by weight, and who gets
    a copy of a fraction of its requests (docs/architecture.md, "Traffic policy"). Written by
    the driver (`serve.set_traffic`), the REST API and config PUTs."""
    name: str
    route_prefix: str | None
    methods: list[str] | None  # upper-case; None: any method
    split: dict[str, float]  # app -> weight, summing to 1; empty: no backend linked yet
    shadow: dict[str, float]  # app -> the fraction of requests copied to it
    revision: str  # new for each write: the route entry echoes it, so writers see it applied
    source: NotRequired[Literal["declarative"]]  # a config's: its next PUT replaces it


class AppBuild(TypedDict):
    """A config's application being built (`app_builds`), or whose build failed."""
    status: str  # ApplicationStatus: DEPLOYING or DEPLOY_FAILED
    message: str
    deployed_at: float
    expires: NotRequired[float]  # while building: a mark whose controller died expires


# what the controller writes ------------------------------------------------------------------
class Assignment(TypedDict):
    """A replica a worker node is to run (`node_assignments:<node>`)."""
    app: str
    deployment: str
    version: str
    graceful_shutdown_timeout_s: float
    resources: dict[str, float]


class AutoscalingStatus(TypedDict):
    target_replicas: int
    last_decision: str


class DeploymentStatusRecord(TypedDict):
    name: str
    status: str  # DeploymentStatus
    message: str
    replica_states: dict[str, int]  # by ReplicaRecordState
    ready: bool  # takes requests
    target_replicas: int
    autoscaling: NotRequired[AutoscalingStatus]
    status_trigger: NotRequired[str]


class AppStatusRecord(TypedDict):
    """The controller's status of an application (`app_status`)."""
    name: str
    version: str
    deploy_id: str | None  # echoes the record's, so serve.run waits for its own deploy
    route_prefix: str | None
    ingress: str
    last_deployed_time_s: float
    deployments: dict[str, DeploymentStatusRecord]
    status: str  # ApplicationStatus
    message: str


class SplitTarget(TypedDict):
    """One application a traffic route sends requests to, with its share."""
    app: str
    deployment: str  # the app's ingress
    queue: str
    weight: float  # among the ready targets, renormalised to sum to 1; 0 when not ready
    ready: bool
    bounded: bool
    durable: bool
    ordered: bool


class ShadowTarget(TypedDict):
    """One application a traffic route copies a fraction of its requests to."""
    app: str
    deployment: str
    queue: str
    fraction: float


class Route(TypedDict):
    """One prefix of the route table. A traffic record's route also has `split` (and
    `shadow`, `methods`, `endpoint`, `revision`); its top-level fields then describe its
    heaviest ready target, so readers that know nothing of splits still work."""
    app: str
    deployment: str
    queue: str
    status: str  # ApplicationStatus
    message: str
    ready: bool
    bounded: bool  # has max_queued_requests: publishes wait for the broker's confirm
    durable: bool  # a quorum queue: publishes are persistent, confirmed and retried
    ordered: bool  # order_by_deadline: a deadline gives a request without a priority its own
    split: NotRequired[list[SplitTarget]]
    shadow: NotRequired[list[ShadowTarget]]
    methods: NotRequired[list[str]]  # absent: any method
    endpoint: NotRequired[str]  # the traffic record's name
    revision: NotRequired[str]  # the traffic record's


class RouteTableRecord(TypedDict):
    """`routes`: every proxy's table; `version` grows with each change."""
    version: int
    routes: dict[str, Route]


# what each process writes of itself ------------------------------------------------------------
class ReplicaChanges(TypedDict, total=False):
    """The fields of a replica record one write sets (`Store.update_replica`)."""
    replica_id: str
    app: str
    deployment: str
    version: str
    state: str  # ReplicaRecordState
    message: str
    pid: int
    updated: float
    user_config_hash: str
    exited_unexpectedly: bool  # DEAD without being told to stop (its worker node)


class ReplicaRecord(ReplicaChanges, total=False):
    """`replicas`: written by the controller (PENDING), then by the replica (its state) and
    by its worker node (FAILED or DEAD when the process exits). A node's mark may land after
    the controller removed the record, so a record may hold only its state."""
    deploy_id: str | None
    node: str
    start_time: float
    ongoing: int  # not stored: the controller's reading of the heartbeat


class NodeRecord(TypedDict):
    """`nodes`: written by the worker node itself."""
    node_id: str
    host: str
    pid: int
    resources: dict[str, float]
    started: float
    metrics_port: int | None


class FailureRecord(TypedDict):
    """One entry of `failures`: something the controller saw fail and replaced (a replica
    that failed, turned unhealthy or stopped beating; a worker node that went away)."""
    time: float  # unix s
    kind: str  # replica-failed, replica-unhealthy, replica-lost, node-lost
    app: str | None
    deployment: str | None
    replica: str | None
    node: str | None
    message: str


class ProxyRecord(TypedDict):
    """`proxies`: written by the proxy itself on each routes refresh."""
    proxy_id: str
    host: str
    port: int
    hostname: str
    pid: int
    routes_version: int
    updated: float
