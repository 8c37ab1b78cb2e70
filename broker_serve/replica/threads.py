"""Running a replica's sync user code in worker threads.

`loop.run_in_executor` goes through concurrent.futures: a Future with its Condition, a work
item, the executor's locks and idle semaphore, and two chained callbacks, about 12 us a call on
this machine, which is a tenth of a sync no-op request. Here a call is a tuple on a SimpleQueue,
and the worker settles the caller's asyncio future with one `call_soon_threadsafe`: about 3 us
(docs/performance.md). Threads start as calls need them, up to `max_threads`; calls beyond
that wait their turn. The threads are daemons: a handler stuck in a thread does not keep a
stopping replica alive.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_Call = tuple[asyncio.AbstractEventLoop, "asyncio.Future[Any]", contextvars.Context,
              Callable[..., Any], tuple[Any, ...]]


class ThreadRunner:
    def __init__(self, max_threads: int, name: str = "user") -> None:
        self.max_threads = max_threads
        self._name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # released by each thread waiting for a call
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` in a worker thread, in a copy of the caller's context (contextvars).
        Cancelling the caller does not stop the thread; its result is then dropped."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((loop, future, contextvars.copy_context(), fn, args))
        if not self._idle.acquire(blocking=False):
            self._start_thread()
        return await future

    def _start_thread(self) -> None:
        with self._lock:
            if len(self._threads) >= self.max_threads:
                return  # the call waits for a thread to finish its current one
            thread = threading.Thread(target=self._work, daemon=True,
                                      name=f"{self._name}-{len(self._threads)}")
            self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            loop, future, context, fn, args = call
            del call
            try:
                result = context.run(fn, *args)
            # Handed to the caller, as an executor does.
            except BaseException as exc:  # noqa: BLE001
                del context, fn, args
                loop.call_soon_threadsafe(_fail, future, exc)
                del exc
            else:
                # Dropped before the caller resumes, not after: what the call held (an evicted
                # model whose __del__ ran here, say) is free once the caller sees the result.
                del context, fn, args
                loop.call_soon_threadsafe(_succeed, future, result)
                del result
            del future  # hold nothing while idle
            self._idle.release()

    def shutdown(self) -> None:
        """Let idle threads end; threads still running user code end when it returns."""
        for _ in range(len(self._threads)):
            self._calls.put(None)


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # the caller may have been cancelled meanwhile
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
