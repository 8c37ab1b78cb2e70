"""Submitting jobs and reading them back (docs/architecture.md, "Jobs").

`submit` publishes a job message (docs/protocol.md, "The job message") persistent and
confirmed, then records it PENDING; the proxy's `Prefer: respond-async` and `handle.submit` both
go through it. `Job` is a job's id with the means to read its status and result, cancel it, and
wait for it, from any process that can reach Redis.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Coroutine
from typing import Any, NamedTuple, TypeVar

from ..config import RetryWait
from ..exceptions import (
    BackPressureError,
    BrokerServeError,
    RayServeException,
    RequestCancelledError,
)
from ..observability import tracing
from ..protocol import jobs, messages, priorities
from ..protocol.call_values import carries_value, unpack_value
from ..protocol.jobs import JobStatus
from ..protocol.remote_errors import raised_for
from ..state.store import Store
from ..transport.broker import Broker
from ..transport.cancellation import cancel as cancel_requests
from .job_defaults import JobDefaults
from .runtime import Runtime, current_runtime, get_runtime

log = logging.getLogger("broker_serve.client.jobs")

T = TypeVar("T")


class JobOptions(NamedTuple):
    """How one job runs; None: the deployment's job_config says."""

    priority: int = 0
    max_retries: int | None = None
    retry_wait: RetryWait | None = None
    deadline_s: float | None = None
    result_ttl_s: int | None = None

    def replaced(self, *, priority: int | None = None, max_retries: int | None = None,
                 retry_wait: RetryWait | dict[str, Any] | None = None,
                 deadline_s: float | None = None, result_ttl_s: int | None = None
                 ) -> JobOptions:
        """These options with the ones given (not None) in place, checked: ValueError."""
        if priority is not None:
            priority = priorities.checked(priority)
        if max_retries is not None:
            max_retries = jobs.checked_retries(max_retries)
        if isinstance(retry_wait, dict):
            retry_wait = RetryWait.model_validate(retry_wait)
        if deadline_s is not None and not (isinstance(deadline_s, (int, float))
                                           and 0 < deadline_s < float("inf")):
            raise ValueError(f"deadline_s must be a number of seconds > 0, got {deadline_s!r}")
        if result_ttl_s is not None:
            result_ttl_s = jobs.checked_ttl(result_ttl_s)
        return JobOptions(
            self.priority if priority is None else priority,
            self.max_retries if max_retries is None else max_retries,
            self.retry_wait if retry_wait is None else retry_wait,
            self.deadline_s if deadline_s is None else float(deadline_s),
            self.result_ttl_s if result_ttl_s is None else result_ttl_s)


async def submit(broker: Broker, store: Store, defaults: JobDefaults, app: str,
                 deployment: str, kind: str, body: bytes, options: JobOptions, *,
                 method: str | None = None, request_id: str | None = None,
                 job_id: str | None = None) -> str:
    """Publish a job and record it; its id. BackPressureError if the deployment's queue
    refused it (full, or gone), ClusterUnavailable if RabbitMQ did not confirm it."""
    config = await defaults.of(app, deployment)
    ttl_s = options.result_ttl_s or config.result_ttl_s
    job_id = job_id or jobs.new_job_id()
    submitted_ms = time.time_ns() // 1_000_000
    deadline_ms = (None if options.deadline_s is None
                   else submitted_ms + int(options.deadline_s * 1000))
    headers = {**messages.request_headers(deadline_ms, published_us=messages.now_us(),
                                          request_id=request_id),
               **jobs.job_headers(ttl_s, max_retries=options.max_retries,
                                  retry_wait=options.retry_wait)}
    queue = store.names.request_queue(app, deployment)
    traces = tracing.traces
    span = None if traces is None else traces.job_submit(app, deployment, job_id)
    if span is not None:
        span.inject(headers)
    try:
        # Mandatory: a job for a queue that does not exist comes back, and is refused here.
        published = await broker.publish_durably(
            queue, body, deadline_ms=None, type=kind, correlation_id=job_id,
            message_id=job_id, headers=headers, priority=options.priority, mandatory=True,
            refuse_returned=True)
    except BaseException as exc:
        if span is not None:
            span.end(error=type(exc).__name__)
        raise
    if span is not None:
        span.end(error=None if published else "BackPressureError")
    if not published:
        raise BackPressureError(f"the queue of {app}/{deployment} refused the job: it is full "
                                "(max_queued_requests) or the deployment is gone",
                                deployment=f"{app}/{deployment}")
    try:
        # After the publish: a replica that takes the job first has recorded it already.
        await store.jobs.submit(job_id, ttl_s, app=app, deployment=deployment, kind=kind,
                                method=method, priority=options.priority,
                                submitted_ms=submitted_ms, deadline_ms=deadline_ms,
                                max_retries=options.max_retries)
    except BrokerServeError as exc:  # the job is on its way; its replica records it
        log.warning("job %s is published but could not be recorded yet: %s", job_id, exc)
    return job_id


def view(job_id: str, record: dict[str, bytes]) -> dict[str, Any]:
    """A job's record as `GET /-/jobs/<id>` shows it (docs/protocol.md, "Jobs over HTTP"). A
    PENDING job past its deadline shows as FAILED: it will never start."""
    text = {k: v.decode(errors="replace") for k, v in record.items() if k != "result"}

    def number(name: str) -> int | None:
        value = text.get(name)
        return int(value) if value else None

    def seconds(name: str) -> float | None:
        value = number(name)
        return None if value is None else value / 1000

    status = text.get("status", JobStatus.PENDING.value)
    error, message = text.get("error") or None, text.get("message") or None
    deadline = number("deadline_ms")
    if (status == JobStatus.PENDING.value and deadline is not None
            and deadline < time.time() * 1000):
        status, error = JobStatus.FAILED.value, "DeadlineExceeded"
        message = "the job's deadline passed before it could start"
    return {
        "id": job_id, "status": status, "app": text.get("app"),
        "deployment": text.get("deployment"), "kind": text.get("kind"),
        "method": text.get("method"), "priority": number("priority") or 0,
        "attempts": number("attempts") or 0, "max_retries": number("max_retries"),
        "replays": number("replays") or 0, "replica": text.get("replica"),
        "error": error, "message": message,
        "submitted_at": seconds("submitted_ms"), "started_at": seconds("started_ms"),
        "finished_at": seconds("finished_ms"), "retry_at": seconds("retry_at_ms"),
        "deadline_at": seconds("deadline_ms"),
    }


def result_events(record: dict[str, bytes]) -> list[tuple[str, dict[str, Any]]]:
    """The reply events a finished job stored (docs/protocol.md, "The job record")."""
    raw = record.get("result")
    if not raw:
        return []
    return [(str(kind), fields) for kind, fields in messages.unpack(raw)]


class JobError(RayServeException):
    """A job ended without a result to give: it failed in a way that raised nothing (a
    deadline, its replicas dying), or its record has no result."""


class Job:
    """A submitted job: `job.id`, `job.status()`, `job.result(timeout_s=)`, `job.cancel()`.

    Its methods block; inside an event loop, await their `_async` forms. A job from
    `handle.submit` is published in the background: its methods first wait for the broker's
    confirm, and raise what refused the job."""

    def __init__(self, job_id: str,
                 publishing: asyncio.Future[Any] | concurrent.futures.Future[Any] | None = None
                 ) -> None:
        self.id = job_id
        self._publishing = publishing

    def __repr__(self) -> str:
        return f"Job(id={self.id!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Job, (self.id,))

    # blocking forms -------------------------------------------------------------------------
    def status(self) -> JobStatus:
        return _blocking(self.status_async())

    def info(self) -> dict[str, Any]:
        return _blocking(self.info_async())

    def result(self, *, timeout_s: float | None = None) -> Any:
        return _blocking(self.result_async(timeout_s=timeout_s))

    def cancel(self) -> JobStatus:
        return _blocking(self.cancel_async())

    # async forms ----------------------------------------------------------------------------
    async def published(self) -> None:
        """Wait until the broker confirmed the job; raise what refused it."""
        publishing = self._publishing
        if publishing is None:
            return
        if isinstance(publishing, concurrent.futures.Future):
            publishing = asyncio.wrap_future(publishing)
        await asyncio.shield(publishing)

    async def info_async(self) -> dict[str, Any]:
        return await _on_runtime(self._info())

    async def _info(self) -> dict[str, Any]:
        await self.published()
        record = await _runtime().store.jobs.get(self.id)
        if record is None:
            raise JobError(f"no job {self.id!r} (never recorded, or its result expired)")
        return view(self.id, record)

    async def status_async(self) -> JobStatus:
        return JobStatus((await self.info_async())["status"])

    async def result_async(self, *, timeout_s: float | None = None) -> Any:
        """The job's value (a list of them for a streaming method, a dict of status, headers
        and body for an HTTP job), once it has finished; its exception if it failed.
        TimeoutError after `timeout_s` (None: wait as long as it takes)."""
        return await _on_runtime(self._result(timeout_s))

    async def _result(self, timeout_s: float | None) -> Any:
        await self.published()
        runtime = _runtime()
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            left = 3600.0 if deadline is None else deadline - loop.time()
            record = await runtime.store.jobs.wait_finished(self.id, max(left, 0.0))
            if record is None:
                raise JobError(f"no job {self.id!r} (never recorded, or its result expired)")
            info = view(self.id, record)
            if JobStatus(info["status"]).finished:
                return _value(info, result_events(record), runtime.secret)
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"job {self.id} is still {info['status']} after "
                                   f"{timeout_s}s")

    async def cancel_async(self) -> JobStatus:
        """Cancel the job: a PENDING one ends CANCELLED now, a RUNNING one once its replica
        stops it. Its status before; a finished job stays as it is."""
        return await _on_runtime(self._cancel())

    async def _cancel(self) -> JobStatus:
        await self.published()
        runtime = _runtime()
        return await cancel_job(runtime.broker, runtime.store, self.id)


async def cancel_job(broker: Broker, store: Store, job_id: str) -> JobStatus:
    """Cancel a job by id; its status before. JobError if there is no such job."""
    before = await store.jobs.cancel(job_id)
    if before is None:
        raise JobError(f"no job {job_id!r}")
    if before == JobStatus.RUNNING:
        await cancel_requests(broker, store, [job_id])
    return before


def _value(info: dict[str, Any], events: list[tuple[str, dict[str, Any]]],
           secret: bytes) -> Any:
    deployment = f"{info['app']}/{info['deployment']}"
    if info["status"] == JobStatus.CANCELLED.value:
        raise RequestCancelledError(f"job {info['id']} was cancelled", deployment=deployment)
    for kind, fields in events:
        if kind == messages.ERROR:
            raise raised_for(fields, deployment=deployment, secret=secret)
    if info["status"] == JobStatus.FAILED.value:
        raise JobError(f"job {info['id']} failed: {info['error']}: {info['message']}",
                       deployment=deployment)
    if info["kind"] == messages.KIND_HTTP:
        start = events[0][1] if events else {}
        return {"status": start.get("status"), "headers": start.get("headers") or [],
                "body": bytes(start.get("body") or b"")}
    results = [unpack_value(fields, secret) for kind, fields in events
               if kind == messages.RESULT and carries_value(fields)]
    streamed = bool(events) and bool(events[0][1].get("more"))
    if streamed:
        return results
    return results[0] if results else None


def get_job(job_id: str) -> Job:
    """The job with this id, submitted by any process (`serve.get_job`)."""
    if not isinstance(job_id, str) or not job_id:
        raise ValueError("a job id is a non-empty string")
    return Job(job_id)


def _runtime() -> Runtime:
    return current_runtime() or get_runtime()


async def _on_runtime(step: Coroutine[Any, Any, T]) -> T:
    """Await `step` on the runtime's loop, which owns its connections, from whichever loop
    awaits it (a driver's own asyncio.run, or a replica's loop, which is the runtime's)."""
    runtime = _runtime()
    if runtime.in_loop_thread():
        return await step
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(step, runtime.loop))


def _blocking(step: Coroutine[Any, Any, T]) -> T:
    """Run one of a Job's async forms from sync code, on the runtime's loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _runtime().run_sync(step)
    step.close()
    raise RuntimeError("Sync methods should not be called from within an `asyncio` event "
                       "loop. Use the method's `_async` form with `await` instead.")
