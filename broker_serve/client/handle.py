"""Deployment handles: call a deployment's methods from a driver or from another replica.

A call is one `call` message on the deployment's queue (docs/protocol.md); its reply events come
back on this process's single reply queue. A call with a deadline (`relative_slo_ms`,
`absolute_slo_ms`, or inherited from the request that makes it) gives up by itself when it
passes, and cancels the callee (docs/architecture.md, "Deadlines and ordering").
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

from ..config import RetryWait
from ..context import _request_id
from ..exceptions import (
    BackPressureError,
    RayServeException,
    RequestCancelledError,
    RequestTimeoutError,
)
from ..observability import tracing
from ..protocol import deadlines, messages, priorities
from ..protocol import jobs as job_protocol
from ..protocol.call_values import carries_value, pack_call, unpack_value
from ..protocol.remote_errors import raised_for
from ..transport.broker import ReplyEvents
from . import jobs
from .jobs import Job, JobOptions
from .runtime import Runtime, current_runtime, get_runtime

_DONE = object()

# The handle calls made while a replica handles one request, so that cancelling the request
# cancels them too. Each request runs in its own task, so this is per request.
calls_of_current_request: contextvars.ContextVar[list[_Call] | None] = contextvars.ContextVar(
    "broker_serve_calls_of_current_request", default=None)
# The deadline (Unix ms) of the request a replica is handling, set by the replica: a handle call
# made while handling it has the earlier of this and its own.
deadline_of_current_request: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "broker_serve_deadline_of_current_request", default=None)


class DeploymentHandle:
    """A handle to one deployment. `.remote()` calls it; `.options()` changes how."""

    def __init__(self, deployment_name: str | None, app_name: str, *,
                 method_name: str = "__call__",
                 stream: bool = False, multiplexed_model_id: str = "",
                 relative_slo_ms: float | None = None,
                 absolute_slo_ms: float | None = None,
                 priority: int | None = None) -> None:
        self.deployment_name = deployment_name
        self.app_name = app_name
        self.method_name = method_name
        self.stream = stream
        self.multiplexed_model_id = multiplexed_model_id
        # Ray Serve 0.8's deadlines: each call's is its time plus relative_slo_ms, or the
        # Unix time absolute_slo_ms (in milliseconds, as time.time() * 1000).
        if relative_slo_ms is not None and absolute_slo_ms is not None:
            raise ValueError("give relative_slo_ms or absolute_slo_ms, not both")
        self.relative_slo_ms = deadlines.checked_slo("relative_slo_ms", relative_slo_ms)
        self.absolute_slo_ms = deadlines.checked_slo("absolute_slo_ms", absolute_slo_ms)
        # The calls' AMQP priority, 0 to 9 (docs/protocol.md, "Priorities"); None: the
        # deadline's under order_by_deadline, else 0.
        self.priority = None if priority is None else priorities.checked(priority)
        # A handle from get_app_handle inside a replica learns its app's ingress on its first
        # call and keeps it, so later calls cost no Redis round trip.
        self.resolved_ingress: str | None = None
        # How `submit` runs its jobs (options(max_retries=, retry_wait=, ...)).
        self.job_options = JobOptions()

    def options(self, *, method_name: str | None = None, stream: bool | None = None,
                multiplexed_model_id: str | None = None,
                use_new_handle_api: bool | None = None,
                relative_slo_ms: float | None = None,
                absolute_slo_ms: float | None = None,
                priority: int | None = None,
                max_retries: int | None = None,
                retry_wait: RetryWait | dict[str, Any] | None = None,
                deadline_s: float | None = None,
                result_ttl_s: int | None = None) -> DeploymentHandle:
        """A handle that calls differently. An SLO given here replaces the handle's, of
        either kind; giving both is a ValueError. `priority` (0 to 9, higher first) is for
        calls and jobs alike. `max_retries`, `retry_wait` (tenacity's
        vocabulary, docs/protocol.md), `deadline_s` and `result_ttl_s` are for `submit`'s
        jobs, and override the deployment's job_config."""
        if relative_slo_ms is None and absolute_slo_ms is None:
            relative_slo_ms, absolute_slo_ms = self.relative_slo_ms, self.absolute_slo_ms
        job_options = self.job_options.replaced(
            priority=priority, max_retries=max_retries, retry_wait=retry_wait,
            deadline_s=deadline_s, result_ttl_s=result_ttl_s)
        return self._with_job_options(job_options, DeploymentHandle(
            self.deployment_name, self.app_name,
            method_name=method_name if method_name is not None else self.method_name,
            stream=stream if stream is not None else self.stream,
            multiplexed_model_id=(multiplexed_model_id if multiplexed_model_id is not None
                                  else self.multiplexed_model_id),
            relative_slo_ms=relative_slo_ms, absolute_slo_ms=absolute_slo_ms,
            priority=priority if priority is not None else self.priority,
        ))

    @staticmethod
    def _with_job_options(options: JobOptions, handle: DeploymentHandle) -> DeploymentHandle:
        handle.job_options = options
        return handle

    def __getattr__(self, name: str) -> DeploymentHandle:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.options(method_name=name)

    def remote(self, *args: Any, **kwargs: Any) -> DeploymentResponse | DeploymentResponseGenerator:
        runtime = current_runtime() or get_runtime()
        call = _Call(runtime, self, args, kwargs)
        if self.stream:
            return DeploymentResponseGenerator(call)
        return DeploymentResponse(call)

    def submit(self, *args: Any, **kwargs: Any) -> Job:
        """Submit the call as a job (docs/architecture.md, "Jobs"): it runs whether or not
        anyone waits, and its result is kept. Returns at once; the job is published in the
        background, and the Job's methods wait for the broker's confirm first."""
        runtime = current_runtime() or get_runtime()
        runtime.refuse_unsupported("jobs (`handle.submit`)")
        job_id = job_protocol.new_job_id()
        submitting = _submit_call(runtime, self, job_id, args, kwargs)
        publishing: asyncio.Future[str] | concurrent.futures.Future[str] = (
            asyncio.run_coroutine_threadsafe(submitting, runtime.loop)
            if not runtime.in_loop_thread() else asyncio.ensure_future(submitting))
        return Job(job_id, publishing)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_handle, (self.deployment_name, self.app_name, self.method_name,
                                  self.stream, self.multiplexed_model_id,
                                  self.relative_slo_ms, self.absolute_slo_ms,
                                  tuple(self.job_options), self.priority))

    def __repr__(self) -> str:
        return f"DeploymentHandle(deployment={self.deployment_name!r}, app={self.app_name!r})"


def _rebuild_handle(deployment: str, app: str, method: str, stream: bool, model_id: str,
                    relative_slo_ms: float | None = None,
                    absolute_slo_ms: float | None = None,
                    job_options: tuple[Any, ...] = (),
                    priority: int | None = None) -> DeploymentHandle:
    handle = DeploymentHandle(deployment, app, method_name=method, stream=stream,
                              multiplexed_model_id=model_id, relative_slo_ms=relative_slo_ms,
                              absolute_slo_ms=absolute_slo_ms, priority=priority)
    handle.job_options = JobOptions(*job_options)
    return handle


class _Call:
    """One in-flight call: publishes on first use and yields decoded results."""

    def __init__(self, runtime: Runtime, handle: DeploymentHandle, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self.runtime = runtime
        self.handle = handle
        self.args = args
        self.kwargs = kwargs
        self.request_id = runtime.next_request_id()
        # Read here, in the caller's context: a sync method's call runs in a worker thread.
        self.parent_request_id = _request_id.get()
        self.deadline_ms = deadlines.earlier(
            deadlines.from_slo(handle.relative_slo_ms, handle.absolute_slo_ms,
                               deadlines.now_ms()),
            deadline_of_current_request.get())
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.started = False  # set by _run's first step; a call cancelled before has none
        self.published = False
        # Per call, not on the shared handle: a handle from get_app_handle inside a replica
        # learns its ingress only when called.
        self.deployment_name = handle.deployment_name
        self.queue = ""
        self.chosen: str | None = None  # the replica whose affinity queue the call went to
        traces = tracing.traces
        # A child of the caller's current span, so started here, in the caller's context.
        self.span = None if traces is None else traces.handle_call(
            handle.app_name, handle.deployment_name, handle.method_name, self.request_id)
        made_by = calls_of_current_request.get()
        if made_by is not None:
            made_by.append(self)
        self.task: concurrent.futures.Future[None] | asyncio.Task[None] = (
            asyncio.run_coroutine_threadsafe(self._run(), runtime.loop)
            if not runtime.in_loop_thread()
            else asyncio.ensure_future(self._run())
        )

    async def _run(self) -> None:
        self.started = True
        runtime = self.runtime
        events = runtime.router.register(self.request_id)
        # Only a call with a deadline pays for a timer.
        timer = None if self.deadline_ms is None else asyncio.timeout_at(self._deadline_on_loop())
        try:
            if timer is None:
                await self._exchange(events)
            else:
                async with timer:
                    await self._exchange(events)
        except asyncio.CancelledError:
            if self.published:  # stop the callee too, wherever it runs or waits
                self._cancel_callee()
            self.items.put_nowait(RequestCancelledError(
                f"request {self.request_id} was cancelled",
                deployment=f"{self.handle.app_name}/{self.deployment_name}"))
            self._end_span(499, "RequestCancelledError")
            raise
        # User arguments may raise anything: the response does.
        except Exception as exc:  # noqa: BLE001
            expired = timer is not None and timer.expired()
            self.items.put_nowait(self._timed_out() if expired else exc)
            self._end_span(408 if expired else 500,
                           "RequestTimeoutError" if expired else type(exc).__name__)
        finally:
            if self.chosen is not None:
                runtime.affinity.done(self.queue, self.chosen)
            runtime.router.unregister(self.request_id)
            self.items.put_nowait(_DONE)
            if self.span is not None:
                self.span.end(200)  # unless it ended already, with an error

    async def _exchange(self, events: ReplyEvents) -> None:
        if self.deployment_name is None:
            self.deployment_name = self.handle.resolved_ingress or await self._ingress()
            self.handle.resolved_ingress = self.deployment_name
            if self.span is not None:
                self.span.rename(f"call {self.handle.app_name}/{self.deployment_name}."
                                 f"{self.handle.method_name}")
                self.span.set("broker_serve.deployment", self.deployment_name)
        await self._publish(events)
        await self._receive(events)

    def _deadline_on_loop(self) -> float:
        """The call's deadline in the loop's clock."""
        assert self.deadline_ms is not None
        return self.runtime.loop.time() + (self.deadline_ms - deadlines.now_ms()) / 1000

    def _timed_out(self) -> RequestTimeoutError:
        """The deadline passed: a callee that has the call must not run it, or must stop."""
        if self.published:
            self._cancel_callee()
        return RequestTimeoutError(
            f"request {self.request_id} passed its deadline before "
            f"{self.handle.app_name}/{self.deployment_name} answered it",
            deployment=f"{self.handle.app_name}/{self.deployment_name}")

    async def _ingress(self) -> str:
        try:
            return await self.runtime.ingress_of(self.handle.app_name)
        except ValueError as exc:
            raise RayServeException(str(exc)) from None

    async def _publish(self, events: ReplyEvents) -> None:
        """Publish the call message: with a broker confirm if the deployment's queue is
        bounded or durable (retried across lost connections), else to the affinity queue of
        a replica holding the call's model, if known."""
        runtime, handle, deployment = self.runtime, self.handle, self.deployment_name
        assert deployment is not None
        # A failed argument or an unpicklable one fails the response.
        args = [await _resolve(a) for a in self.args]
        kwargs = {k: await _resolve(v) for k, v in self.kwargs.items()}
        payload = {"method": handle.method_name, **pack_call(tuple(args), kwargs, runtime.secret)}
        model_id = handle.multiplexed_model_id
        if model_id:
            payload["multiplexed_model_id"] = model_id
        delivery = await runtime.delivery(handle.app_name, deployment)
        message = self._message(messages.pack(payload), ordered=delivery.ordered)
        self.queue = message["routing_key"]
        bounded, durable = delivery.bounded, delivery.durable
        if bounded or durable:
            # A full bounded queue refuses the call, and the caller must hear it.
            self.published = True  # a cancel from now on must reach it
            self.published = await runtime.broker.publish_request(
                message.pop("routing_key"), message.pop("body"), bounded=bounded,
                durable=durable, events=events, deadline_ms=self.deadline_ms, **message)
            if not self.published:
                raise BackPressureError(
                    f"deployment {handle.app_name}/{deployment} has "
                    "max_queued_requests waiting already; retry later",
                    deployment=f"{handle.app_name}/{deployment}")
            return
        if model_id and runtime.affinity.knows(self.queue):
            self.chosen = runtime.affinity.pick(self.queue, model_id)
            if self.chosen is not None:
                message["routing_key"] = runtime.names.affinity_queue(self.chosen)
        self.published = True
        await runtime.broker.publish(**message)

    def _message(self, body: bytes, *, ordered: bool) -> dict[str, Any]:
        """The call message's properties; with a deadline, its expiration too; its priority
        (`ordered`: the deployment has order_by_deadline) if it has one."""
        runtime, deadline = self.runtime, self.deadline_ms
        assert self.deployment_name is not None
        message: dict[str, Any] = {
            "routing_key": runtime.names.request_queue(self.handle.app_name,
                                                       self.deployment_name),
            "body": body, "type": messages.KIND_CALL, "correlation_id": self.request_id,
            "reply_to": runtime.router.queue_name,
            "headers": messages.request_headers(deadline, published_us=messages.now_us(),
                                                request_id=self.parent_request_id),
            "mandatory": True,
        }
        if self.span is not None:
            self.span.inject(message["headers"])
        remaining = None
        if deadline is not None:
            remaining = deadline - deadlines.now_ms()
            if remaining <= 0:  # never published, so it never runs
                raise self._timed_out()
            message["expiration"] = deadlines.expiration(remaining)
        priority = priorities.of_request(self.handle.priority, ordered, remaining)
        if priority:
            message["priority"] = priority
        return message

    async def _receive(self, events: ReplyEvents) -> None:
        """Hand the call's results to its response, up to the last one or an error."""
        kind, event = await events.get()
        # The first event tells which models the replica that took the call holds.
        if self.chosen is not None or "models" in event:
            self.runtime.affinity.observe(self.queue, self.chosen, event)
        while not self._take(kind, event):
            kind, event = await events.get()

    def _take(self, kind: str, event: dict[str, Any]) -> bool:
        """Queue what one reply event carries; True if it ends the call."""
        if kind == messages.ERROR:
            self.items.put_nowait(self._error(event))
            self._end_span(int(event.get("status") or 500), str(event.get("error") or "Error"))
            return True
        if kind != messages.RESULT:
            return False
        if carries_value(event):
            self.items.put_nowait(unpack_value(event, self.runtime.secret))
        return not event.get("more", False)

    def _end_span(self, status: int, error: str) -> None:
        if self.span is not None:
            self.span.end(status, error=error)

    def _cancel_callee(self) -> None:
        self.runtime.cancel_requests([self.request_id])

    def _error(self, event: dict[str, Any]) -> RayServeException:
        # Also an instance of the class the callee raised, where this process can rebuild it.
        return raised_for(event, deployment=f"{self.handle.app_name}/{self.deployment_name}",
                          secret=self.runtime.secret)

    async def next_item(self) -> Any:
        item = await self.items.get()
        if isinstance(item, BaseException):
            self.items.put_nowait(_DONE)
            raise item
        return item

    def cancel(self) -> None:
        # A concurrent future from run_coroutine_threadsafe passes the cancel on to its task.
        self.task.cancel()
        # Cancelled before its first step, _run never runs, nor its handlers: end it here.
        self.runtime.loop.call_soon_threadsafe(self._end_if_never_started)

    def _end_if_never_started(self) -> None:
        if self.started:
            return
        self.started = True
        self.items.put_nowait(RequestCancelledError(
            f"request {self.request_id} was cancelled",
            deployment=f"{self.handle.app_name}/{self.deployment_name}"))
        self.items.put_nowait(_DONE)
        self._end_span(499, "RequestCancelledError")


class DeploymentResponse:
    """The future result of a unary call. Await it in async code, `.result()` in sync code."""

    def __init__(self, call: _Call) -> None:
        self._call = call
        self._outcome: asyncio.Future[Any] | None = None

    async def _get(self) -> Any:
        # One reader of the call's items; every awaiter (chained calls, a retried .result())
        # shares its outcome, value or exception.
        if self._outcome is None:
            self._outcome = asyncio.ensure_future(self._call.next_item())
        try:
            item = await asyncio.shield(self._outcome)
        except asyncio.CancelledError:
            self._call.cancel()  # the awaiting request was cancelled: so is this call
            raise
        return None if item is _DONE else item

    def __await__(self) -> Any:
        if not self._call.runtime.in_loop_thread():
            # Another loop's code (an async test, a driver's asyncio.run): the runtime's loop
            # reads the call, this one waits for it.
            return _on_runtime_loop(self._call.runtime, self._get()).__await__()
        return self._get().__await__()

    def result(self, *, timeout_s: float | None = None) -> Any:
        _refuse_in_event_loop("await response")
        return self._call.runtime.run_sync(self._get(), timeout_s)

    def cancel(self) -> None:
        self._call.cancel()

    @property
    def request_id(self) -> str:
        return self._call.request_id


class DeploymentResponseGenerator:
    """The results of a streaming call (`handle.options(stream=True)`), as they are produced."""

    def __init__(self, call: _Call) -> None:
        self._call = call

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        runtime = self._call.runtime
        item = await (self._call.next_item() if runtime.in_loop_thread()
                      else _on_runtime_loop(runtime, self._call.next_item()))
        if item is _DONE:
            self._call.items.put_nowait(_DONE)
            raise StopAsyncIteration
        return item

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        _refuse_in_event_loop("async for")
        item = self._call.runtime.run_sync(self._call.next_item())
        if item is _DONE:
            self._call.items.put_nowait(_DONE)
            raise StopIteration
        return item

    def cancel(self) -> None:
        self._call.cancel()


def _on_runtime_loop(runtime: Runtime, coro: Coroutine[Any, Any, Any]) -> asyncio.Future[Any]:
    """`coro` run on the runtime's loop, awaitable from the running one; cancelling the wait
    cancels it there."""
    return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, runtime.loop))


def _refuse_in_event_loop(instead: str) -> None:
    """A blocking wait inside a running event loop would stall it, or deadlock on the
    runtime's own loop: refused with Ray's message."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError("Sync methods should not be called from within an `asyncio` event "
                       f"loop. Use `{instead}` instead.")


async def _submit_call(runtime: Runtime, handle: DeploymentHandle, job_id: str,
                       args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Publish a call as a job: its arguments resolved (chaining), packed as a call's."""
    deployment = handle.deployment_name or handle.resolved_ingress
    if deployment is None:
        try:
            deployment = handle.resolved_ingress = await runtime.ingress_of(handle.app_name)
        except ValueError as exc:
            raise RayServeException(str(exc)) from None
    resolved = [await _resolve(a) for a in args]
    named = {k: await _resolve(v) for k, v in kwargs.items()}
    payload = {"method": handle.method_name, **pack_call(tuple(resolved), named, runtime.secret)}
    if handle.multiplexed_model_id:
        payload["multiplexed_model_id"] = handle.multiplexed_model_id
    return await jobs.submit(runtime.broker, runtime.store, runtime.job_defaults,
                             handle.app_name, deployment, messages.KIND_CALL,
                             messages.pack(payload), handle.job_options,
                             method=handle.method_name, request_id=_request_id.get(),
                             job_id=job_id)


async def _resolve(value: Any) -> Any:
    """A response passed as an argument is resolved before the call is sent (chaining)."""
    if isinstance(value, DeploymentResponse):
        return await value._get()
    return value
