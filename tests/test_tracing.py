"""OpenTelemetry traces (docs/architecture.md, "Tracing"): a cluster whose processes export
OTLP/HTTP to a receiver run here, checked span by span.

The cluster runs detached (`broker-serve start`) with OTEL_* set for its processes only; this
test process keeps tracing off, so its own handle calls show what an untraced caller sends.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgpack
import pika
import pytest
import requests
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from starlette.requests import Request
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from broker_serve import serve
from broker_serve.observability import tracing

from .conftest import AMQP_URL, Cluster, free_port, namespace
from .grpc_protos import SERVICER_FUNCTIONS, compile_protos
from .waiting import wait_for

BROKER_SERVE = [sys.executable, "-m", "broker_serve"]
SERVER, CONSUMER, CLIENT, PRODUCER, INTERNAL = 2, 5, 3, 4, 1  # proto Span.SpanKind


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    start_ns: int
    end_ns: int
    error: bool


@dataclass
class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces with an ExportTraceServiceRequest."""

    spans: list[Span] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def take(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        got = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                got += [Span(s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.name,
                             s.kind, _attributes(s.attributes), resource,
                             s.start_time_unix_nano, s.end_time_unix_nano,
                             s.status.code == 2) for s in scope_spans.spans]
        with self.changed:
            self.spans += got
            self.changed.notify_all()

    def wait_for(self, found: Callable[[list[Span]], Any], timeout: float = 15) -> Any:
        """What `found` returns once it is truthy for the spans received."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not (result := found(list(self.spans))):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = [(s.name, s.trace_id[:8]) for s in self.spans]
                    raise AssertionError(f"spans never arrived; received {names}")
                self.changed.wait(left)
        return result


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@contextlib.contextmanager
def receiving() -> Iterator[tuple[Receiver, int]]:
    """A Receiver listening on a free port of its own."""
    received = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            assert self.path == "/v1/traces", self.path
            received.take(body)
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield received, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@serve.deployment
class Adder:
    def add(self, x: int) -> int:
        return x + 1


@serve.deployment
class Doubler:
    async def double(self, x: int) -> int:
        return x * 2


@serve.deployment
class Ingress:
    def __init__(self, adder: Any, doubler: Any) -> None:
        self.adder, self.doubler = adder, doubler

    # Sync: the handle calls run in the replica's threads, in the request's context.
    def __call__(self, request: Request) -> dict[str, int]:
        x = int(request.query_params["x"])
        return {"added": self.adder.add.remote(x).result(),
                "doubled": self.doubler.double.remote(x).result()}


@dataclass
class Traced:
    cluster: Cluster
    receiver: Receiver


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    """A detached cluster whose processes export spans to a Receiver, serving the app; one
    for the module's tests, since starting it is most of their time."""
    with pytest.MonkeyPatch.context() as monkeypatch, \
            namespace(monkeypatch, tmp_path_factory.mktemp("traced")) as cluster, \
            receiving() as (received, port):
        env = {**cluster.env, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
               "OTEL_BSP_SCHEDULE_DELAY": "100"}
        start = subprocess.run([*BROKER_SERVE, "start", "--http-port", str(cluster.port)],
                               env=env, capture_output=True, text=True, timeout=90)
        assert start.returncode == 0, start.stdout + start.stderr
        try:
            assert tracing.traces is None  # this process stays untraced
            serve.run(Ingress.bind(Adder.bind(), Doubler.bind()), name="traced",
                      route_prefix="/traced")
            yield Traced(cluster, received)
        finally:
            subprocess.run([*BROKER_SERVE, "stop"], env=cluster.env, capture_output=True,
                           timeout=60)


def test_one_request_is_one_trace_across_processes(traced: Traced) -> None:
    cluster, traced_cluster = traced.cluster, traced.receiver
    answer = requests.get(f"{cluster.url}/traced/?x=4", timeout=30)
    assert answer.status_code == 200 and answer.json() == {"added": 5, "doubled": 8}
    server = traced_cluster.wait_for(lambda spans: next(
        (s for s in spans if s.kind == SERVER and s.name == "GET /traced"), None))
    # 9 spans: the proxy's; per deployment (3) its queue wait and processing; 2 handle calls.
    trace = traced_cluster.wait_for(lambda spans: (
        found if len(found := [s for s in spans if s.trace_id == server.trace_id]) >= 9
        else None))
    assert len(trace) == 9, [s.name for s in trace]
    assert server.parent_id == ""  # the client sent no traceparent
    assert server.attributes["http.route"] == "/traced"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["broker_serve.application"] == "traced"
    assert server.resource["service.name"] == "broker-serve-proxy"

    def replica_spans(deployment: str, parent: Span) -> tuple[Span, Span]:
        mine = [s for s in trace if s.attributes.get("broker_serve.deployment") == deployment
                and s.kind in (CONSUMER, INTERNAL)]
        [process] = [s for s in mine if s.kind == CONSUMER]
        [wait] = [s for s in mine if s.kind == INTERNAL]
        for span in (process, wait):
            assert span.parent_id == parent.span_id, (span.name, parent.name)
            assert span.attributes["broker_serve.application"] == "traced"
            assert span.attributes["broker_serve.replica"] == span.resource[
                "service.instance.id"]
            assert span.resource["service.name"] == "broker-serve-replica"
        assert process.attributes["broker_serve.status"] == 200 and not process.error
        assert wait.name == f"queue traced/{deployment}"
        # The wait ends at pickup, before the processing starts.
        assert wait.start_ns <= wait.end_ns <= process.start_ns
        return process, wait

    ingress, _ = replica_spans("Ingress", server)
    assert ingress.name == "process traced/Ingress.__call__"
    assert ingress.attributes["http.response.status_code"] == 200
    assert server.start_ns <= ingress.start_ns and ingress.end_ns <= server.end_ns
    calls = {s.attributes["broker_serve.deployment"]: s for s in trace if s.kind == CLIENT}
    assert set(calls) == {"Adder", "Doubler"}
    replicas = set()
    for deployment, method in (("Adder", "add"), ("Doubler", "double")):
        call = calls[deployment]
        assert call.name == f"call traced/{deployment}.{method}"
        assert call.parent_id == ingress.span_id
        assert call.attributes["broker_serve.status"] == 200
        process, _ = replica_spans(deployment, call)
        assert process.name == f"process traced/{deployment}.{method}"
        assert process.attributes["broker_serve.method"] == method
        assert ingress.start_ns <= call.start_ns <= process.start_ns <= call.end_ns
        replicas.add(process.attributes["broker_serve.replica"])
    assert len(replicas | {ingress.attributes["broker_serve.replica"]}) == 3


def test_foreign_traceparent_is_the_parent_and_untraced_callers_send_none(
        traced: Traced) -> None:
    cluster, traced_cluster = traced.cluster, traced.receiver
    # A publisher in another language, following docs/protocol.md, with its own trace.
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        reply_queue = channel.queue_declare("", exclusive=True).method.queue
        channel.basic_publish(
            "", f"bs.{cluster.name}.traced.Adder",
            msgpack.packb({"method": "add", "args": [41], "kwargs": {}}),
            pika.BasicProperties(
                content_type="application/msgpack", type="call", correlation_id="foreign-1",
                reply_to=reply_queue,
                headers={"bs-version": 1, "bs-published-us": time.time_ns() // 1000,
                         "traceparent": f"00-{trace_id}-{span_id}-01",
                         "tracestate": "vendor=abc"}))
        for _, properties, body in channel.consume(reply_queue, inactivity_timeout=30):
            assert properties is not None, "no reply"
            assert msgpack.unpackb(body)["value"] == 42
            break
        channel.cancel()
    finally:
        connection.close()
    spans = traced_cluster.wait_for(lambda spans: (
        found if len(found := [s for s in spans if s.trace_id == trace_id]) >= 2 else None))
    assert {s.parent_id for s in spans} == {span_id}
    assert {s.attributes["messaging.message.id"] for s in spans} == {"foreign-1"}

    # This process traces nothing: its call carries no traceparent, so the replica's
    # processing span starts a trace of its own, with the queue wait as its child.
    response = serve.get_deployment_handle("Adder", "traced").add.remote(1)
    assert response.result(timeout_s=30) == 2
    roots = traced_cluster.wait_for(lambda spans: (found if len(found := [
        s for s in spans if s.attributes.get("messaging.message.id") == response.request_id
    ]) >= 2 else None))
    [process] = [s for s in roots if s.kind == CONSUMER]
    [wait] = [s for s in roots if s.kind == INTERNAL]
    assert process.parent_id == "" and wait.parent_id == process.span_id
    assert wait.trace_id == process.trace_id


def test_a_job_is_traced_from_its_submission(traced: Traced) -> None:
    cluster, received = traced.cluster, traced.receiver
    accepted = requests.post(f"{cluster.url}/traced/?x=1", headers={"Prefer": "respond-async"},
                             timeout=30)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["id"]
    result = requests.get(f"{cluster.url}/-/jobs/{job_id}/result?wait_s=20", timeout=30)
    assert result.status_code == 200, result.text
    spans = received.wait_for(lambda spans: (found if len(found := [
        s for s in spans if s.attributes.get("broker_serve.job_id") == job_id]) >= 2 else None))
    [submit] = [s for s in spans if s.kind == PRODUCER]
    [process] = [s for s in spans if s.kind == CONSUMER]
    assert submit.name == "submit traced/Ingress"
    assert process.parent_id == submit.span_id and process.trace_id == submit.trace_id
    assert process.attributes["broker_serve.deployment"] == "Ingress"
    server = received.wait_for(lambda spans: next(
        (s for s in spans if s.span_id == submit.parent_id), None))
    assert server.kind == SERVER and server.name == "POST /traced"
    assert server.attributes["http.response.status_code"] == 202


@pytest.mark.parametrize(("environ", "names"), [
    ({}, []),
    ({"OTEL_SERVICE_NAME": "shop", "OTEL_TRACES_SAMPLER": "always_on"}, []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
    ({"OTEL_TRACES_EXPORTER": "console, otlp"}, ["console", "otlp"]),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, []),
    ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"}, []),
])
def test_the_standard_variables_decide_whether_a_process_traces(
        environ: dict[str, str], names: list[str]) -> None:
    assert tracing.exporter_names(environ) == names


def test_untraced_request_path_never_imports_opentelemetry() -> None:
    """Off means `traces is None`, and neither broker-serve's spans nor OpenTelemetry's
    tracing SDK imported, in every process on the request path. (redis-py 8 imports parts
    of OpenTelemetry's API and metrics SDK when they are installed; they stay inert.)"""
    program = (
        "import sys\n"
        "import broker_serve.proxy.server, broker_serve.replica.replica, broker_serve.serve\n"
        "from broker_serve.observability import tracing\n"
        "for role in ('proxy', 'replica', 'driver'):\n"
        "    tracing.setup(role)\n"
        "assert tracing.traces is None\n"
        "print(sorted(m for m in sys.modules if m in ('broker_serve.observability.otel',\n"
        "    'opentelemetry.sdk.trace')))\n")
    environ = {key: value for key, value in os.environ.items() if not key.startswith("OTEL_")}
    ran = subprocess.run([sys.executable, "-c", program], env=environ, capture_output=True,
                         text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "[]"
    traced = {**environ, "OTEL_TRACES_EXPORTER": "console"}  # the same program, traced
    ran = subprocess.run([sys.executable, "-c", program.replace("is None", "is not None")],
                         env=traced, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "['broker_serve.observability.otel', 'opentelemetry.sdk.trace']"


chat_api = FastAPI()


@serve.deployment
@serve.ingress(chat_api)
class Chat:
    @chat_api.websocket("/")
    async def echo(self, ws: WebSocket) -> None:
        await ws.accept()
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                await ws.send_text(await ws.receive_text())

    @chat_api.websocket("/closed")
    async def refuse(self, ws: WebSocket) -> None:
        await ws.close()  # before accepting: the client is answered 403


def test_a_websocket_session_is_one_trace_from_the_clients_traceparent(
        traced: Traced) -> None:
    cluster, received = traced.cluster, traced.receiver
    serve.run(Chat.bind(), name="chat", route_prefix="/chat")
    url = f"ws://127.0.0.1:{cluster.port}/chat"
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    with connect(f"{url}/", additional_headers={
            "traceparent": f"00-{trace_id}-{span_id}-01"}) as websocket:
        for text in ("one", "two", "three"):
            websocket.send(text)
            assert websocket.recv(timeout=30) == text
        last_echo_ns = time.time_ns()
    # broker-serve's 3 spans: the proxy's, for the whole session; the replica's queue wait
    # and processing. (FastAPI's own telemetry adds spans, parented on the forwarded headers.)
    def sessions_spans(spans: list[Span]) -> list[Span] | None:
        found = [s for s in spans
                 if s.trace_id == trace_id and "broker_serve.application" in s.attributes]
        return found if {s.kind for s in found} == {SERVER, CONSUMER, INTERNAL} else None

    session = received.wait_for(sessions_spans)
    [server] = [s for s in session if s.kind == SERVER]
    assert server.parent_id == span_id  # the client's handshake header is the parent
    assert server.name == "WEBSOCKET /chat"
    assert (server.attributes["url.path"], server.attributes["http.route"]) == ("/chat/", "/chat")
    assert server.attributes["broker_serve.application"] == "chat"
    assert server.attributes["broker_serve.status"] == 101 and not server.error
    assert server.resource["service.name"] == "broker-serve-proxy"
    [process] = [s for s in session if s.kind == CONSUMER]
    [wait] = [s for s in session if s.kind == INTERNAL]
    for span in (process, wait):
        assert span.parent_id == server.span_id, span.name
        assert span.attributes["broker_serve.application"] == "chat"
        assert span.attributes["broker_serve.deployment"] == "Chat"
        assert span.attributes["broker_serve.kind"] == "websocket"
        assert span.attributes["broker_serve.replica"] == span.resource["service.instance.id"]
        assert span.resource["service.name"] == "broker-serve-replica"
    assert wait.name == "queue chat/Chat"
    assert process.name == "process chat/Chat.websocket"
    assert process.attributes["broker_serve.method"] == "websocket"
    assert process.attributes["broker_serve.status"] == 101 and not process.error
    assert server.start_ns <= process.start_ns and wait.start_ns <= wait.end_ns <= process.start_ns
    # Both last until the session ends, not just its handshake.
    assert last_echo_ns <= server.end_ns and last_echo_ns <= process.end_ns
    # The app's own spans (FastAPI makes some once a tracer provider is set) are children of
    # the processing span: the replica points the scope's traceparent at it, where the
    # client's header made them the proxy span's siblings.
    def apps_spans(spans: list[Span]) -> list[Span] | None:
        found = [s for s in spans
                 if s.trace_id == trace_id and "broker_serve.application" not in s.attributes]
        return found or None

    apps = received.wait_for(apps_spans)
    outermost = [s for s in apps if s.parent_id not in {a.span_id for a in apps}]
    assert outermost and {s.parent_id for s in outermost} == {process.span_id}, outermost

    # The app closes before accepting: both ends say 403, and no traceparent, a new trace.
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{url}/closed")
    assert refused.value.response.status_code == 403
    refusal = received.wait_for(lambda spans: next((
        s for s in spans if s.kind == SERVER and s.attributes.get("url.path") == "/chat/closed"
    ), None))
    assert refusal.parent_id == "" and refusal.name == "WEBSOCKET /chat"
    assert refusal.attributes["broker_serve.status"] == 403 and not refusal.error
    refused_process = received.wait_for(lambda spans: next(
        (s for s in spans if s.parent_id == refusal.span_id and s.kind == CONSUMER), None))
    assert refused_process.name == "process chat/Chat.websocket"
    assert refused_process.attributes["broker_serve.status"] == 403


@serve.deployment
class Greeting:
    def __call__(self, message: Any) -> Any:
        from user_defined_protos_pb2 import UserDefinedResponse

        return UserDefinedResponse(greeting=f"hello {message.name}", num=message.num * 2)


# Last in the module: it turns on the traced cluster's gRPC server.
def test_a_grpc_call_is_traced_from_the_clients_traceparent(
        traced: Traced, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import grpc

    received = traced.receiver
    app_dir = compile_protos(tmp_path)  # the driver's directory: proxy and replica import it
    monkeypatch.chdir(app_dir)
    monkeypatch.syspath_prepend(str(app_dir))
    port = free_port()
    serve.start(grpc_options={"port": port, "grpc_servicer_functions": SERVICER_FUNCTIONS})
    serve.run(Greeting.bind(), name="rpc", route_prefix="/rpc")  # in the route table
    import user_defined_protos_pb2 as pb2
    import user_defined_protos_pb2_grpc as pb2_grpc

    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    metadata = (("application", "rpc"), ("traceparent", f"00-{trace_id}-{span_id}-01"))

    def answer() -> Any:
        try:
            return stub.__call__(pb2.UserDefinedMessage(name="ann", num=21), metadata=metadata)
        except grpc.RpcError as exc:  # until the proxy's server and route table have it
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                return None
            raise

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb2_grpc.UserDefinedServiceStub(channel)
            assert wait_for(answer, timeout=30) == pb2.UserDefinedResponse(greeting="hello ann",
                                                                           num=42)
        server = received.wait_for(lambda spans: next(
            (s for s in spans if s.trace_id == trace_id and s.kind == SERVER
             and s.attributes.get("rpc.grpc.status_code") == 0), None))
        assert server.parent_id == span_id  # the client's metadata is the parent
        assert server.name == "userdefinedprotos.UserDefinedService/__call__"
        assert (server.attributes["rpc.system"], server.attributes["rpc.method"]) == \
            ("grpc", "__call__")
        assert server.attributes["broker_serve.application"] == "rpc" and not server.error
        assert server.resource["service.name"] == "broker-serve-proxy"
        spans = received.wait_for(lambda spans: (found if len(found := [
            s for s in spans if s.parent_id == server.span_id]) >= 2 else None))
        [process] = [s for s in spans if s.kind == CONSUMER]
        [wait] = [s for s in spans if s.kind == INTERNAL]
        assert process.trace_id == wait.trace_id == trace_id
        assert process.name == "process rpc/Greeting.__call__"
        assert process.attributes["broker_serve.kind"] == "grpc" and not process.error
        assert process.attributes["broker_serve.request_id"] == \
            server.attributes["broker_serve.request_id"]
        assert server.start_ns <= process.start_ns <= process.end_ns <= server.end_ns
    finally:
        for name in ("user_defined_protos_pb2", "user_defined_protos_pb2_grpc"):
            sys.modules.pop(name, None)
