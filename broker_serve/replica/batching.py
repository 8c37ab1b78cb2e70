"""`@serve.batch`: callers pass one item each; the function receives them as a list.

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def predict(self, inputs: list[str]) -> list[str]: ...

    result = await self.predict("one input")

A batch is sent when it holds `max_batch_size` items, or `batch_wait_timeout_s` after its first
item arrived. An exception raised for a batch reaches every caller in it, and a caller that is
cancelled while waiting is dropped from its batch. Works on methods and plain functions, called
from HTTP handlers or handles alike; the queue lives in the replica process, one per instance.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from ..observability import metrics
from .owner_state import OwnerState


class _BatchQueue:
    def __init__(self, call: Callable[[list[Any]], Awaitable[list[Any]]], max_batch_size: int,
                 timeout_s: float) -> None:
        self._call = call
        self._max = max_batch_size
        self._timeout_s = timeout_s
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._sizes = metrics.replica_child("batch_size")  # None outside a replica

    async def submit(self, item: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if len(self._pending) >= self._max:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._timeout_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # Callers cancelled while waiting are dropped, not computed.
        live = [(item, future) for item, future in self._pending if not future.done()]
        batch, self._pending = live[:self._max], live[self._max:]
        if batch:
            if self._sizes is not None:
                self._sizes.observe(len(batch))
            task = asyncio.ensure_future(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        if self._pending:
            self._timer = asyncio.get_running_loop().call_later(self._timeout_s, self._flush)

    async def _run(self, batch: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._call([item for item, _ in batch])
            if not isinstance(results, list) or len(results) != len(batch):
                raise TypeError(
                    f"a @serve.batch function must return a list as long as its input "
                    f"({len(batch)}), got {type(results).__name__}"
                    + (f" of {len(results)}" if isinstance(results, list) else ""))
        except Exception as exc:  # noqa: BLE001 - user code: every caller gets its error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)


def batch(_func: Callable[..., Any] | None = None, *, max_batch_size: int = 10,
          batch_wait_timeout_s: float = 0.01) -> Any:
    """Turn an async function of a list into one that callers call with single items."""
    if max_batch_size < 1:
        raise ValueError("max_batch_size must be at least 1")
    if batch_wait_timeout_s < 0:
        raise ValueError("batch_wait_timeout_s must not be negative")

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        queues = OwnerState("batch", func, lambda call: _BatchQueue(
            call, max_batch_size, batch_wait_timeout_s))

        @functools.wraps(func)
        async def single(*args: Any) -> Any:
            queue, (item,) = queues.split(single, args)
            return await queue.submit(item)

        return single

    return decorate(_func) if _func is not None else decorate
