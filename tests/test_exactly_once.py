"""Exactly-once under ordinary load: every request answered with success and run once.

Under 32 concurrent clients with sync handlers the data plane once broke: RabbitMQ closed a
replica's consume channel ("unknown delivery tag"), redelivered requests ran twice, some failed
with 502. This test keeps that from coming back. All kinds of traffic run at once, each kind with
32 clients of its own, about 3,800 requests in all:

- HTTP to a sync `__call__` and to an async `__call__` (two replicas each, so requests compete);
- HTTP streaming responses of several chunks;
- HTTP to a deployment that calls another deployment through a handle;
- handle calls from the driver to a sync method and to an async method, from 32 threads each;
- streaming handle calls from the driver.

Every handler counts its run in Redis under an id the test chose for the request, so the count
survives processes. The test then asserts: every answer is a 200 (or a returned value) with the
expected body, every id ran exactly once, nothing was dead-lettered, nothing is left in a request
queue, and no replica saw a redelivery or lost a channel. RabbitMQ's own log is checked for
channel and connection errors by the autouse fixture in conftest.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pika
import pytest
import redis
import redis.asyncio
import requests
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import StreamingResponse

from broker_serve import serve
from broker_serve.client.handle import DeploymentHandle

from .conftest import AMQP_URL, REDIS_URL, Cluster

CLIENTS = 32
MAX_ONGOING = 100  # the value that triggered the bug
REQUEST_TIMEOUT_S = 30.0
KEEPALIVE_EXPIRY_S = 1.0  # well under the proxy's keep_alive_timeout_s (5 s)
CHUNKS = 4
HTTP_REQUESTS = {"sync": 800, "async": 800, "stream": 400, "relay": 400}
HANDLE_REQUESTS = {"sync-method": 600, "async-method": 600, "stream-method": 200}


def _redis_url() -> str:
    return os.environ.get("BROKER_SERVE_REDIS_URL", REDIS_URL)


def chunk(request_id: str, index: int) -> str:
    return f"{request_id}:{index}\n"


def whole_stream(request_id: str) -> str:
    return "".join(chunk(request_id, i) for i in range(CHUNKS))


@serve.deployment(num_replicas=2, max_ongoing_requests=MAX_ONGOING)
class SyncRecorder:
    """Sync handlers: each run adds one to its request id's count."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.redis = redis.Redis.from_url(_redis_url())

    def __call__(self, request: Request) -> str:
        return self.record(request.query_params["id"])

    def record(self, request_id: str) -> str:
        self.redis.incr(self.prefix + request_id)
        return request_id


@serve.deployment(num_replicas=2, max_ongoing_requests=MAX_ONGOING)
class AsyncRecorder:
    """Async handlers: the same, on the replica's event loop."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.redis = redis.asyncio.Redis.from_url(_redis_url())

    async def __call__(self, request: Request) -> str:
        return await self.record(request.query_params["id"])

    async def record(self, request_id: str) -> str:
        await self.redis.incr(self.prefix + request_id)
        return request_id


@serve.deployment(max_ongoing_requests=MAX_ONGOING)
class Streamer:
    """Streams of several chunks, counted once when the stream starts."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.redis = redis.asyncio.Redis.from_url(_redis_url())
        self.sync_redis = redis.Redis.from_url(_redis_url())

    async def __call__(self, request: Request) -> StreamingResponse:
        request_id = request.query_params["id"]
        await self.redis.incr(self.prefix + request_id)

        async def chunks() -> AsyncIterator[str]:
            for index in range(CHUNKS):
                if index:
                    await asyncio.sleep(0.002)  # apart, so that chunks travel in several events
                yield chunk(request_id, index)

        return StreamingResponse(chunks(), media_type="text/plain")

    def chunks(self, request_id: str) -> Iterator[str]:
        """A sync generator, for streaming handle calls."""
        self.sync_redis.incr(self.prefix + request_id)
        for index in range(CHUNKS):
            if index:
                time.sleep(0.002)
            yield chunk(request_id, index)


@serve.deployment(max_ongoing_requests=MAX_ONGOING)
class Relay:
    """An HTTP ingress that calls the sync recorder of another application through a handle."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.redis = redis.asyncio.Redis.from_url(_redis_url())
        self.target = serve.get_deployment_handle("SyncRecorder", app_name="sync")

    async def __call__(self, request: Request) -> str:
        request_id = request.query_params["id"]
        await self.redis.incr(self.prefix + request_id)
        return await self.target.record.remote(callee_id(request_id))


def callee_id(request_id: str) -> str:
    return f"{request_id}.callee"


APPS = {"sync": SyncRecorder, "async": AsyncRecorder, "stream": Streamer, "relay": Relay}


@dataclass
class Outcomes:
    """What each kind of request got back: an HTTP status (or exception name) per request,
    and the requests whose answer was not the expected one."""

    statuses: dict[str, Counter[str]] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, status: str, request_id: str, got: str, expected: str) -> None:
        with self.lock:
            self.statuses.setdefault(kind, Counter())[status] += 1
            if status == "200" and got != expected:
                self.wrong.append(f"{kind} {request_id}: got {got[:120]!r}")

    def failures(self) -> dict[str, dict[str, int]]:
        return {kind: {s: n for s, n in counts.items() if s != "200"}
                for kind, counts in self.statuses.items() if set(counts) != {"200"}}


def ids(kind: str, count: int) -> list[str]:
    return [f"{kind}-{i:05d}" for i in range(count)]


# HTTP load --------------------------------------------------------------------------------------
HTTP_ANSWERS: dict[str, Callable[[str], str]] = {
    "sync": str, "async": str, "stream": whole_stream, "relay": callee_id}


async def http_load(base_url: str, outcomes: Outcomes) -> None:
    """32 clients per kind, all kinds at once, each client pulling ids from its kind's queue."""
    # The proxy closes a connection idle for 5 s, and httpx's own expiry is also 5 s: a request
    # sent on a connection idle that long races the proxy's close and fails, no fault of the
    # data plane (HTTP/1.1's keep-alive race). The pool forgets idle connections sooner.
    limits = httpx.Limits(max_connections=CLIENTS * len(HTTP_REQUESTS),
                          max_keepalive_connections=CLIENTS * len(HTTP_REQUESTS),
                          keepalive_expiry=KEEPALIVE_EXPIRY_S)
    async with httpx.AsyncClient(base_url=base_url, limits=limits,
                                 timeout=REQUEST_TIMEOUT_S) as client:
        workers = []
        for kind, count in HTTP_REQUESTS.items():
            pending: asyncio.Queue[str] = asyncio.Queue()
            for request_id in ids(f"http-{kind}", count):
                pending.put_nowait(request_id)
            workers += [http_client(client, kind, pending, outcomes) for _ in range(CLIENTS)]
        await asyncio.gather(*workers)


async def http_client(client: httpx.AsyncClient, kind: str, pending: asyncio.Queue[str],
                      outcomes: Outcomes) -> None:
    expected = HTTP_ANSWERS[kind]
    while not pending.empty():
        request_id = pending.get_nowait()
        try:
            response = await client.get(f"/{kind}", params={"id": request_id})
            status, body = str(response.status_code), response.text
        except httpx.HTTPError as exc:
            status, body = type(exc).__name__, ""
        outcomes.add(f"http-{kind}", status, request_id, body, expected(request_id))


# handle load ------------------------------------------------------------------------------------
Call = Callable[[str], str]


def handle_calls() -> dict[str, tuple[Call, Call]]:
    """Per kind of handle call: how to make it, and the answer it must give."""
    sync_recorder = serve.get_deployment_handle("SyncRecorder", app_name="sync")
    async_recorder = serve.get_deployment_handle("AsyncRecorder", app_name="async")
    streamer = serve.get_deployment_handle("Streamer", app_name="stream")
    return {"sync-method": (lambda i: unary(sync_recorder.record, i), str),
            "async-method": (lambda i: unary(async_recorder.record, i), str),
            "stream-method": (lambda i: streamed(streamer, i), whole_stream)}


def unary(handle: DeploymentHandle, request_id: str) -> str:
    return str(handle.remote(request_id).result(timeout_s=REQUEST_TIMEOUT_S))


def streamed(streamer: DeploymentHandle, request_id: str) -> str:
    items = streamer.options(method_name="chunks", stream=True).remote(request_id)
    watchdog = threading.Timer(REQUEST_TIMEOUT_S, items.cancel)  # iteration has no timeout
    watchdog.start()
    try:
        return "".join(items)
    finally:
        watchdog.cancel()


def handle_call(kind: str, calls: dict[str, tuple[Call, Call]], request_id: str,
                outcomes: Outcomes) -> None:
    call, expected = calls[kind]
    try:
        status, got = "200", call(request_id)
    except Exception as exc:  # noqa: BLE001 - every failure is an outcome to report
        status, got = f"{type(exc).__name__}: {str(exc)[:200]}", ""
    outcomes.add(kind, status, request_id, got, expected(request_id))


def run_load(base_url: str, outcomes: Outcomes) -> None:
    """The handle calls on 32 threads per kind, while the HTTP clients run on this thread."""
    calls = handle_calls()
    pools = {kind: ThreadPoolExecutor(CLIENTS, thread_name_prefix=kind)
             for kind in HANDLE_REQUESTS}
    try:
        futures = [pools[kind].submit(handle_call, kind, calls, request_id, outcomes)
                   for kind, count in HANDLE_REQUESTS.items()
                   for request_id in ids(kind, count)]
        asyncio.run(http_load(base_url, outcomes))
        for future in futures:
            future.result()
    finally:
        for pool in pools.values():
            pool.shutdown(cancel_futures=True)


# what the cluster saw ---------------------------------------------------------------------------
def expected_ids() -> set[str]:
    expected = {i for kind, count in HANDLE_REQUESTS.items() for i in ids(kind, count)}
    expected |= {i for kind, count in HTTP_REQUESTS.items() for i in ids(f"http-{kind}", count)}
    return expected | {callee_id(i) for i in ids("http-relay", HTTP_REQUESTS["relay"])}


def execution_counts(prefix: str) -> dict[str, int]:
    """How many times each request id ran, as the handlers counted it."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        values = client.mget(keys) if keys else []
    finally:
        client.close()
    return {key.decode()[len(prefix):]: int(value) for key, value in zip(keys, values)}


def queue_depths(cluster: str) -> dict[str, int]:
    """Messages ready in the dead-letter queue and in each request queue."""
    names = [f"bs.{cluster}.dead"]
    names += [f"bs.{cluster}.{app}.{deployment.name}" for app, deployment in APPS.items()]
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        return {name: channel.queue_declare(name, passive=True).method.message_count
                for name in names}
    finally:
        connection.close()


def replica_faults(metrics_port: str) -> dict[str, float]:
    """Per deployment, the redeliveries its replicas took and the channels they lost, from the
    worker node's /metrics. Both counters are written at once, not on the replicas' flush."""
    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    faults: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("broker_serve_replica_redeliveries_total",
                               "broker_serve_replica_channels_lost_total"):
                key = f"{sample.labels['deployment']} {sample.name}"
                faults[key] = faults.get(key, 0.0) + sample.value
    return faults


def summary(outcomes: Outcomes, elapsed: float) -> str:
    lines = [f"{sum(c.total() for c in outcomes.statuses.values())} requests in {elapsed:.1f} s"]
    lines += [f"  {kind}: {dict(counts)}" for kind, counts in sorted(outcomes.statuses.items())]
    return "\n".join(lines)


# the test ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_every_request_is_answered_and_runs_exactly_once(cluster: Cluster, queue_type: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With the default queues, and in durable mode (quorum queues, persistent requests
    published with confirms: docs/architecture.md, "Durable mode")."""
    monkeypatch.setenv("BROKER_SERVE_QUEUE_TYPE", queue_type)  # read where serve.run builds
    prefix = f"bs:{cluster.name}:test:ran:"  # under the namespace: the fixture deletes it
    for app, deployment in APPS.items():
        serve.run(deployment.bind(prefix), name=app, route_prefix=f"/{app}")
    outcomes = Outcomes()
    started = time.monotonic()
    run_load(cluster.url, outcomes)
    report = summary(outcomes, time.monotonic() - started)
    print(report)

    assert not outcomes.failures(), f"requests that did not succeed:\n{report}"
    assert not outcomes.wrong, f"{len(outcomes.wrong)} wrong answers, e.g. {outcomes.wrong[:10]}"

    expected, counts = expected_ids(), execution_counts(prefix)
    not_run = sorted(expected - counts.keys())
    more_than_once = {i: n for i, n in sorted(counts.items()) if n > 1}
    assert not more_than_once, (f"{len(more_than_once)} requests ran more than once, e.g. "
                                f"{dict(list(more_than_once.items())[:10])}")
    assert not not_run, f"{len(not_run)} answered requests never ran, e.g. {not_run[:10]}"
    assert counts.keys() == expected, f"unknown ids ran: {sorted(counts.keys() - expected)[:10]}"

    if queue_type == "quorum":
        arguments = {queue: json.loads(value) for queue, value in redis.Redis.from_url(
            REDIS_URL).hgetall(f"bs:{cluster.name}:queue_arguments").items()}
        assert arguments and all(a.get("x-queue-type") == "quorum" for a in arguments.values())
    depths = queue_depths(cluster.name)
    assert depths == dict.fromkeys(depths, 0), f"dead-lettered or left in a queue: {depths}"
    faults = replica_faults(cluster.env["BROKER_SERVE_METRICS_PORT"])
    assert {key.split()[0] for key in faults} == {d.name for d in APPS.values()}, faults
    assert faults == dict.fromkeys(faults, 0.0), f"redeliveries or lost channels: {faults}"
