"""`@serve.batch`: callers pass one item each; the function receives them as lists.

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict(self, inputs: list[str]) -> list[str]: ...

    result = await self.predict("one input")

An `async def` returns a list with one result per caller. An async generator streams: each
step yields such a list, each caller's call returns an async generator of its own items, and an
item that is `StopIteration` (or `StopAsyncIteration`) ends that caller's stream early. An
exception raised for a batch reaches every caller still in it. How batches form, start and are
cancelled is in `batch_queue.py`; the queue lives in the replica process, one per instance (or
plain function), made on first use.

`set_max_batch_size` and `set_batch_wait_timeout_s` on the decorated function (or method)
change the batches that open afterwards, in every instance.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

from .batch_queue import BatchQueue, StreamCall, UnaryCall
from .owner_state import OwnerState

# Set on a batched generator's wrapper: a plain function that must run on the event loop
# (it queues the call there) although it is not `async def`.
ON_EVENT_LOOP = "__broker_serve_on_event_loop__"


def _max_batch_size(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"max_batch_size must be integer >= 1, got {value}")
    if value < 1:
        raise ValueError(f"max_batch_size must be an integer >= 1, got {value}")
    return value


def _batch_wait_timeout_s(value: Any) -> float:
    if not isinstance(value, (float, int)) or isinstance(value, bool):
        raise TypeError(f"batch_wait_timeout_s must be a float >= 0, got {value}")
    if math.isnan(value) or value < 0:
        raise ValueError(f"batch_wait_timeout_s must be a float >= 0, got {value}")
    return value


def _max_concurrent_batches(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TypeError(f"max_concurrent_batches must be an integer >= 1, got {value}")
    return value


def _batch_size_fn(value: Any) -> Callable[[list[Any]], int] | None:
    if value is not None and not callable(value):
        raise TypeError(f"batch_size_fn must be a callable or None, got {type(value)}")
    return value  # type: ignore[no-any-return]


class _Settings:
    """One decorated function's parameters, read by each of its queues as a batch opens."""

    def __init__(self, max_batch_size: Any, batch_wait_timeout_s: Any,
                 max_concurrent_batches: Any, batch_size_fn: Any) -> None:
        self.max_batch_size = _max_batch_size(max_batch_size)
        self.batch_wait_timeout_s = _batch_wait_timeout_s(batch_wait_timeout_s)
        self.max_concurrent_batches = _max_concurrent_batches(max_concurrent_batches)
        self.batch_size_fn = _batch_size_fn(batch_size_fn)

    def set_max_batch_size(self, new_max_batch_size: int) -> None:
        self.max_batch_size = _max_batch_size(new_max_batch_size)

    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None:
        self.batch_wait_timeout_s = _batch_wait_timeout_s(new_batch_wait_timeout_s)

    def get_max_batch_size(self) -> int:
        return self.max_batch_size

    def get_batch_wait_timeout_s(self) -> float:
        return self.batch_wait_timeout_s


def batch(_func: Callable[..., Any] | None = None, /, max_batch_size: int = 10,
          batch_wait_timeout_s: float = 0.01, max_concurrent_batches: int = 1,
          batch_size_fn: Callable[[list[Any]], int] | None = None) -> Any:
    """Turn an async function (or async generator) of lists into one that callers call with
    single items; Ray Serve's parameters, defaults and error messages."""
    if _func is not None:
        _check_decorated(_func)
    settings = _Settings(max_batch_size, batch_wait_timeout_s, max_concurrent_batches,
                         batch_size_fn)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        _check_decorated(func)
        streams = inspect.isasyncgenfunction(func)
        queues: OwnerState[BatchQueue] = OwnerState(
            "batch", func, lambda call: BatchQueue(call, signature, settings, streams),
            generators=True)
        signature = inspect.signature(func)
        if queues.takes_self:  # callers do not pass `self` as an item
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        wrapper = _streaming(queues) if streams else _unary(queues)
        functools.update_wrapper(wrapper, func)
        wrapper.set_max_batch_size = settings.set_max_batch_size  # type: ignore[attr-defined]
        wrapper.set_batch_wait_timeout_s = (  # type: ignore[attr-defined]
            settings.set_batch_wait_timeout_s)
        # Ray's own unit tests read these two; they are not part of its public API.
        wrapper._get_max_batch_size = settings.get_max_batch_size  # type: ignore[attr-defined]
        wrapper._get_batch_wait_timeout_s = (  # type: ignore[attr-defined]
            settings.get_batch_wait_timeout_s)
        return wrapper

    return decorate(_func) if _func is not None else decorate


def _check_decorated(func: Any) -> None:
    if not callable(func):
        raise TypeError("@serve.batch can only be used to decorate functions or methods.")
    if not (inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func)):
        raise TypeError("Functions decorated with @serve.batch must be 'async def'")


def _unary(queues: OwnerState[BatchQueue]) -> Callable[..., Any]:
    async def batched(*args: Any, **kwargs: Any) -> Any:
        queue, rest = queues.split(batched, args)
        call = queue.submit(rest, kwargs)
        assert isinstance(call, UnaryCall)
        return await call.future

    return batched


def _streaming(queues: OwnerState[BatchQueue]) -> Callable[..., Any]:
    # Not a generator function itself: the call must join its batch when it is made, not at
    # the first `__anext__`, or callers that create their streams first would never batch.
    def batched(*args: Any, **kwargs: Any) -> Any:
        queue, rest = queues.split(batched, args)
        call = queue.submit(rest, kwargs)
        assert isinstance(call, StreamCall)
        return call.items()

    setattr(batched, ON_EVENT_LOOP, True)
    return batched
