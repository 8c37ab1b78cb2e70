"""Running a job in a replica (docs/protocol.md, "How a replica runs a job").

A job runs as any request does, but its reply events are collected instead of published, and
stored as its result. Each attempt is taken in the job's record first, so a finished job never
runs again, and replica deaths count as attempts. A failed attempt waits out its retry wait
here, cancellable, and runs again; the last one dead-letters the message. The message is acked
only once the job's end is stored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, TypeVar

from aiormq.abc import DeliveredMessage
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from ..config import JobConfig
from ..exceptions import ClusterUnavailable, ProtocolError
from ..protocol import deadlines, jobs
from ..protocol import messages as protocol
from ..protocol.jobs import DeadReason, JobStatus
from ..state.jobs import JobStore
from ..transport.broker import Broker
from .execution import ReplyStream

log = logging.getLogger("broker_serve.replica.jobs")
T = TypeVar("T")

# Redis away: a job waits for it (its result must be stored before its message is acked),
# holding its slot; SIGTERM ends the wait and RabbitMQ gives the job to another replica.
_BACKOFF = wait_exponential(multiplier=0.2, max=5.0)

# Run one attempt of the message into `stream`: ends it with a terminal event, or raises
# CancelledError when the replica stops.
RunAttempt = Callable[[DeliveredMessage, ReplyStream, str], Awaitable[None]]
# Within it, a cancel message for the job cancels the task (Replica._cancellable).
Cancellable = Callable[[str], AbstractContextManager[None]]


class ResultTooLarge(ProtocolError):
    pass


class JobResult:
    """The reply events of one attempt, as a caller would have received them: one `start`
    with the whole body, or the `result` events, or one `error` event."""

    def __init__(self, limit: int) -> None:
        self.events: list[list[Any]] = []
        self.error: dict[str, Any] | None = None
        self._limit = limit
        self._size = 0

    async def publish(self, event: str, fields: dict[str, Any]) -> None:
        for name in ("seq", "replica", "inbox", "chunk_sizes", "models", "capacity"):
            fields.pop(name, None)
        if event == protocol.ACCEPTED:
            return
        self._size += len(fields.get("body") or b"")
        if self._size > self._limit:
            raise ResultTooLarge(f"the job's result is larger than {self._limit} bytes",
                                 status=500, error="ResultTooLarge")
        if event == protocol.BODY and self.events and self.events[-1][0] == protocol.START:
            start = self.events[-1][1]
            start["body"] = bytes(start.get("body") or b"") + bytes(fields.get("body") or b"")
            start["more_body"] = bool(fields.get("more_body"))
            return
        if event == protocol.ERROR:
            self.error = fields
            self.events = [[event, fields]]  # a response cut short is no response
            return
        self.events.append([event, fields])

    def packed(self) -> bytes:
        return protocol.pack(self.events)


class Outcome(NamedTuple):
    status: JobStatus
    error: str = ""
    message: str = ""
    dead: DeadReason | None = None
    retry: bool = False


def outcome_of(result: JobResult) -> Outcome:
    """How an attempt ended: a user exception (500) may be retried; any other error would
    fail again, so it fails the job at once."""
    error = result.error
    if error is None:
        return Outcome(JobStatus.SUCCEEDED)
    kind, text, status = str(error.get("error")), str(error.get("message")), error.get("status")
    if status == 499:
        return Outcome(JobStatus.CANCELLED, kind, text)
    if status == 500 and kind != "ResultTooLarge":
        return Outcome(JobStatus.FAILED, kind, text, DeadReason.RETRIES_EXHAUSTED, retry=True)
    reason = DeadReason.MALFORMED if kind in _MALFORMED else DeadReason.NOT_RETRYABLE
    return Outcome(JobStatus.FAILED, kind, text, reason)


# The errors a replica answers a message it cannot read with (docs/protocol.md, "Reply events").
_MALFORMED = frozenset({"MalformedMessage", "UnsupportedProtocolVersion", "UndecodableValue"})


class JobRunner:
    """The jobs of one replica."""

    def __init__(self, store: JobStore, broker: Broker, replica_id: str, queue: str,
                 dead_letters: str, result_limit: int, run_attempt: RunAttempt,
                 cancelled: Callable[[str], bool], cancellable: Cancellable) -> None:
        self.store = store
        self.broker = broker
        self.replica_id = replica_id
        self.queue = queue
        self.dead_letters = dead_letters
        self.result_limit = result_limit
        self._run_attempt = run_attempt
        self._cancelled = cancelled
        self._cancellable = cancellable

    async def run(self, message: DeliveredMessage, job_id: str, config: JobConfig,
                  app: str, deployment: str, refused: str | None = None) -> ReplyStream:
        """Run the job to its end and store it; the stream of its last attempt (for the
        replica's metrics). Returns only once the message may be acked. A job the replica
        `refused` (over its message size limit: why) fails unread, as a malformed one."""
        properties = message.header.properties
        headers = properties.headers or {}
        kind = properties.message_type or ""
        try:
            if refused is not None:
                raise ProtocolError(refused, status=413, error="MessageTooLarge")
            protocol.check_version(headers)
            options = jobs.job_options(headers)
            if kind not in (protocol.KIND_CALL, protocol.KIND_HTTP):
                raise ProtocolError(f"a job is a call or an http request, not {kind!r}")
        except ProtocolError as exc:
            result = JobResult(self.result_limit)
            stream = ReplyStream(result.publish)
            await stream.error(exc.status, exc.error, str(exc))
            await self._end(message, job_id, _ttl_or_default(headers, config), 0, result,
                            Outcome(JobStatus.FAILED, exc.error, str(exc), DeadReason.MALFORMED),
                            {"app": app, "deployment": deployment, "kind": kind})
            return stream
        deadline = headers.get(protocol.HEADER_DEADLINE)
        deadline_ms = deadline if deadline.__class__ is int else None
        max_retries = options.retries(config)
        fields = {"app": app, "deployment": deployment, "kind": kind,
                  "priority": properties.priority or 0, "max_retries": max_retries,
                  "deadline_ms": deadline_ms, "submitted_ms": deadlines.now_ms()}
        while True:
            before, attempts = await self._redis(self.store.start, job_id, options.ttl_s,
                                                 self.replica_id, **fields)
            result = JobResult(self.result_limit)
            stream = ReplyStream(result.publish)
            if before is not None and before.finished:
                # A redelivery of a job that ended: its end is stored, so it is only acked.
                log.info("job %s had ended %s already; not running it again", job_id,
                         before.value)
                stream.finished = True
                return stream
            if deadline_ms is not None and deadline_ms < deadlines.now_ms():
                await stream.error(408, "DeadlineExceeded",
                                   "the job's deadline passed before it could start")
                outcome = Outcome(JobStatus.FAILED, "DeadlineExceeded",
                                  "the job's deadline passed before it could start",
                                  DeadReason.DEADLINE)
            elif attempts > max_retries + 1:
                text = (f"the job started {attempts - 1} times and its replica died each "
                        "time; it is not run again")
                await stream.error(502, "RequestKilledReplicas", text)
                outcome = Outcome(JobStatus.FAILED, "RequestKilledReplicas", text,
                                  DeadReason.REPLICA_DEATHS)
            elif self._cancelled(job_id):
                await stream.error(499, "Cancelled", "the job was cancelled before it ran")
                outcome = Outcome(JobStatus.CANCELLED, "Cancelled", "the job was cancelled")
            else:
                await self._run_attempt(message, stream, job_id)
                outcome = outcome_of(result)
            if outcome.retry and attempts <= max_retries:
                delay_s = jobs.retry_delay_s(options.wait(config), attempts)
                retry_at_ms = deadlines.now_ms() + int(delay_s * 1000)
                if deadline_ms is None or retry_at_ms < deadline_ms:
                    log.warning("job %s failed (attempt %d of %d): %s; again in %.2fs", job_id,
                                attempts, max_retries + 1, outcome.error, delay_s)
                    await self._redis(self.store.retrying, job_id, options.ttl_s, retry_at_ms,
                                      outcome.error, outcome.message)
                    if await self._waited_to_retry(job_id, delay_s):
                        continue
                    await stream.error(499, "Cancelled", "the job was cancelled")
                    outcome = Outcome(JobStatus.CANCELLED, "Cancelled",
                                      "the job was cancelled while it waited to run again")
                    await self._end(message, job_id, options.ttl_s, attempts, result, outcome,
                                    fields)
                    return stream
                outcome = Outcome(JobStatus.FAILED, "DeadlineExceeded",
                                  f"its retry would start after the job's deadline (after "
                                  f"{outcome.error}: {outcome.message})", DeadReason.DEADLINE)
            await self._end(message, job_id, options.ttl_s, attempts, result, outcome, fields)
            return stream

    async def _waited_to_retry(self, job_id: str, delay_s: float) -> bool:
        """Wait before the next attempt: False if the job was cancelled meanwhile. The
        replica stopping ends the wait with CancelledError."""
        try:
            with self._cancellable(job_id):
                await asyncio.sleep(delay_s)
        except asyncio.CancelledError:
            if not self._cancelled(job_id):
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            return False
        return not self._cancelled(job_id)

    async def _end(self, message: DeliveredMessage, job_id: str, ttl_s: int, attempts: int,
                   result: JobResult, outcome: Outcome, fields: dict[str, Any]) -> None:
        """Dead-letter a failed job, then store its end: a death in between redelivers it,
        and the next attempt sees its end."""
        if outcome.dead is not None:
            await self._dead_letter(message, outcome, attempts)
        await self._redis(self.store.finish, job_id, ttl_s, outcome.status, result.packed(),
                          error=outcome.error, message=outcome.message[:2000],
                          dead=outcome.dead is not None, **fields)
        log.info("job %s ended %s after %d attempt(s)", job_id, outcome.status.value, attempts)

    async def _dead_letter(self, message: DeliveredMessage, outcome: Outcome,
                           attempts: int) -> None:
        properties = message.header.properties
        headers = {**(properties.headers or {}),
                   jobs.HEADER_DEAD_QUEUE: self.queue,
                   jobs.HEADER_DEAD_REASON: outcome.dead.value if outcome.dead else "",
                   jobs.HEADER_DEAD_ERROR: outcome.error,
                   jobs.HEADER_DEAD_MESSAGE: outcome.message[:2000],
                   jobs.HEADER_DEAD_AT: deadlines.now_ms(),
                   jobs.HEADER_ATTEMPT: attempts}
        # While RabbitMQ is away this waits; the channel's loss then cancels it, and the
        # redelivered job comes back here.
        async for attempt in AsyncRetrying(retry=retry_if_exception_type(ClusterUnavailable),
                                           wait=_BACKOFF):
            with attempt:
                kept = await self.broker.publish_durably(
                    self.dead_letters, message.body, deadline_ms=None,
                    type=properties.message_type or "", correlation_id=properties.correlation_id
                    or "", message_id=properties.message_id, headers=headers,
                    priority=properties.priority or 0, mandatory=True, refuse_returned=True)
        if not kept:  # the controller declares it at its start: not seen in practice
            log.error("the dead-letter queue %s refused job %s; its record still says FAILED",
                      self.dead_letters, properties.message_id)

    async def _redis(self, step: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """`await step(*args, **kwargs)`, again and again while Redis is away."""
        async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(ClusterUnavailable), wait=_BACKOFF,
                before_sleep=lambda state: log.warning(
                    "cannot reach Redis for a job (%s); waiting",
                    state.outcome.exception() if state.outcome else "")):
            with attempt:
                return await step(*args, **kwargs)
        raise AssertionError("unreachable: AsyncRetrying retries until it succeeds")


def _ttl_or_default(headers: dict[str, Any], config: JobConfig) -> int:
    try:
        return jobs.checked_ttl(headers.get(jobs.HEADER_JOB))
    except ValueError:
        return config.result_ttl_s

