"""Ray's `ray.serve.grpc_util`: `RayServegRPCContext`, which lives in `replica/grpc_context.py`."""

from .replica.grpc_context import RayServegRPCContext

__all__ = ["RayServegRPCContext"]
