"""Deployment handles (Ray's `ray.serve.handle`); they live in `client/handle.py`.

`RayServeHandle` and `RayServeSyncHandle`, the handle classes before Ray 2.7, name the same
class: one handle serves async callers (`await handle.remote()`) and sync ones
(`handle.remote().result()`, where Ray had `ray.get(ref)`).
"""

from .client.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator

RayServeHandle = DeploymentHandle
RayServeSyncHandle = DeploymentHandle

__all__ = ["DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator",
           "RayServeHandle", "RayServeSyncHandle"]
