"""Status and config schemas, with Ray Serve's names and fields."""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, Field


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
    UPSCALING = "UPSCALING"
    DOWNSCALING = "DOWNSCALING"


class ReplicaState(str, enum.Enum):
    PENDING = "PENDING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"


class DeploymentStatusOverview(BaseModel):
    status: DeploymentStatus
    status_trigger: str = ""
    replica_states: dict[str, int] = Field(default_factory=dict)
    message: str = ""


class ApplicationStatusOverview(BaseModel):
    status: ApplicationStatus
    message: str = ""
    last_deployed_time_s: float = 0.0
    deployments: dict[str, DeploymentStatusOverview] = Field(default_factory=dict)


class ProxyStatus(str, enum.Enum):
    STARTING = "STARTING"
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"


class ServeStatus(BaseModel):
    """What `serve.status()` returns: `.applications[name].status`, `.deployments[name]`."""

    proxies: dict[str, ProxyStatus] = Field(default_factory=dict)
    applications: dict[str, ApplicationStatusOverview] = Field(default_factory=dict)
    target_capacity: float | None = None

    @classmethod
    def from_records(cls, statuses: dict[str, dict[str, Any]],
                     proxies: dict[str, bool]) -> ServeStatus:
        applications = {}
        for name, record in statuses.items():
            deployments = {
                dep: DeploymentStatusOverview(
                    status=d["status"], replica_states=d.get("replica_states", {}),
                    message=d.get("message", ""), status_trigger=d.get("status_trigger", ""),
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
