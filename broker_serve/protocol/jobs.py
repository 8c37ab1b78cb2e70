"""Jobs on the wire (docs/protocol.md, "Jobs"): the headers of a job message, their checks, the
statuses of a job, and the wait before a retry.

A job is a `call` or `http` request with the header `bs-job` and no `reply_to`. Submitters build
its headers here and replicas read them back here, so both agree on one definition.
"""

from __future__ import annotations

import enum
import secrets
from typing import Any, NamedTuple

import orjson
import pydantic
import tenacity

from ..config import JobConfig, RetryWait
from ..exceptions import ProtocolError

HEADER_JOB = "bs-job"  # the seconds its record and result are kept; marks a job
HEADER_MAX_RETRIES = "bs-max-retries"
HEADER_RETRY_WAIT = "bs-retry-wait"  # JSON: a RetryWait
HEADER_ATTEMPT = "bs-attempt"  # on a dead letter: the attempts it had

# What a failed job's dead letter adds to its message (docs/protocol.md, "Dead letters").
HEADER_DEAD_QUEUE = "bs-dead-queue"
HEADER_DEAD_REASON = "bs-dead-reason"
HEADER_DEAD_ERROR = "bs-dead-error"
HEADER_DEAD_MESSAGE = "bs-dead-message"
HEADER_DEAD_AT = "bs-dead-at"
DEAD_HEADERS = (HEADER_DEAD_QUEUE, HEADER_DEAD_REASON, HEADER_DEAD_ERROR, HEADER_DEAD_MESSAGE,
                HEADER_DEAD_AT, HEADER_ATTEMPT)

MAX_TTL_S = 2_592_000
MAX_RETRIES = 100


class JobStatus(str, enum.Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class DeadReason(str, enum.Enum):
    """Why a job was dead-lettered (`bs-dead-reason`)."""

    RETRIES_EXHAUSTED = "retries-exhausted"
    NOT_RETRYABLE = "not-retryable"
    DEADLINE = "deadline"
    REPLICA_DEATHS = "replica-deaths"
    MALFORMED = "malformed"


def new_job_id() -> str:
    """128 random bits: knowing a job's id is what lets one read or cancel it."""
    return secrets.token_hex(16)


class JobHeaders(NamedTuple):
    """What a job message says of how to run it; None: the deployment's own."""

    ttl_s: int
    max_retries: int | None
    retry_wait: RetryWait | None

    def retries(self, config: JobConfig) -> int:
        return config.max_retries if self.max_retries is None else self.max_retries

    def wait(self, config: JobConfig) -> RetryWait:
        return self.retry_wait or config.retry_wait


def job_headers(ttl_s: int, *, max_retries: int | None = None,
                retry_wait: RetryWait | None = None) -> dict[str, Any]:
    """The headers that make a request message a job (to add to `request_headers`)."""
    headers: dict[str, Any] = {HEADER_JOB: checked_ttl(ttl_s)}
    if max_retries is not None:
        headers[HEADER_MAX_RETRIES] = checked_retries(max_retries)
    if retry_wait is not None:
        headers[HEADER_RETRY_WAIT] = retry_wait.model_dump_json(exclude_defaults=True)
    return headers


def is_job(headers: dict[str, Any]) -> bool:
    return HEADER_JOB in headers


def job_options(headers: dict[str, Any]) -> JobHeaders:
    """A job message's options; ProtocolError (MalformedMessage) if one is unreadable."""
    try:
        ttl_s = checked_ttl(headers[HEADER_JOB])
        max_retries = headers.get(HEADER_MAX_RETRIES)
        if max_retries is not None:
            max_retries = checked_retries(max_retries)
        wait = headers.get(HEADER_RETRY_WAIT)
        retry_wait = None
        if wait is not None:
            if isinstance(wait, bytes):
                wait = wait.decode()
            if not isinstance(wait, str):
                raise ValueError(f"{HEADER_RETRY_WAIT} must be a JSON string")
            retry_wait = RetryWait.model_validate(orjson.loads(wait))
    except (ValueError, pydantic.ValidationError, orjson.JSONDecodeError) as exc:
        raise ProtocolError(f"bad job header: {exc}") from None
    return JobHeaders(ttl_s, max_retries, retry_wait)


def checked_ttl(value: Any) -> int:
    if value.__class__ is not int or not 1 <= value <= MAX_TTL_S:
        raise ValueError(f"{HEADER_JOB} must be an integer from 1 to {MAX_TTL_S} (seconds), "
                         f"got {value!r}")
    return int(value)


def checked_retries(value: Any) -> int:
    if value.__class__ is not int or not 0 <= value <= MAX_RETRIES:
        raise ValueError(f"max_retries must be an integer from 0 to {MAX_RETRIES}, "
                         f"got {value!r}")
    return int(value)


def retry_delay_s(wait: RetryWait, retry: int) -> float:
    """Seconds to wait before retry number `retry` (1 for the first), computed by tenacity's
    own wait strategy."""
    strategy: tenacity.wait.wait_base
    if wait.wait == "fixed":
        strategy = tenacity.wait_fixed(wait.seconds)
    elif wait.wait == "exponential":
        strategy = tenacity.wait_exponential(multiplier=wait.multiplier, max=wait.max,
                                             exp_base=wait.exp_base, min=wait.min)
    elif wait.wait == "random_exponential":
        strategy = tenacity.wait_random_exponential(multiplier=wait.multiplier, max=wait.max,
                                                    exp_base=wait.exp_base, min=wait.min)
    elif wait.wait == "incrementing":
        strategy = tenacity.wait_incrementing(start=wait.start, increment=wait.increment,
                                              max=wait.max)
    else:
        return 0.0
    # tenacity's strategies read only the attempt number of the call state.
    state = tenacity.RetryCallState(retry_object=tenacity.AsyncRetrying(), fn=None, args=(),
                                    kwargs={})
    state.attempt_number = retry
    return float(strategy(state))
