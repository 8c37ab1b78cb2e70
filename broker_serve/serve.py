"""`from broker_serve import serve`: the same names as `from ray import serve`."""

# Ray's `serve.context` and `serve.handle` modules (`serve.context.web`, `serve.handle.X`).
from . import context, handle
from .client.api import get_app_handle, get_deployment_handle
from .client.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from .client.jobs import Job, get_job
from .client.stats import stat
from .client.traffic import delete_traffic, get_traffic, set_traffic
from .config import AutoscalingConfig, HTTPOptions, JobConfig, ProxyLocation, RetryWait, gRPCOptions
from .context import ReplicaContext, get_replica_context
from .deployment import Application, Deployment, deployment, get_deployment, list_deployments
from .grpc_util import RayServegRPCContext
from .local_testing.api import delete, run, shutdown, start, status
from .protocol.jobs import JobStatus
from .ray08 import (
    BackendConfig,
    RoutePolicy,
    create_backend,
    create_endpoint,
    get_backend_config,
    get_handle,
    init,
    link,
    route,
    set_backend_config,
    split,
)
from .replica.backend import accept_batch
from .replica.batching import batch
from .replica.ingress import ingress
from .replica.multiplex import get_multiplexed_model_id, multiplexed

__all__ = [
    "Application",
    "AutoscalingConfig",
    "BackendConfig",
    "Deployment",
    "DeploymentHandle",
    "DeploymentResponse",
    "DeploymentResponseGenerator",
    "HTTPOptions",
    "Job",
    "JobConfig",
    "JobStatus",
    "ProxyLocation",
    "RayServegRPCContext",
    "ReplicaContext",
    "RetryWait",
    "RoutePolicy",
    "accept_batch",
    "batch",
    "context",
    "create_backend",
    "create_endpoint",
    "delete",
    "delete_traffic",
    "deployment",
    "gRPCOptions",
    "get_app_handle",
    "get_backend_config",
    "get_deployment",
    "get_deployment_handle",
    "get_handle",
    "get_job",
    "get_multiplexed_model_id",
    "get_replica_context",
    "get_traffic",
    "handle",
    "ingress",
    "init",
    "link",
    "list_deployments",
    "multiplexed",
    "route",
    "run",
    "set_backend_config",
    "set_traffic",
    "shutdown",
    "split",
    "start",
    "stat",
    "status",
]
