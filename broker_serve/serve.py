"""`from broker_serve import serve`: the same names as `from ray import serve`."""

from .client.api import (
    delete,
    get_app_handle,
    get_deployment_handle,
    run,
    shutdown,
    start,
    status,
)
from .client.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
from .config import AutoscalingConfig, HTTPOptions, ProxyLocation, gRPCOptions
from .context import ReplicaContext, get_replica_context
from .deployment import Application, Deployment, deployment
from .replica.batching import batch
from .replica.ingress import ingress
from .replica.multiplex import get_multiplexed_model_id, multiplexed

__all__ = [
    "Application",
    "AutoscalingConfig",
    "Deployment",
    "DeploymentHandle",
    "DeploymentResponse",
    "DeploymentResponseGenerator",
    "HTTPOptions",
    "ProxyLocation",
    "ReplicaContext",
    "batch",
    "delete",
    "deployment",
    "gRPCOptions",
    "get_app_handle",
    "get_deployment_handle",
    "get_multiplexed_model_id",
    "get_replica_context",
    "ingress",
    "multiplexed",
    "run",
    "shutdown",
    "start",
    "status",
]
