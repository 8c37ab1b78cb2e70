"""`@serve.multiplexed` and `serve.get_multiplexed_model_id()`: many models per deployment.

    @serve.multiplexed(max_num_models_per_replica=3)
    async def get_model(self, model_id: str): ...

    model = await self.get_model(serve.get_multiplexed_model_id())

Each replica keeps the models it loaded in an LRU of `max_num_models_per_replica`. Concurrent
requests for a model that is loading share the one load. On eviction a model's
`async def cleanup()` is awaited if it has one, then its `__del__` is called, as Ray calls it
(awaited if it is `async def`, in a thread if not), once: the interpreter does not call it again
when the cache lets go of the model (`destructor.py`). A stopping replica unloads the models it
holds the same way (`unload_all`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..observability import metrics
from . import destructor
from .owner_state import OwnerState

log = logging.getLogger("broker_serve.replica.multiplex")

# Set on a loader, so a replica can tell that its class is multiplexed (model affinity).
LOADER_MARK = "__broker_serve_multiplexed__"

_caches: weakref.WeakSet[_ModelCache] = weakref.WeakSet()  # every model cache of this process

_model_id: contextvars.ContextVar[str] = contextvars.ContextVar(
    "broker_serve_multiplexed_model_id", default="")


def get_multiplexed_model_id() -> str:
    """The model id of the request being handled ("" if it names none)."""
    return _model_id.get()


def _set_model_id(model_id: str) -> None:
    """Set by the replica for each request, from the HTTP header or the call's field."""
    _model_id.set(model_id)


def is_multiplexed(cls: type) -> bool:
    """Whether `cls` has a `@serve.multiplexed` method."""
    return any(getattr(value, LOADER_MARK, False) for value in vars(cls).values()) or any(
        is_multiplexed(base) for base in cls.__bases__ if base is not object)


def loaded_model_ids() -> list[str]:
    """The models this process holds, for the replica's replies (model affinity)."""
    return [model_id for cache in _caches for model_id in cache.loaded()]


class _ModelCache:
    def __init__(self, load: Callable[[str], Any], capacity: int) -> None:
        self._load = load
        self._capacity = capacity
        self._models: OrderedDict[str, asyncio.Future[Any]] = OrderedDict()
        self._loads = metrics.replica_child("model_loads")  # None outside a replica
        _caches.add(self)

    async def get(self, model_id: str) -> Any:
        future = self._models.get(model_id)
        if future is not None:
            self._models.move_to_end(model_id)
            return await asyncio.shield(future)
        future = asyncio.ensure_future(self._load(model_id))
        self._models[model_id] = future
        if self._loads is not None:
            self._loads.inc()
        try:
            model = await asyncio.shield(future)
        except BaseException:
            self._models.pop(model_id, None)  # a failed load is not cached
            raise
        while len(self._models) > self._capacity:
            _, evicted = self._models.popitem(last=False)
            await _unload(evicted)
        return model

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._models

    def loaded(self) -> list[str]:
        return [model_id for model_id, future in self._models.items() if _loaded(future)]

    async def unload_all(self) -> None:
        while self._models:
            model_id, future = self._models.popitem(last=False)
            try:
                await _unload(future)
            except Exception:  # user code; the other models still unload
                log.exception("could not unload model %r", model_id)


def _loaded(future: asyncio.Future[Any]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


async def _unload(future: asyncio.Future[Any]) -> None:
    if not _loaded(future):
        return
    model = future.result()
    cleanup = getattr(model, "cleanup", None)
    try:
        if cleanup is not None and inspect.iscoroutinefunction(cleanup):
            await cleanup()
    finally:
        await destructor.call_del(model)


async def unload_all() -> None:
    """Unload every model this process holds, as eviction does: a replica is stopping."""
    for cache in list(_caches):
        await cache.unload_all()


def multiplexed(_func: Callable[..., Any] | None = None, *,
                max_num_models_per_replica: int = 3) -> Any:
    """Cache what an async model loader returns, per replica, in an LRU of this size."""
    if max_num_models_per_replica < 1 and max_num_models_per_replica != -1:
        raise ValueError("max_num_models_per_replica must be at least 1 (or -1: no limit)")
    capacity = max_num_models_per_replica if max_num_models_per_replica > 0 else 2 ** 31

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        caches = OwnerState("multiplexed", func, lambda loader: _ModelCache(loader, capacity))

        @functools.wraps(func)
        async def load(*args: Any) -> Any:
            cache, (model_id,) = caches.split(load, args)
            if not isinstance(model_id, str) or not model_id:
                raise ValueError("a multiplexed model id must be a non-empty string")
            return await cache.get(model_id)

        setattr(load, LOADER_MARK, True)
        return load

    return decorate(_func) if _func is not None else decorate
