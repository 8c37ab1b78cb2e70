"""The queue behind one `@serve.batch` function of one instance: it groups callers into
batches, runs them, and hands each caller its own result (or its own stream).

- **Batches.** A caller joins the newest batch of its multiplexed model id, so a batch never
  mixes models. A batch is ready when it is full (`max_batch_size` callers, or a
  `batch_size_fn` total that the next caller would overflow) or `batch_wait_timeout_s` after
  it was opened. It takes the size and the timeout in force when it opened, so the setters
  change the batches that open afterwards. A ready batch starts once fewer than
  `max_concurrent_batches` batches of this queue run (across all model ids, oldest first);
  until then it keeps taking callers up to its size.
- **Arguments.** Each call is bound to the function's signature. The function gets, per
  parameter that any caller passed, the list of the callers' values, in the batch's order (a
  caller that left it out adds the default); a parameter nobody passed keeps its default.
- **Cancellation.** A caller that stops listening (cancelled, or its stream closed) leaves a
  forming batch at once; once every caller of a running batch has stopped, the batch's task is
  cancelled, so no work is done for nobody.
- **Context.** A batch runs in a fresh context whose multiplexed model id is the batch's:
  cancelling the caller that happened to start it must not cancel the handle calls the batch
  makes for everyone.
"""

from __future__ import annotations

import abc
import asyncio
import contextvars
import inspect
import itertools
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, Protocol, cast

from ..exceptions import RayServeException
from ..observability import metrics
from . import multiplex

log = logging.getLogger("broker_serve.batching")

_ITEM, _END, _ERROR = range(3)


class Settings(Protocol):
    """What a queue reads from its decorator at each batch (`batching._Settings`)."""

    max_batch_size: int
    batch_wait_timeout_s: float
    max_concurrent_batches: int
    batch_size_fn: Callable[[list[Any]], int] | None


class Call(abc.ABC):
    """One caller's place in a batch: its bound arguments and model id."""

    def __init__(self, queue: BatchQueue, arguments: dict[str, Any], model_id: str) -> None:
        self.queue = queue
        self.arguments = arguments
        self.model_id = model_id
        self.batch: _Batch | None = None

    @property
    def item(self) -> Any:
        """What `batch_size_fn` measures: the value of the first parameter."""
        return next(iter(self.arguments.values()), None)

    @property
    @abc.abstractmethod
    def done(self) -> bool:
        """Whether the caller takes nothing more (answered, failed, ended or gone)."""

    @abc.abstractmethod
    def deliver(self, value: Any) -> None:
        """The caller's result, or its next item."""

    @abc.abstractmethod
    def fail(self, error: BaseException) -> None:
        """The batch failed (or was cancelled): the caller raises `error`."""


class UnaryCall(Call):
    """A caller awaiting one result."""

    def __init__(self, queue: BatchQueue, arguments: dict[str, Any], model_id: str) -> None:
        super().__init__(queue, arguments, model_id)
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.future.add_done_callback(self._settled)

    def _settled(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():  # the caller was cancelled while it waited
            self.queue.abandon(self)

    @property
    def done(self) -> bool:
        return self.future.done()

    def deliver(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def fail(self, error: BaseException) -> None:
        if self.future.done():
            return
        if isinstance(error, asyncio.CancelledError):
            self.future.cancel()
        else:
            self.future.set_exception(error)


class StreamCall(Call):
    """A caller iterating its own items of a batched async generator."""

    def __init__(self, queue: BatchQueue, arguments: dict[str, Any], model_id: str) -> None:
        super().__init__(queue, arguments, model_id)
        self._events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def deliver(self, value: Any) -> None:
        if not self._done:
            self._events.put_nowait((_ITEM, value))

    def end(self) -> None:
        if not self._done:
            self._done = True
            self._events.put_nowait((_END, None))

    def fail(self, error: BaseException) -> None:
        if not self._done:
            self._done = True
            self._events.put_nowait((_ERROR, error))

    async def items(self) -> AsyncIterator[Any]:
        """The caller's stream. Closing it early (or cancelling a wait) stops listening."""
        try:
            while True:
                kind, value = await self._events.get()
                if kind == _ITEM:
                    yield value
                elif kind == _END:
                    return
                else:
                    raise value
        finally:
            if not self._done:
                self._done = True
                self.queue.abandon(self)


class _Batch:
    """Callers of one model id that go to the function together."""

    def __init__(self, model_id: str, limit: int, order: int) -> None:
        self.model_id = model_id
        self.limit = limit
        self.order = order  # batches start oldest first
        self.calls: list[Call] = []
        self.closed = False  # full: takes no more callers
        self.expired = False  # its wait is over
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self.closed or self.expired

    def close(self) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class BatchQueue:
    def __init__(self, call: Callable[..., Any], signature: inspect.Signature,
                 settings: Settings, streams: bool) -> None:
        self._call = call
        self._signature = signature
        self._settings = settings
        self._streams = streams
        self._sizes = metrics.replica_child("batch_size")  # None outside a replica
        self._order = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._forming: dict[str, deque[_Batch]] = {}  # by model id, oldest first
        self._running: set[_Batch] = set()

    def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Call:
        """Queue one call; raises TypeError if the arguments do not fit the signature."""
        arguments = self._signature.bind(*args, **kwargs).arguments
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("a @serve.batch function must be called in a running event "
                               "loop (from async code)") from None
        if loop is not self._loop:
            # A function decorated at import may serve several `asyncio.run`s in turn; what
            # waited in a loop that is gone can never run.
            self._loop, self._forming, self._running = loop, {}, set()
        kind = StreamCall if self._streams else UnaryCall
        call = kind(self, arguments, multiplex.get_multiplexed_model_id())
        self._place(call)
        self._dispatch()
        return call

    def _size(self, calls: list[Call]) -> int:
        size_fn = self._settings.batch_size_fn
        return len(calls) if size_fn is None else size_fn([call.item for call in calls])

    def _place(self, call: Call) -> None:
        batches = self._forming.get(call.model_id)
        newest = batches[-1] if batches else None
        if newest is not None and not newest.closed:
            size = self._size([*newest.calls, call])
            if size <= newest.limit:
                self._join(newest, call, size)
                return
        limit = self._settings.max_batch_size
        size = self._size([call])
        if size > limit:
            raise RuntimeError("Size of item is greater than max_batch_size. Please increase "
                               "the max_batch_size or check the implementation of the "
                               "batch_size_fn.")
        if newest is not None:
            newest.close()  # the caller did not fit: the batch is as full as it gets
        batch = _Batch(call.model_id, limit, next(self._order))
        self._forming.setdefault(call.model_id, deque()).append(batch)
        timeout = self._settings.batch_wait_timeout_s
        if not math.isinf(timeout):
            assert self._loop is not None
            batch.timer = self._loop.call_later(timeout, self._expire, batch)
        self._join(batch, call, size)

    @staticmethod
    def _join(batch: _Batch, call: Call, size: int) -> None:
        call.batch = batch
        batch.calls.append(call)
        if size >= batch.limit:
            batch.close()

    def _expire(self, batch: _Batch) -> None:
        batch.timer = None
        batch.expired = True
        if self._forming_now(batch):
            self._dispatch()

    def _forming_now(self, batch: _Batch) -> bool:
        """False for a batch of a loop that was replaced."""
        return batch in self._forming.get(batch.model_id, ())

    def _dispatch(self) -> None:
        while len(self._running) < self._settings.max_concurrent_batches:
            heads = [batches[0] for batches in self._forming.values() if batches[0].ready]
            if not heads:
                return
            self._start(min(heads, key=lambda batch: batch.order))

    def _start(self, batch: _Batch) -> None:
        self._drop(batch)
        batch.close()
        context = contextvars.Context()
        context.run(multiplex._set_model_id, batch.model_id)
        assert self._loop is not None
        batch.task = self._loop.create_task(self._run(batch), context=context)
        self._running.add(batch)
        batch.task.add_done_callback(partial(self._finished, batch))

    def _drop(self, batch: _Batch) -> None:
        """Take a batch out of the forming ones."""
        batches = self._forming[batch.model_id]
        batches.remove(batch)
        if not batches:
            del self._forming[batch.model_id]  # model ids come and go: keep no empty entry

    def _finished(self, batch: _Batch, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("a @serve.batch task failed", exc_info=task.exception())
        if batch in self._running:  # not from a loop that was replaced
            self._running.discard(batch)
            self._dispatch()

    def abandon(self, call: Call) -> None:
        """`call` stopped listening: leave its forming batch, or stop a batch nobody awaits."""
        batch = call.batch
        if batch is None:
            return
        if batch.task is None:
            if not self._forming_now(batch):
                return
            batch.calls.remove(call)
            if not batch.calls:
                batch.close()
                self._drop(batch)
        elif not batch.task.done() and all(other.done for other in batch.calls):
            batch.task.cancel()

    async def _run(self, batch: _Batch) -> None:
        calls = batch.calls
        if self._sizes is not None:
            self._sizes.observe(len(calls))
        try:
            args, kwargs = batched_arguments(self._signature, [c.arguments for c in calls])
            if self._streams:
                await _stream(self._call(*args, **kwargs), cast(list[StreamCall], calls))
            else:
                results = await self._call(*args, **kwargs)
                _check_length(results, len(calls))
                for call, result in zip(calls, results, strict=True):
                    call.deliver(result)
        except asyncio.CancelledError:
            for call in calls:
                call.fail(asyncio.CancelledError())
            raise
        except Exception as exc:  # noqa: BLE001 - user code: every caller of the batch gets it
            for call in calls:
                call.fail(exc)


async def _stream(generator: Any, calls: list[StreamCall]) -> None:
    """Hand item i of each step to caller i; a `StopIteration` item ends that caller."""
    try:
        async for step in generator:
            _check_length(step, len(calls))
            for call, value in zip(calls, step, strict=True):
                if value is StopIteration or value is StopAsyncIteration:
                    call.end()
                else:
                    call.deliver(value)
            if all(call.done for call in calls):
                break  # nobody listens: generate no more
    finally:
        await generator.aclose()
    for call in calls:
        call.end()


def _check_length(results: Any, expected: int) -> None:
    try:
        length = len(results)
    except TypeError:
        raise TypeError(f"a @serve.batch function must return (or yield) a list with one "
                        f"result per caller, got {type(results).__name__}") from None
    if length != expected:
        raise RayServeException(
            f"Batched function doesn't preserve batch size. The input list has length "
            f"{expected} but the returned list has length {length}.")


def batched_arguments(signature: inspect.Signature, calls: list[dict[str, Any]]
                      ) -> tuple[list[Any], dict[str, Any]]:
    """The positional and keyword arguments of one batch: a list of values per parameter."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    skipped: list[Any] = []  # defaults of positional-only parameters nobody passed
    by_keyword = False  # a positional parameter was left out: the rest go by name
    for name, parameter in signature.parameters.items():
        kind = parameter.kind
        passed = any(name in call for call in calls)
        if kind is parameter.VAR_POSITIONAL:
            if passed:
                args.extend(_positional_columns(name, calls))
        elif kind is parameter.VAR_KEYWORD:
            if passed:
                kwargs.update(_keyword_columns(name, calls))
        elif not passed:
            if kind is parameter.POSITIONAL_ONLY:
                skipped.append(parameter.default)
            elif kind is parameter.POSITIONAL_OR_KEYWORD:
                by_keyword = True
        else:
            column = [call.get(name, parameter.default) for call in calls]
            if kind is parameter.KEYWORD_ONLY or by_keyword:
                kwargs[name] = column
            else:
                args.extend(skipped)
                skipped.clear()
                args.append(column)
    return args, kwargs


def _positional_columns(name: str, calls: list[dict[str, Any]]) -> list[list[Any]]:
    rows = [call.get(name, ()) for call in calls]
    if len({len(row) for row in rows}) != 1:
        raise TypeError(f"the callers of one batch must pass as many *{name} arguments each")
    return [list(column) for column in zip(*rows, strict=True)]


def _keyword_columns(name: str, calls: list[dict[str, Any]]) -> dict[str, list[Any]]:
    rows = [call.get(name, {}) for call in calls]
    keys = dict.fromkeys(key for row in rows for key in row)
    if any(row.keys() != keys.keys() for row in rows):
        raise TypeError(f"the callers of one batch must pass the same **{name} keywords")
    return {key: [row[key] for row in rows] for key in keys}
