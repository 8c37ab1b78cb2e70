"""A foreign caller: calls deployments by following docs/protocol.md alone.

The client half of this module (`ForeignClient` and the helpers above the fixtures) uses only
`pika`, `msgpack` and the standard library, and imports nothing from broker_serve, as a Go or
Java service would. Only the deployment side (inside the tests) uses broker-serve's own API.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pika
import pytest
from pika.adapters.blocking_connection import BlockingChannel

AMQP_URL = os.environ.get("BROKER_SERVE_AMQP_URL", "amqp://guest:guest@localhost:5672/")
CHUNK = 1024 * 1024  # docs: "Bodies travel in chunks of at most 1 MiB"
TERMINAL_TIMEOUT_S = 15.0


# --- the foreign client: pika + msgpack + stdlib only ------------------------------------------
def request_queue(cluster: str, app: str, deployment: str) -> str:
    return f"bs.{cluster}.{app}.{deployment}"


def dead_letter_queue(cluster: str) -> str:
    return f"bs.{cluster}.dead"


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


@dataclass
class Event:
    type: str
    body: dict[str, Any]
    properties: pika.BasicProperties


@dataclass
class Reply:
    request_id: str
    events: list[Event] = field(default_factory=list)

    @property
    def types(self) -> list[str]:
        return [event.type for event in self.events]

    @property
    def terminal(self) -> Event:
        return self.events[-1]

    def response_body(self) -> bytes:
        """The HTTP response body: the `start` chunk and the `body` chunks, in order."""
        return b"".join(e.body.get("body", b"") for e in self.events if e.type in ("start", "body"))


def is_terminal(event: Event) -> bool:
    if event.type in ("start", "body"):
        return not event.body.get("more_body", False)
    if event.type == "result":
        return not event.body.get("more", False)
    return event.type == "error"


class ForeignClient:
    """A caller written from docs/protocol.md: one connection, one exclusive reply queue."""

    def __init__(self, url: str = AMQP_URL, name: str | None = None) -> None:
        parameters = pika.URLParameters(url)
        if name is not None:  # the name RabbitMQ shows and logs for the connection
            parameters.client_properties = {"connection_name": name}
        self.connection = pika.BlockingConnection(parameters)
        self.channel: BlockingChannel = self.connection.channel()
        declared = self.channel.queue_declare(queue="", exclusive=True, auto_delete=True)
        self.reply_queue: str = declared.method.queue
        self._events: dict[str, list[Event]] = {}
        self.returned: list[tuple[Any, Any, bytes]] = []
        self.channel.add_on_return_callback(
            lambda _ch, method, props, body: self.returned.append((method, props, body)))
        self.channel.basic_consume(self.reply_queue, self._on_reply, auto_ack=True)

    def close(self) -> None:
        if self.connection.is_open:
            self.connection.close()

    def _on_reply(self, _ch: Any, _method: Any, props: pika.BasicProperties, body: bytes) -> None:
        assert props.content_type == "application/msgpack", props
        event = Event(props.type, unpack(body), props)
        self._events.setdefault(props.correlation_id, []).append(event)

    # publishing ---------------------------------------------------------------------------------
    def publish(self, queue: str, kind: str, body: bytes, *, request_id: str | None = None,
                headers: dict[str, Any] | None = None, reply_to: bool = True,
                mandatory: bool = False, expiration_ms: int | None = None,
                exchange: str = "") -> str:
        """Publish to `queue` through the default exchange, or through `exchange` (a
        deployment's exchange: docs/protocol.md, "Queues and exchanges")."""
        request_id = request_id or uuid.uuid4().hex
        properties = pika.BasicProperties(
            content_type="application/msgpack",
            type=kind,
            message_id=request_id,
            correlation_id=request_id,
            reply_to=self.reply_queue if reply_to else None,
            headers={"bs-version": 1} if headers is None else headers,
            expiration=str(expiration_ms) if expiration_ms is not None else None,
            delivery_mode=1,
        )
        self.channel.basic_publish(exchange, queue, body, properties, mandatory=mandatory)
        return request_id

    def send_body_chunk(self, inbox: str, request_id: str, chunk: bytes, more_body: bool) -> None:
        properties = pika.BasicProperties(content_type="application/msgpack", type="body",
                                          correlation_id=request_id, delivery_mode=1)
        self.channel.basic_publish("", inbox, pack({"body": chunk, "more_body": more_body}),
                                   properties)

    # receiving ----------------------------------------------------------------------------------
    def wait_for(self, request_id: str, count: int = 1,
                 timeout: float = TERMINAL_TIMEOUT_S) -> list[Event]:
        """Process the connection until `count` events of `request_id` have arrived."""
        deadline = time.monotonic() + timeout
        while len(self._events.get(request_id, [])) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"{request_id}: {len(self._events.get(request_id, []))} of {count} events: "
                    f"{[e.type for e in self._events.get(request_id, [])]}")
            self.connection.process_data_events(time_limit=min(left, 0.2))
        return self._events[request_id]

    def collect(self, request_id: str, timeout: float = TERMINAL_TIMEOUT_S) -> Reply:
        """All events of `request_id` up to its terminal one, following the redelivery rule."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            events = self.wait_for(request_id, seen + 1, max(0.0, deadline - time.monotonic()))
            seen = len(events)
            if is_terminal(events[-1]):
                break
        # A redelivery to another replica restarts seq at 0: keep the last attempt only.
        last_start = max(i for i, e in enumerate(events) if e.body["seq"] == 0)
        return Reply(request_id, list(events[last_start:]))

    def settle(self, seconds: float) -> None:
        """Let the connection process whatever arrives in the next `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.connection.process_data_events(time_limit=min(left, 0.2))

    def events_of(self, request_id: str) -> list[Event]:
        return list(self._events.get(request_id, []))

    # calls ----------------------------------------------------------------------------------------
    def http(self, queue: str, method: str, path: str, *, query_string: bytes = b"",
             headers: list[list[bytes]] | None = None, body: bytes = b"", root_path: str = "",
             timeout: float = TERMINAL_TIMEOUT_S) -> Reply:
        """An HTTP request, sending a body larger than one chunk as the Chunking section says."""
        first, rest = body[:CHUNK], body[CHUNK:]
        scope = {"method": method, "path": path, "query_string": query_string,
                 "headers": headers or [], "root_path": root_path, "http_version": "1.1",
                 "scheme": "http"}
        request_id = self.publish(queue, "http",
                                  pack({"scope": scope, "body": first, "more_body": bool(rest)}))
        if rest:
            accepted = self.wait_for(request_id, 1, timeout)[0]
            assert accepted.type == "accepted", accepted
            inbox = accepted.body["inbox"]
            chunks = [rest[i:i + CHUNK] for i in range(0, len(rest), CHUNK)]
            for index, chunk in enumerate(chunks):
                self.send_body_chunk(inbox, request_id, chunk, index < len(chunks) - 1)
        return self.collect(request_id, timeout)

    def call(self, queue: str, method: str, *args: Any, exchange: str = "",
             **kwargs: Any) -> Reply:
        request_id = self.publish(queue, "call",
                                  pack({"method": method, "args": list(args), "kwargs": kwargs}),
                                  exchange=exchange)
        return self.collect(request_id)


def response_headers(event: Event) -> dict[bytes, bytes]:
    return {bytes(name).lower(): bytes(value) for name, value in event.body["headers"]}


def assert_event_fields(reply: Reply) -> None:
    """Every event has `seq` counting from 0 by one, and `replica`."""
    assert [e.body["seq"] for e in reply.events] == list(range(len(reply.events))), reply.types
    replicas = {e.body["replica"] for e in reply.events}
    assert len(replicas) == 1 and all(isinstance(r, str) and r for r in replicas), replicas
    for event in reply.events:
        assert event.properties.content_type == "application/msgpack"


def assert_error(reply: Reply, status: int, error: str) -> None:
    assert reply.types == ["error"], [(e.type, e.body) for e in reply.events]
    body = reply.terminal.body
    assert body["status"] == status and body["error"] == error, body
    assert isinstance(body["message"], str)
    assert body["seq"] == 0 and body["replica"]


# --- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def client() -> Iterator[ForeignClient]:
    foreign = ForeignClient()
    try:
        yield foreign
    finally:
        foreign.close()


def assert_queue_exists(queue: str) -> None:
    """The doc's way to check a request queue: a passive declare."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        connection.channel().queue_declare(queue, passive=True)
    finally:
        connection.close()


def deploy_echo(cluster: Any) -> str:
    from broker_serve import serve

    @serve.deployment
    class Echo:
        async def __call__(self, request: Any) -> dict[str, Any]:  # a starlette Request
            body = await request.body()
            return {"method": request.method, "path": request.url.path,
                    "query": dict(request.query_params), "body_len": len(body),
                    "header": request.headers.get("x-foo")}

        def add(self, a: int, b: int, scale: int = 1) -> dict[str, Any]:
            return {"sum": (a + b) * scale, "types": [type(a).__name__, type(b).__name__]}

    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    queue = request_queue(cluster.name, "echo", "Echo")
    assert_queue_exists(queue)
    return queue


# --- tests --------------------------------------------------------------------------------------
def test_route_table_names_the_request_queue(cluster: Any) -> None:
    """The proxy's route table leads from the route prefix to the request queue. docs/protocol.md
    names `GET /-/routes`, which maps prefix -> app only; the queue is in `/-/routes/detail`."""
    queue = deploy_echo(cluster)
    with urllib.request.urlopen(f"{cluster.url}/-/routes", timeout=5) as response:
        assert "/echo" in json.load(response)
    with urllib.request.urlopen(f"{cluster.url}/-/routes/detail", timeout=5) as response:
        detail = json.load(response)
    assert detail["routes"]["/echo"]["queue"] == queue, detail


def test_unary_http_get(cluster: Any, client: ForeignClient) -> None:
    queue = deploy_echo(cluster)
    reply = client.http(queue, "GET", "/echo/some/path", query_string=b"a=b&c=d",
                        headers=[[b"x-foo", b"bar"], [b"host", b"example"]], root_path="/echo")
    assert reply.types == ["start"], [(e.type, e.body) for e in reply.events]
    start = reply.terminal
    assert start.body["status"] == 200
    assert start.body["more_body"] is False
    assert response_headers(start)[b"content-type"].startswith(b"application/json")
    assert json.loads(start.body["body"]) == {
        "method": "GET", "path": "/echo/some/path", "query": {"a": "b", "c": "d"},
        "body_len": 0, "header": "bar"}
    assert start.body["seq"] == 0
    assert isinstance(start.body["replica"], str) and start.body["replica"]
    assert start.properties.correlation_id == reply.request_id
    assert start.properties.type == "start"
    assert all(isinstance(n, bytes) and isinstance(v, bytes) for n, v in start.body["headers"])
    client.settle(0.3)  # "Nothing follows a terminal event."
    assert len(client.events_of(reply.request_id)) == 1


def test_start_event_carries_inbox(cluster: Any, client: ForeignClient) -> None:
    """docs/protocol.md, Reply events: `start` has the fields `inbox`, `status`, `headers`,
    `body`, `more_body`."""
    queue = deploy_echo(cluster)
    reply = client.http(queue, "GET", "/echo", root_path="/echo")
    assert reply.types == ["start"]
    start = reply.terminal.body
    assert {"status", "headers", "body", "more_body"} <= start.keys(), start
    assert start.get("inbox", "").startswith(f"bs.{cluster.name}.inbox."), start


def test_chunked_request_body(cluster: Any, client: ForeignClient) -> None:
    queue = deploy_echo(cluster)
    body = os.urandom(3 * CHUNK + 12345)
    reply = client.http(queue, "POST", "/echo/upload", body=body, root_path="/echo",
                        headers=[[b"content-type", b"application/octet-stream"],
                                 [b"content-length", str(len(body)).encode()]])
    assert reply.types == ["accepted", "start"], [(e.type, e.body) for e in reply.events]
    assert_event_fields(reply)
    accepted, start = reply.events
    assert accepted.body["inbox"].startswith(f"bs.{cluster.name}.inbox.")
    assert start.body["status"] == 200
    assert json.loads(start.body["body"])["body_len"] == len(body)


def test_streaming_response(cluster: Any, client: ForeignClient) -> None:
    from starlette.responses import StreamingResponse

    from broker_serve import serve

    @serve.deployment
    class Streamer:
        def __call__(self, request: Any) -> StreamingResponse:
            def chunks() -> Iterator[bytes]:
                for i in range(5):
                    yield f"chunk-{i};".encode()
                    time.sleep(0.05)

            return StreamingResponse(chunks(), media_type="text/plain")

    serve.run(Streamer.bind(), name="stream", route_prefix="/stream")
    queue = request_queue(cluster.name, "stream", "Streamer")
    reply = client.http(queue, "GET", "/stream", root_path="/stream")
    assert_event_fields(reply)
    assert reply.types[0] == "start" and set(reply.types[1:]) == {"body"}, reply.types
    assert len(reply.events) >= 2
    assert reply.events[0].body["status"] == 200
    assert all(e.body["more_body"] for e in reply.events[:-1])
    assert reply.terminal.body["more_body"] is False
    # Each yielded chunk travels as its own event (start carries the first), not buffered.
    assert [e.body["body"] for e in reply.events if e.body["body"]] == [
        f"chunk-{i};".encode() for i in range(5)]
    assert reply.response_body() == b"".join(f"chunk-{i};".encode() for i in range(5))


def test_fastapi_ingress_under_route_prefix(cluster: Any, client: ForeignClient) -> None:
    from fastapi import FastAPI

    from broker_serve import serve

    app = FastAPI()

    @serve.deployment
    @serve.ingress(app)
    class Api:
        @app.get("/world")
        def world(self, name: str = "nobody") -> dict[str, str]:
            return {"hello": name}

        @app.post("/items/{item_id}")
        def item(self, item_id: int, payload: dict[str, Any]) -> dict[str, Any]:
            return {"id": item_id, "payload": payload}

    serve.run(Api.bind(), name="api", route_prefix="/hello")
    queue = request_queue(cluster.name, "api", "Api")

    reply = client.http(queue, "GET", "/hello/world", query_string=b"name=go",
                        root_path="/hello")
    assert reply.types == ["start"], [(e.type, e.body) for e in reply.events]
    assert reply.terminal.body["status"] == 200
    assert json.loads(reply.terminal.body["body"]) == {"hello": "go"}

    payload = json.dumps({"x": [1, 2]}).encode()
    reply = client.http(queue, "POST", "/hello/items/7", body=payload, root_path="/hello",
                        headers=[[b"content-type", b"application/json"],
                                 [b"content-length", str(len(payload)).encode()]])
    assert reply.terminal.body["status"] == 200, reply.terminal.body
    assert json.loads(reply.terminal.body["body"]) == {"id": 7, "payload": {"x": [1, 2]}}

    reply = client.http(queue, "GET", "/hello/nowhere", root_path="/hello")
    assert reply.terminal.body["status"] == 404


def test_missing_or_wrong_version_header(cluster: Any, client: ForeignClient) -> None:
    queue = deploy_echo(cluster)
    body = pack({"scope": {"method": "GET", "path": "/echo"}, "body": b"", "more_body": False})
    for headers in ({}, {"bs-version": 2}, {"bs-version": "1"}):
        request_id = client.publish(queue, "http", body, headers=headers)
        assert_error(client.collect(request_id), 400, "UnsupportedProtocolVersion")


def test_malformed_message(cluster: Any, client: ForeignClient) -> None:
    queue = deploy_echo(cluster)
    for body in (b"\xc1 this is not msgpack", pack([1, 2, 3]),
                 pack({"scope": {"path": "/echo"}, "body": b"", "more_body": False})):
        request_id = client.publish(queue, "http", body)
        assert_error(client.collect(request_id), 400, "MalformedMessage")


def test_deadline_exceeded(cluster: Any, client: ForeignClient) -> None:
    queue = deploy_echo(cluster)
    body = pack({"scope": {"method": "GET", "path": "/echo"}, "body": b"", "more_body": False})
    past = int(time.time() * 1000) - 5_000
    request_id = client.publish(queue, "http", body, headers={"bs-version": 1, "bs-deadline": past})
    assert_error(client.collect(request_id), 408, "DeadlineExceeded")
    # A deadline in the future is fine.
    future = int(time.time() * 1000) + 60_000
    request_id = client.publish(queue, "http", body,
                                headers={"bs-version": 1, "bs-deadline": future})
    reply = client.collect(request_id)
    assert reply.types == ["start"] and reply.terminal.body["status"] == 200


class _TouchOnLoad:
    """Pickles to `open(path, "w")`: loading the pickle creates the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_bad_signature_is_never_unpickled(cluster: Any, client: ForeignClient,
                                          tmp_path: Path) -> None:
    import pickle

    queue = deploy_echo(cluster)
    marker = tmp_path / "unpickled.marker"
    pickled = pickle.dumps(((_TouchOnLoad(str(marker)),), {}))
    # Check that the payload does what it should when it is loaded, then remove the evidence.
    args, _kwargs = pickle.loads(pickled)
    args[0].close()
    assert marker.exists()
    marker.unlink()

    for sig in (os.urandom(32), b"", b"\x00" * 32):
        request_id = client.publish(queue, "call",
                                    pack({"method": "add", "pickled": pickled, "sig": sig}))
        assert_error(client.collect(request_id), 403, "UntrustedPayload")
    assert not marker.exists()


def test_no_such_method(cluster: Any, client: ForeignClient) -> None:
    queue = deploy_echo(cluster)
    for method in ("does_not_exist", "nope"):
        assert_error(client.call(queue, method, 1, 2), 404, "NoSuchMethod")


def test_call_with_plain_args(cluster: Any, client: ForeignClient) -> None:
    queue = deploy_echo(cluster)
    reply = client.call(queue, "add", 2, 3, scale=10)
    assert reply.types == ["result"], [(e.type, e.body) for e in reply.events]
    result = reply.terminal.body
    assert result["more"] is False
    assert result["value"] == {"sum": 50, "types": ["int", "int"]}
    assert result["seq"] == 0 and result["replica"]


def test_message_without_reply_to_is_dead_lettered(cluster: Any, client: ForeignClient) -> None:
    queue = deploy_echo(cluster)
    body = pack({"scope": {"method": "GET", "path": "/echo"}, "body": b"", "more_body": False})
    request_id = client.publish(queue, "http", body, reply_to=False)
    dead = dead_letter_queue(cluster.name)
    deadline = time.monotonic() + TERMINAL_TIMEOUT_S
    found = None
    while found is None and time.monotonic() < deadline:
        method, properties, payload = client.channel.basic_get(dead, auto_ack=True)
        if method is None:
            client.settle(0.2)
        elif properties.message_id == request_id:
            found = (properties, payload)
    assert found is not None, f"{request_id} never reached {dead}"
    properties, payload = found
    assert payload == body
    assert unpack(payload)["scope"]["path"] == "/echo"
    assert properties.correlation_id == request_id
    deaths = (properties.headers or {}).get("x-death")
    assert deaths and deaths[0]["queue"] == queue and deaths[0]["reason"] == "rejected", deaths
    assert client.events_of(request_id) == []


def test_unroutable_request_is_returned(cluster: Any, client: ForeignClient) -> None:
    queue = request_queue(cluster.name, "no-such-app", "Nothing")
    body = pack({"scope": {"method": "GET", "path": "/"}, "body": b"", "more_body": False})
    request_id = client.publish(queue, "http", body, mandatory=True)
    deadline = time.monotonic() + 5
    while not client.returned and time.monotonic() < deadline:
        client.settle(0.1)
    assert len(client.returned) == 1
    method, properties, payload = client.returned[0]
    assert method.reply_code == 312 and method.reply_text == "NO_ROUTE"
    assert method.routing_key == queue
    assert properties.correlation_id == request_id and payload == body
    assert client.events_of(request_id) == []
