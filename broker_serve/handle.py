"""Deployment handles (Ray's `ray.serve.handle`); they live in `client/handle.py`."""

from .client.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

__all__ = ["DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator"]
