"""A Ray Serve 0.8 backend, run as the instance of a deployment (`broker_serve/ray08.py`).

`serve.create_backend(func_or_class, tag, *init_args)` deploys `Backend` bound to the user's
function or class. `Backend` gives it 0.8's calling convention:

- **Over HTTP** (`serve.context.web` is True) the backend gets the request, a
  `FlaskStyleRequest` as 0.8's Flask request was, and its return value is the response.
- **From Python** (a handle; `serve.context.web` is False) it gets the caller's keyword
  arguments, after a `NotWebRequest` in the request's place if it takes one positionally.
- **`@serve.accept_batch`** marks a backend that takes lists: each argument (the request, or
  each keyword) becomes the list of the batch's values, and it returns one result per caller.
  Batches form in the replica on `@serve.batch`'s queue (`batch_queue.py`). HTTP requests and
  handle calls batch apart, and handle calls only with calls of the same keywords, so that
  every batch has one shape.

The backend's BackendConfig reaches it as the deployment's `user_config`, so `reconfigure()`
takes a new `max_batch_size` in the running replica: it applies to the batches that open
afterwards, without a restart.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from ..context import _web
from .backend_request import FlaskStyleRequest, NotWebRequest
from .batch_queue import BatchQueue, UnaryCall

__all__ = ["Backend", "accept_batch", "accepts_batch"]

F = TypeVar("F", bound=Callable[..., Any])

_ACCEPT_BATCH = "_bs_accept_batch"
# How long a batch waits for more callers once its first arrived (@serve.batch's default).
BATCH_WAIT_TIMEOUT_S = 0.01
# What every caller of a batch passes to its queue: the request (or its stand-in) and the
# keyword arguments; the batch function gets the list of each.
_BATCH_SIGNATURE = inspect.Signature([
    inspect.Parameter("request", inspect.Parameter.POSITIONAL_ONLY),
    inspect.Parameter("kwargs", inspect.Parameter.POSITIONAL_ONLY),
])


def accept_batch(f: F) -> F:
    """Mark a backend function (or a class's `__call__`) as taking lists: Ray Serve 0.8's
    `@serve.accept_batch`. The batch size is the backend's `max_batch_size`."""
    if not callable(f):
        raise TypeError("@serve.accept_batch must decorate a function or a method")
    setattr(f, _ACCEPT_BATCH, True)
    return f


def accepts_batch(func_or_class: Any) -> bool:
    """Whether a backend's function, or its class's `__call__`, is `@serve.accept_batch`."""
    entry = func_or_class.__call__ if inspect.isclass(func_or_class) else func_or_class
    return bool(getattr(entry, _ACCEPT_BATCH, False))


class _BatchSettings:
    """What the backend's batch queues read as each batch opens (`batch_queue.Settings`)."""

    def __init__(self) -> None:
        self.max_batch_size = 1
        self.batch_wait_timeout_s = BATCH_WAIT_TIMEOUT_S
        self.max_concurrent_batches = 1
        self.batch_size_fn: Callable[[list[Any]], int] | None = None


class Backend:
    """The user's 0.8 backend (a function, or an instance of its class) and how to call it."""

    def __init__(self, func_or_class: Any, *init_args: Any) -> None:
        self.target: Any
        if inspect.isclass(func_or_class):
            self.target = func_or_class(*init_args)
            entry = self.target.__call__
        elif callable(func_or_class):
            if init_args:
                raise TypeError("a backend function takes no init arguments")
            self.target = entry = func_or_class
        else:
            raise TypeError(f"a backend must be a function or a class, got {func_or_class!r}")
        self._entry: Callable[..., Any] = entry
        self._takes_request = _takes_positional(entry)
        self._batched = accepts_batch(func_or_class)
        self._settings = _BatchSettings()
        self._queues: dict[tuple[bool, frozenset[str]], BatchQueue] = {}

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """The backend's serve-side BackendConfig fields (ray08.py writes them)."""
        self._settings.max_batch_size = int(user_config.get("max_batch_size") or 1)

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        web = _web.get()
        if args and not web:
            raise TypeError("a backend takes keyword arguments from Python: call "
                            "handle.remote(name=value, ...), as in Ray Serve 0.8")
        request = await FlaskStyleRequest.read(args[0]) if web else NotWebRequest()
        if self._batched:
            queue = self._queue(web, frozenset(kwargs))
            call = queue.submit((request, kwargs), {})
            assert isinstance(call, UnaryCall)
            return await call.future
        return await self._invoke((request,) if self._takes_request else (), kwargs)

    def _queue(self, web: bool, keywords: frozenset[str]) -> BatchQueue:
        key = (web, keywords)
        queue = self._queues.get(key)
        if queue is None:
            async def run(requests: list[Any], calls: list[dict[str, Any]]) -> Any:
                return await self._run_batch(web, keywords, requests, calls)

            queue = self._queues[key] = BatchQueue(run, _BATCH_SIGNATURE, self._settings,
                                                   streams=False)
        return queue

    async def _run_batch(self, web: bool, keywords: frozenset[str], requests: list[Any],
                         calls: list[dict[str, Any]]) -> Any:
        # A batch runs in a context of its own (batch_queue.py): it says where it came from.
        _web.set(web)
        columns = {name: [call[name] for call in calls] for name in keywords}
        return await self._invoke((requests,) if self._takes_request else (), columns)

    async def _invoke(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run the user's code: coroutines on the loop, plain functions in a worker thread
        (in a copy of this context, so `serve.context.web` holds there too)."""
        if inspect.iscoroutinefunction(self._entry):
            return await self._entry(*args, **kwargs)
        result = await asyncio.to_thread(self._entry, *args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
        return result

    def __repr__(self) -> str:
        return f"Backend({self.target!r})"


def _takes_positional(fn: Callable[..., Any]) -> bool:
    """Whether `fn` takes the request as a positional argument, as 0.8 backends do."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
               for p in parameters)
