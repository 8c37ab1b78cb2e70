"""Limits on untrusted input (docs/architecture.md, "Limits on untrusted input"): each one
refuses with its error and counts it, through real HTTP, WebSocket, RabbitMQ and processes,
while the request path keeps serving normal requests. One cluster serves the module."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pika
import pytest
import requests
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect

from broker_serve import serve

from .conftest import AMQP_URL, Cluster, namespace
from .test_protocol_foreign import ForeignClient, pack, request_queue
from .waiting import wait_for

MAX_MESSAGE_BYTES = 64 * 1024
LIMITS = {"max_header_count": 20, "max_header_bytes": 4096, "max_body_bytes": 10_000,
          "max_websocket_message_bytes": 1024, "max_inflight_requests": 2}

app = FastAPI()


@serve.deployment(max_ongoing_requests=8)
@serve.ingress(app)
class Limited:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.waiting = 0
        self.runs = 0

    @app.get("/")
    async def hello(self) -> str:
        self.runs += 1
        return "hello"

    @app.post("/size")
    async def size(self, request: Request) -> int:
        self.runs += 1
        return len(await request.body())

    @app.get("/held")
    async def held(self) -> str:
        self.waiting += 1
        await self.gate.wait()
        return "released"

    @app.websocket("/ws")
    async def echo(self, ws: WebSocket) -> None:
        await ws.accept()
        try:
            while True:
                await ws.send_text(await ws.receive_text())
        except WebSocketDisconnect:
            pass

    async def release(self) -> None:
        self.gate.set()

    async def counts(self) -> tuple[int, int]:
        return self.waiting, self.runs


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with pytest.MonkeyPatch.context() as monkeypatch, \
            namespace(monkeypatch, tmp_path_factory.mktemp("limits")) as cluster:
        monkeypatch.setenv("BROKER_SERVE_MAX_MESSAGE_BYTES", str(MAX_MESSAGE_BYTES))
        serve.start(http_options=LIMITS)
        serve.run(Limited.bind(), name="limited", route_prefix="/")
        yield cluster


def metric(url: str, name: str, **labels: str) -> float:
    text = requests.get(url, timeout=10).text
    wanted = {f'{key}="{value}"' for key, value in labels.items()}
    for line in text.splitlines():
        found = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
        if found and wanted <= set((found.group(1) or "").split(",")):
            return float(found.group(2))
    return 0.0


def refused(cluster: Cluster, reason: str) -> float:
    return metric(cluster.url + "/-/metrics", "broker_serve_proxy_refused_requests_total",
                  reason=reason)


def assert_serving(cluster: Cluster) -> None:
    answer = requests.get(cluster.url, timeout=10)
    assert answer.status_code == 200 and answer.json() == "hello"


def test_headers_and_bodies_over_the_limits_are_refused(limited: Cluster) -> None:
    url = limited.url
    before = {reason: refused(limited, reason)
              for reason in ("too_many_headers", "headers_too_large", "body_too_large")}
    many = {f"x-h{i}": "v" for i in range(30)}
    answer = requests.get(url, headers=many, timeout=10)
    assert answer.status_code == 431 and "over the limit of 20" in answer.text, answer.text
    assert "max_header_count" in answer.text
    assert refused(limited, "too_many_headers") == before["too_many_headers"] + 1
    answer = requests.get(url, headers={"x-big": "v" * 5000}, timeout=10)
    assert answer.status_code == 431 and "max_header_bytes" in answer.text, answer.text
    assert refused(limited, "headers_too_large") == before["headers_too_large"] + 1
    # The internal paths too: /-/jobs publishes.
    assert requests.get(url + "/-/healthz", headers=many, timeout=10).status_code == 431
    assert refused(limited, "too_many_headers") == before["too_many_headers"] + 2
    # A body over the limit, with a content-length and chunked (no content-length).
    assert requests.post(url + "/size", data=b"x" * 20_000, timeout=10).status_code == 413
    chunked = requests.post(url + "/size", data=iter([b"x" * 6000, b"x" * 6000]), timeout=10)
    assert chunked.status_code == 413 and "10000 bytes" in chunked.text
    assert refused(limited, "body_too_large") == before["body_too_large"] + 2
    assert requests.post(url + "/size", data=iter([b"x" * 4000] * 2), timeout=10).json() == 8000
    assert_serving(limited)


def test_requests_over_the_in_flight_limit_get_503_with_retry_after(limited: Cluster) -> None:
    handle = serve.get_app_handle("limited")
    waiting = handle.counts.remote().result()[0]
    before = refused(limited, "too_many_inflight")
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(requests.get, limited.url + "/held", timeout=30) for _ in range(2)]
        wait_for(lambda: handle.counts.remote().result()[0] == waiting + 2, timeout=20)
        answer = requests.get(limited.url, timeout=10)
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
        assert "max_inflight_requests" in answer.text
        with pytest.raises(InvalidStatus) as websocket_refused:
            connect(f"ws://127.0.0.1:{limited.port}/ws", open_timeout=10)
        assert websocket_refused.value.response.status_code == 503
        assert refused(limited, "too_many_inflight") == before + 2
        handle.release.remote().result()
        assert [f.result().text for f in held] == ['"released"'] * 2
    assert_serving(limited)


def test_websocket_limits(limited: Cluster) -> None:
    url = f"ws://127.0.0.1:{limited.port}/ws"
    before = refused(limited, "too_many_headers")
    with pytest.raises(InvalidStatus) as too_many:
        connect(url, additional_headers={f"x-h{i}": "v" for i in range(30)}, open_timeout=10)
    assert too_many.value.response.status_code == 431
    assert b"max_header_count" in too_many.value.response.body
    assert refused(limited, "too_many_headers") == before + 1
    too_large = refused(limited, "websocket_message_too_large")
    with connect(url, open_timeout=10) as websocket:
        websocket.send("x" * 1000)
        assert websocket.recv(timeout=10) == "x" * 1000
        websocket.send("x" * 2000)
        with pytest.raises(ConnectionClosedError) as closed:
            websocket.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    wait_for(lambda: refused(limited, "websocket_message_too_large") == too_large + 1,
             timeout=10)
    with connect(url, open_timeout=10) as websocket:
        websocket.send("after")
        assert websocket.recv(timeout=10) == "after"


def test_a_replica_refuses_an_oversized_message_unread(limited: Cluster) -> None:
    """A foreign publisher's request over BROKER_SERVE_MAX_MESSAGE_BYTES gets 413 and is
    not run; an oversized job fails and is dead-lettered as a malformed one."""
    handle = serve.get_app_handle("limited")
    runs = handle.counts.remote().result()[1]
    queue = request_queue(limited.name, "limited", "Limited")
    http = {"scope": {"method": "POST", "path": "/size", "headers": []},
            "body": b"x" * (MAX_MESSAGE_BYTES + 1), "more_body": False}
    client = ForeignClient()
    try:
        request_id = client.publish(queue, "http", pack(http))
        [event] = client.wait_for(request_id)
        assert event.type == "error" and event.body["status"] == 413
        assert event.body["error"] == "MessageTooLarge"
        assert f"limit of {MAX_MESSAGE_BYTES}" in event.body["message"]
        small = client.publish(queue, "http", pack({**http, "body": b"x" * 100}))
        assert [e.type for e in client.wait_for(small)] == ["start"]
    finally:
        client.close()
    assert handle.counts.remote().result()[1] == runs + 1  # only the small one ran

    job_id = secrets.token_hex(16)
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", queue, msgpack.packb(http), pika.BasicProperties(
            type="http", message_id=job_id, correlation_id=job_id, delivery_mode=2,
            headers={"bs-version": 1, "bs-job": 60}), mandatory=True)
        record = wait_for(lambda: (answer := requests.get(
            f"{limited.url}/-/jobs/{job_id}", timeout=10)).status_code == 200
            and answer.json()["status"] == "FAILED" and answer.json(), timeout=20)
        assert record["error"] == "MessageTooLarge"
        method, properties, _ = wait_for(
            lambda: (got := channel.basic_get(f"bs.{limited.name}.dead"))[0] and got)
        channel.basic_ack(method.delivery_tag)
        assert properties.message_id == job_id
        assert properties.headers["bs-dead-reason"] == "malformed"
    finally:
        connection.close()
    node_metrics = f"http://127.0.0.1:{limited.env['BROKER_SERVE_METRICS_PORT']}/metrics"
    assert metric(node_metrics, "broker_serve_replica_refused_messages_total",
                  reason="message_too_large") == 2
    assert handle.counts.remote().result()[1] == runs + 1
    assert_serving(limited)
