"""One view of the cluster's applications, read from Redis: `serve.status()`, the REST API's
GET and `broker-serve status` all show this.

Per application it joins the desired record (`apps`), the controller's status (`app_status`),
a config build in flight or failed (`app_builds`), the stored config (`deploy_config`) and the
replica records.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from ..config import gRPCOptions
from ..schema import (
    ApplicationDetails,
    ApplicationStatus,
    ApplicationStatusInfo,
    DeploymentDetails,
    DeploymentSchema,
    DeploymentStatus,
    DeploymentStatusInfo,
    HTTPOptionsSchema,
    ProxyDetails,
    ProxyStatus,
    ReplicaDetails,
    ReplicaState,
    ServeActorDetails,
    ServeDeploySchema,
    ServeInstanceDetails,
    ServeStatus,
    ServeStatusSchema,
    gRPCOptionsSchema,
    status_trigger,
)
from .records import AppBuild, AppRecord, AppStatusRecord, ReplicaEndState, ReplicaRecord
from .store import Store, now

# Replica records the controller is about to drop: not shown. (A tuple: records hold plain
# strings, which compare equal to the members.)
_GONE_STATES = (ReplicaEndState.DEAD, ReplicaEndState.FAILED)


async def read_status(store: Store) -> ServeStatus:
    """What `serve.status()` returns: the controller's statuses (and replica counts), with
    config builds and deletions overlaid."""
    apps = await store.apps()
    statuses = await store.app_statuses()
    builds = await _live_builds(store)
    records = {}
    for name in sorted(apps.keys() | statuses.keys() | builds.keys()):
        state, message = _application_status(apps.get(name), statuses.get(name), builds.get(name))
        deployed_at = _deployed_at(apps.get(name), builds.get(name))
        records[name] = {"last_deployed_time_s": deployed_at, **(statuses.get(name) or {}),
                         "status": state.value, "message": message}
    proxies = await store.proxies()
    alive = await store.alive([store.names.proxy_alive(p) for p in proxies])
    return ServeStatus.from_records(records, dict(zip(proxies, alive)),
                                    pending_jobs(await store.jobs.counts()))


def pending_jobs(counts: Mapping[str, int]) -> dict[tuple[str, str], int]:
    """Jobs PENDING per (application, deployment), over every priority, from the job counts
    (fields `PENDING|<priority>|<app>|<deployment>`, docs/protocol.md "The job record")."""
    pending: dict[tuple[str, str], int] = {}
    for field, count in counts.items():
        status, _, rest = field.partition("|")
        if status == "PENDING":
            app, _, deployment = rest.partition("|")[2].partition("|")
            pending[(app, deployment)] = pending.get((app, deployment), 0) + count
    return pending


async def _live_builds(store: Store) -> dict[str, AppBuild]:
    """Failed config builds, and those in flight (a mark whose controller died expires)."""
    builds = await store.app_builds()
    return {name: build for name, build in builds.items()
            if build.get("status") == ApplicationStatus.DEPLOY_FAILED
            or build.get("expires", 0) > now()}


async def read_details(store: Store) -> ServeInstanceDetails:
    apps = await store.apps()
    statuses = await store.app_statuses()
    builds = await _live_builds(store)
    replicas = await store.replicas()
    config = await store.deploy_config()
    by_deployment: dict[tuple[str, str], list[ReplicaRecord]] = {}
    for record in replicas.values():
        if record.get("state") not in _GONE_STATES:
            by_deployment.setdefault((record["app"], record["deployment"]), []).append(record)

    pending = pending_jobs(await store.jobs.counts())
    applications = {}
    for name in sorted(apps.keys() | statuses.keys() | builds.keys()):
        applications[name] = _application(name, apps.get(name), statuses.get(name),
                                          builds.get(name), config, by_deployment, pending)
    http = await store.http_options()
    return ServeInstanceDetails(
        controller_info=await _controller_info(store),
        proxy_location=(config.proxy_location if config and "proxy_location"
                        in config.model_fields_set else http.location),
        http_options=HTTPOptionsSchema(
            host=http.host, port=http.port, root_path=http.root_path,
            request_timeout_s=http.request_timeout_s,
            keep_alive_timeout_s=http.keep_alive_timeout_s,
            max_header_count=http.max_header_count, max_header_bytes=http.max_header_bytes,
            max_websocket_message_bytes=http.max_websocket_message_bytes,
            max_inflight_requests=http.max_inflight_requests),
        grpc_options=_grpc_options(await store.displayed_grpc_options(), config),
        proxies=await _proxies(store),
        applications=applications,
        target_capacity=config.target_capacity if config else None,
    )


def _grpc_options(stored: gRPCOptions | None, config: ServeDeploySchema | None
                  ) -> gRPCOptionsSchema | None:
    """The options the proxies serve gRPC with (serve.start's or a config's), as Ray shows."""
    if stored is not None:
        return gRPCOptionsSchema.model_validate(stored.model_dump())
    return config.grpc_options if config else None


def _application(name: str, record: AppRecord | None, status: AppStatusRecord | None,
                 build: AppBuild | None, config: ServeDeploySchema | None,
                 replicas: dict[tuple[str, str], list[ReplicaRecord]],
                 pending: Mapping[tuple[str, str], int]) -> ApplicationDetails:
    state, message = _application_status(record, status, build)
    declarative = build is not None or (record is not None
                                        and record.get("source") == "declarative")
    app_config = config.application(name) if config and declarative else None
    deployments = {}
    dep_statuses = status["deployments"] if status else {}
    dep_records: Mapping[str, Mapping[str, Any]] = \
        (record["deployments"] if record else None) or dep_statuses
    for dep_name, dep in dep_records.items():
        dep_status: Mapping[str, Any] = dep_statuses.get(dep_name) or {}
        deployments[dep_name] = DeploymentDetails(
            name=dep_name,
            status=dep_status.get("status", DeploymentStatus.UPDATING),
            status_trigger=status_trigger(dep_status),
            message=dep_status.get("message", ""),
            deployment_config=_deployment_schema(dep_name, dep.get("config", {})),
            target_num_replicas=dep_status.get("target_replicas", dep.get("num_replicas", 0)),
            replicas=[_replica(r) for r in replicas.get((name, dep_name), [])],
            autoscaling=dep_status.get("autoscaling"),
            pending_jobs=pending.get((name, dep_name), 0),
        )
    return ApplicationDetails(
        name=name,
        route_prefix=(record["route_prefix"] if record
                      else app_config.route_prefix if app_config else None),
        status=state,
        message=message,
        last_deployed_time_s=(status.get("last_deployed_time_s", _deployed_at(record, build))
                              if status else _deployed_at(record, build)),
        deployed_app_config=app_config,
        source="declarative" if declarative else "imperative",
        deployments=deployments,
    )


def _deployed_at(record: AppRecord | None, build: AppBuild | None) -> float:
    source = record or build
    return source["deployed_at"] if source else 0.0


def _application_status(record: AppRecord | None, status: AppStatusRecord | None,
                        build: AppBuild | None) -> tuple[ApplicationStatus, str]:
    if build is not None:  # a config build in flight or failed says more than the last status
        return ApplicationStatus(build["status"]), build.get("message", "")
    if record is None:
        return ApplicationStatus.DELETING, ""
    if status is None:
        return ApplicationStatus.DEPLOYING, "waiting for the controller"
    return ApplicationStatus(status["status"]), status.get("message", "")


def _deployment_schema(name: str, config: dict[str, Any]) -> DeploymentSchema:
    fields = {k: v for k, v in config.items() if k in DeploymentSchema.model_fields}
    if fields.get("autoscaling_config") is not None:
        fields.pop("num_replicas", None)
    try:
        return DeploymentSchema.model_validate({"name": name, **fields})
    except ValidationError:  # options newer than the schema: show them as they are
        return DeploymentSchema.model_construct(name=name, **fields)


def _replica(record: ReplicaRecord) -> ReplicaDetails:
    return ReplicaDetails(
        replica_id=record["replica_id"], state=record.get("state", ReplicaState.PENDING.value),
        pid=record.get("pid"), start_time_s=record.get("start_time", 0.0),
        node_id=record.get("node"), actor_id=record["replica_id"],
        actor_name=f"{record['app']}#{record['deployment']}",
    )


async def _proxies(store: Store) -> dict[str, ProxyDetails]:
    names = store.names
    records = await store.proxies()
    alive = await store.alive([names.proxy_alive(p) for p in records])
    return {
        proxy_id: ProxyDetails(
            status=ProxyStatus.HEALTHY if ok else ProxyStatus.UNHEALTHY,
            node_id=record.get("host"), node_ip=record.get("host"), actor_id=proxy_id,
            actor_name=f"proxy {record.get('host')}:{record.get('port')}",
        )
        for (proxy_id, record), ok in zip(records.items(), alive)
    }


async def _controller_info(store: Store) -> ServeActorDetails:
    leader_id = await store.lease_value()
    # The id is `<host>-<pid>` of the controller holding the lease.
    return ServeActorDetails(node_id=leader_id.rsplit("-", 1)[0] if leader_id else None,
                             actor_id=leader_id, actor_name="controller")


def v1_status(details: ServeInstanceDetails, name: str = "default") -> ServeStatusSchema:
    """`GET /api/serve/deployments/status`: one application, NOT_STARTED if there is none."""
    app = details.applications.get(name)
    if app is None:
        return ServeStatusSchema(
            name=name, app_status=ApplicationStatusInfo(status=ApplicationStatus.NOT_STARTED))
    return ServeStatusSchema(
        name=name,
        app_status=ApplicationStatusInfo(status=app.status, message=app.message,
                                         deployment_timestamp=app.last_deployed_time_s),
        deployment_statuses=[
            DeploymentStatusInfo(name=d.name, status=d.status, message=d.message,
                                 status_trigger=d.status_trigger)
            for d in app.deployments.values()
        ],
    )
