"""`@serve.batch` (Ray's `ray.serve.batching`); it lives in `replica/batching.py`."""

from .replica.batching import batch

__all__ = ["batch"]
