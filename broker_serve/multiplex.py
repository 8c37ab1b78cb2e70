"""`@serve.multiplexed` (Ray's `ray.serve.multiplex`); it lives in `replica/multiplex.py`."""

from .replica.multiplex import get_multiplexed_model_id, multiplexed

__all__ = ["get_multiplexed_model_id", "multiplexed"]
