"""Jobs over HTTP (docs/protocol.md, "Jobs over HTTP"): a request sent with `Prefer:
respond-async` is published as a job and answered 202 at once; `/-/jobs/<id>` serves its
status, its result (as the synchronous request would have been answered) and its cancel."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..client import jobs
from ..client.job_defaults import JobDefaults
from ..client.jobs import JobOptions
from ..exceptions import BrokerServeError, RayServeException
from ..protocol import jobs as job_protocol
from ..protocol import messages as protocol
from ..protocol import priorities
from ..protocol.call_values import carries_value, unpack_value
from ..protocol.jobs import JobStatus
from ..state.store import Store
from ..transport.broker import Broker
from .client_input import ClientGone, read_chunk

# `GET /-/jobs/<id>/result?wait_s=` waits at most this long.
MAX_WAIT_S = 60.0

MAX_RETRIES_HEADER = b"x-serve-max-retries"
DEADLINE_HEADER = b"x-serve-job-deadline-s"
TTL_HEADER = b"x-serve-job-ttl-s"


def prefers_async(prefer: bytes) -> bool:
    """Whether a `Prefer` header's value asks for `respond-async` (RFC 7240: a list of
    preferences, each maybe with a value or parameters)."""
    return any(part.split(b";")[0].split(b"=")[0].strip().lower() == b"respond-async"
               for part in prefer.split(b","))


class BadJobOption(ValueError):
    pass


def options_from(headers: list[tuple[bytes, bytes]]) -> JobOptions:
    """A job's options from its X-Serve-* headers; BadJobOption says which is wrong."""
    found = {name: value for name, value in headers
             if name in (priorities.HTTP_PRIORITY, MAX_RETRIES_HEADER, DEADLINE_HEADER,
                         TTL_HEADER)}

    def integer(name: bytes, low: int, high: int) -> int | None:
        value = found.get(name)
        if value is None:
            return None
        try:
            number = int(value)
        except ValueError:
            number = low - 1
        if not low <= number <= high:
            raise BadJobOption(f"{name.decode()} must be an integer from {low} to {high}, "
                               f"got {value.decode(errors='replace')!r}")
        return number

    priority = 0
    if (raw := found.get(priorities.HTTP_PRIORITY)) is not None:
        try:
            priority = priorities.of_http_header(raw)
        except ValueError as exc:
            raise BadJobOption(str(exc)) from None
    deadline_s = None
    if (raw := found.get(DEADLINE_HEADER)) is not None:
        try:
            deadline_s = float(raw)
        except ValueError:
            deadline_s = -1.0
        if not math.isfinite(deadline_s) or deadline_s <= 0:
            raise BadJobOption(f"{DEADLINE_HEADER.decode()} must be a number of seconds > 0, "
                               f"got {raw.decode(errors='replace')!r}")
    return JobOptions(
        priority=priority,
        max_retries=integer(MAX_RETRIES_HEADER, 0, job_protocol.MAX_RETRIES),
        deadline_s=deadline_s,
        result_ttl_s=integer(TTL_HEADER, 1, job_protocol.MAX_TTL_S))


class JobGateway:
    """What a proxy does for jobs."""

    def __init__(self, broker: Broker, store: Store, max_body: int) -> None:
        self.broker = broker
        self.store = store
        self.max_body = max_body
        self.defaults = JobDefaults(store)

    def routes(self) -> list[Route]:
        return [
            Route("/-/jobs/{job_id}", _answering(self._job), methods=["GET", "DELETE"]),
            Route("/-/jobs/{job_id}/result", _answering(self._result), methods=["GET"]),
        ]

    async def submit(self, receive: Any, payload_scope: dict[str, Any],
                     route: dict[str, Any], request_id: str | None) -> tuple[int, dict[str, Any]]:
        """Read the whole body and publish the job: the status and JSON to answer with."""
        try:
            options = options_from(payload_scope["headers"])
        except BadJobOption as exc:
            return 400, {"error": "BadRequest", "message": str(exc)}
        parts, size, more = [], 0, True
        while more:
            try:
                chunk, more = await read_chunk(receive)
            except ClientGone:
                return 499, {"error": "ClientGone", "message": "the client left"}
            size += len(chunk)
            if size > self.max_body:
                return 413, {"error": "PayloadTooLarge",
                             "message": f"the limit is {self.max_body} bytes"}
            parts.append(chunk)
        body = protocol.pack({"scope": payload_scope, "body": b"".join(parts),
                              "more_body": False})
        try:
            job_id = await jobs.submit(self.broker, self.store, self.defaults, route["app"],
                                       route["deployment"], protocol.KIND_HTTP, body, options,
                                       request_id=request_id)
        except RayServeException as exc:
            return 503, {"error": type(exc).__name__, "message": str(exc)}
        return 202, {"id": job_id, "status": JobStatus.PENDING.value}

    async def _job(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        if request.method == "DELETE":
            return await self._cancel(job_id)
        record = await self.store.jobs.get(job_id)
        if record is None:
            return _no_such_job(job_id)
        return JSONResponse(jobs.view(job_id, record))

    async def _cancel(self, job_id: str) -> Response:
        try:
            before = await jobs.cancel_job(self.broker, self.store, job_id)
        except jobs.JobError:
            return _no_such_job(job_id)
        record = await self.store.jobs.get(job_id)
        view = jobs.view(job_id, record) if record else {"id": job_id}
        return JSONResponse(view, status_code=409 if before.finished else 202)

    async def _result(self, request: Request) -> Response:
        job_id = request.path_params["job_id"]
        try:
            wait_s = float(request.query_params.get("wait_s", "0"))
        except ValueError:
            wait_s = -1.0
        if not math.isfinite(wait_s) or wait_s < 0:
            return JSONResponse({"error": "BadRequest",
                                 "message": "wait_s must be a number of seconds >= 0"},
                                status_code=400)
        record = await self.store.jobs.wait_finished(job_id, min(wait_s, MAX_WAIT_S))
        if record is None:
            return _no_such_job(job_id)
        view = jobs.view(job_id, record)
        if not JobStatus(view["status"]).finished:
            return JSONResponse(view, status_code=202, headers={"retry-after": "1"})
        return self._answer(view, jobs.result_events(record))

    def _answer(self, view: dict[str, Any], events: list[tuple[str, dict[str, Any]]]
                ) -> Response:
        """The finished job's response, as the synchronous request would have had it."""
        for kind, fields in events:
            if kind == protocol.ERROR:
                status = int(fields.get("status", 500))
                text = "Internal Server Error" if status == 500 else str(fields.get("message"))
                return JSONResponse({"error": fields.get("error"), "message": text},
                                    status_code=status)
        if view["status"] == JobStatus.CANCELLED.value:
            return JSONResponse({"error": "Cancelled", "message": view["message"]},
                                status_code=499)
        if view["status"] == JobStatus.FAILED.value:
            status = 408 if view["error"] == "DeadlineExceeded" else 500
            return JSONResponse({"error": view["error"], "message": view["message"]},
                                status_code=status)
        if view["kind"] == protocol.KIND_HTTP:
            return _raw_response(events[0][1] if events else {})
        values = [fields for kind, fields in events
                  if kind == protocol.RESULT and carries_value(fields)]
        return _value_response(values, bool(events) and bool(events[0][1].get("more")))


def _raw_response(start: dict[str, Any]) -> Response:
    response = Response(bytes(start.get("body") or b""), status_code=int(start.get("status", 200)))
    response.raw_headers = [(bytes(k), bytes(v)) for k, v in start.get("headers") or ()
                            if bytes(k).lower() != b"content-length"]
    response.raw_headers.append((b"content-length", str(len(response.body)).encode()))
    return response


def _value_response(events: list[dict[str, Any]], streamed: bool) -> Response:
    """A call job's value as JSON; 406 if it has no JSON form (it was typed or pickled)."""
    if any("value" not in fields for fields in events):
        return JSONResponse({"error": "NotAcceptable",
                             "message": "the job's value has no JSON form; read it with "
                                        "serve.get_job(id).result()"}, status_code=406)
    values = [unpack_value(fields, b"") for fields in events]
    value = values if streamed else (values[0] if values else None)
    return Response(orjson.dumps(value, default=_text), media_type="application/json")


def _text(value: object) -> str:
    """bytes in a plain value: as text, as the replica's JSON responses give them."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    raise TypeError(f"{type(value).__name__} has no JSON form")


def _answering(endpoint: Callable[[Request], Awaitable[Response]]
               ) -> Callable[[Request], Awaitable[Response]]:
    """The endpoint, answering 503 while Redis or RabbitMQ is away, and 404 for an id no job
    can have."""
    async def answer(request: Request) -> Response:
        if len(request.path_params["job_id"]) > protocol.MAX_ID_LENGTH:
            return _no_such_job(request.path_params["job_id"][:32] + "...")
        try:
            return await endpoint(request)
        except BrokerServeError as exc:
            return JSONResponse({"error": "ServiceUnavailable", "message": str(exc)},
                                status_code=503, headers={"retry-after": "1"})

    return answer


def _no_such_job(job_id: str) -> Response:
    return JSONResponse({"error": "NoSuchJob", "message": f"no job {job_id!r} (never recorded, "
                         "or its result expired)"}, status_code=404)
