"""The proxy's gRPC ingress end to end: routing by metadata, the status table, Ray's service
API, metrics and access lines, cancellation and concurrency, over real RabbitMQ and Redis."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pika
import pytest
import requests

from broker_serve import serve
from broker_serve.proxy.grpc_api import serve_pb2, serve_pb2_grpc

from .conftest import AMQP_URL, free_port
from .grpc_protos import SERVICER_FUNCTIONS, compile_protos

METHOD = "/userdefinedprotos.UserDefinedService/__call__"


@pytest.fixture
def grpc_cluster(cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                 ) -> Iterator[tuple[Any, str, Any]]:
    """A local cluster serving gRPC on a free port, with Ray's guide protos importable."""
    address, pb2 = _start_grpc(cluster, tmp_path, monkeypatch)
    yield cluster, address, pb2
    sys.modules.pop("user_defined_protos_pb2", None)
    sys.modules.pop("user_defined_protos_pb2_grpc", None)


def _start_grpc(cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                ) -> tuple[str, Any]:
    protos = compile_protos(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [str(protos), os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(str(protos))
    cluster.env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    pb2 = importlib.import_module("user_defined_protos_pb2")
    port = free_port()
    serve.start(grpc_options={"port": port, "grpc_servicer_functions": SERVICER_FUNCTIONS})
    return f"127.0.0.1:{port}", pb2


@serve.deployment
class Greeter:
    def __init__(self, greeting: str) -> None:
        self.greeting = greeting

    async def __call__(self, request: Any) -> Any:
        import user_defined_protos_pb2 as pb2

        if request.name == "boom":
            raise ValueError("no boom allowed")
        if request.name == "slow":
            await asyncio.sleep(request.num / 1000)
        return pb2.UserDefinedResponse(greeting=f"{self.greeting} {request.name}",
                                       num=request.num)


@serve.deployment(max_ongoing_requests=1, max_queued_requests=1)
class Blocked:
    async def __call__(self, request: Any) -> Any:
        import user_defined_protos_pb2 as pb2

        marker = Path(request.origin)
        marker.write_text("started")
        try:
            await asyncio.sleep(request.num / 1000)
        except asyncio.CancelledError:
            marker.write_text("cancelled")
            raise
        return pb2.UserDefinedResponse(greeting="done")


def _call(address: str, pb2: Any, application: str | None = None, timeout: float = 30,
          **fields: Any) -> Any:
    metadata = (("application", application),) if application else None
    with grpc.insecure_channel(address) as channel:
        stub = channel.unary_unary(METHOD, request_serializer=pb2.UserDefinedMessage
                                   .SerializeToString,
                                   response_deserializer=pb2.UserDefinedResponse.FromString)
        return stub(pb2.UserDefinedMessage(**fields), metadata=metadata, timeout=timeout)


def _code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def _wait_for(check: Any, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
            if result:
                return result
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s}s: {check}")
        time.sleep(0.05)


def _api(address: str) -> Any:
    return serve_pb2_grpc.RayServeAPIServiceStub(grpc.insecure_channel(address))


def test_routes_by_application_metadata_and_serves_ray_api(grpc_cluster):
    _, address, pb2 = grpc_cluster
    serve.run(Greeter.bind("hello"), name="english", route_prefix="/en")
    serve.run(Greeter.bind("hallo"), name="german", route_prefix="/de")
    api = _api(address)
    names = _wait_for(lambda: api.ListApplications(serve_pb2.ListApplicationsRequest(),
                                                   timeout=5).application_names)
    assert sorted(names) == ["english", "german"]
    assert api.Healthz(serve_pb2.HealthzRequest(), timeout=5).message == "success"

    english = _call(address, pb2, "english", name="Ann", num=3)
    assert (english.greeting, english.num) == ("hello Ann", 3)
    assert _call(address, pb2, "german", name="Ann").greeting == "hallo Ann"
    code, details = _code_of(lambda: _call(address, pb2, None, name="Ann"))
    assert code == grpc.StatusCode.NOT_FOUND and "Application metadata not set" in details

    serve.delete("german")  # one application left: the metadata may be left out
    _wait_for(lambda: _call(address, pb2, None, name="Bo").greeting == "hello Bo")


def test_status_codes(grpc_cluster, tmp_path):
    cluster, address, pb2 = grpc_cluster
    serve.run(Greeter.bind("hi"), name="greeter", route_prefix="/greeter")
    serve.run(Blocked.bind(), name="blocked", route_prefix="/blocked")
    _wait_for(lambda: _call(address, pb2, "greeter", name="x", timeout=5))

    code, details = _code_of(lambda: _call(address, pb2, "nowhere", name="x"))
    assert code == grpc.StatusCode.NOT_FOUND and "'nowhere' not found" in details

    code, details = _code_of(lambda: _call(address, pb2, "greeter", name="boom"))
    assert code == grpc.StatusCode.INTERNAL
    assert "no boom allowed" in details and "Traceback" not in details

    code, _ = _code_of(lambda: _call(address, pb2, "greeter", timeout=0.5, name="slow",
                                     num=5000))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED

    # One running and one queued fill the bounded queue: the next is refused at once.
    with grpc.insecure_channel(address) as channel:
        stub = channel.unary_unary(METHOD, request_serializer=pb2.UserDefinedMessage
                                   .SerializeToString,
                                   response_deserializer=pb2.UserDefinedResponse.FromString)
        metadata = (("application", "blocked"),)
        running = stub.future(pb2.UserDefinedMessage(origin=str(tmp_path / "a"), num=20_000),
                              metadata=metadata, timeout=30)
        _wait_for(lambda: (tmp_path / "a").exists())
        queued = stub.future(pb2.UserDefinedMessage(origin=str(tmp_path / "b"), num=0),
                             metadata=metadata, timeout=30)
        # In the queue before the probes: one probe published first would take its place.
        _wait_for(lambda: _waiting(f"bs.{cluster.name}.blocked.Blocked") == 1)
        refused = _wait_for(lambda: _refused(stub, pb2, metadata, tmp_path))
        assert refused == grpc.StatusCode.RESOURCE_EXHAUSTED
        running.cancel()
        assert queued.result(timeout=30).greeting == "done"


def _waiting(queue: str) -> int:
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as connection:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)


def _refused(stub: Any, pb2: Any, metadata: Any, tmp_path: Path) -> grpc.StatusCode | None:
    try:
        stub(pb2.UserDefinedMessage(origin=str(tmp_path / "c"), num=0), metadata=metadata,
             timeout=1)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return exc.code()
    return None


def test_cancelled_unary_call_cancels_the_replica_work(grpc_cluster, tmp_path):
    _, address, pb2 = grpc_cluster
    serve.run(Blocked.bind(), name="blocked", route_prefix="/blocked")
    marker = tmp_path / "marker"
    with grpc.insecure_channel(address) as channel:
        stub = channel.unary_unary(METHOD, request_serializer=pb2.UserDefinedMessage
                                   .SerializeToString,
                                   response_deserializer=pb2.UserDefinedResponse.FromString)
        call = stub.future(pb2.UserDefinedMessage(origin=str(marker), num=60_000), timeout=90)
        _wait_for(lambda: marker.exists() and marker.read_text() == "started")
        call.cancel()
    _wait_for(lambda: marker.read_text() == "cancelled")


def test_metrics_count_grpc_calls_by_code(grpc_cluster):
    cluster, address, pb2 = grpc_cluster
    serve.run(Greeter.bind("hi"), name="greeter", route_prefix="/greeter")
    _wait_for(lambda: _call(address, pb2, "greeter", name="x", timeout=5))
    _code_of(lambda: _call(address, pb2, "greeter", name="boom"))

    def counted() -> bool:
        text = requests.get(f"{cluster.url}/-/metrics", timeout=10).text
        ok = (f'broker_serve_proxy_grpc_requests_total{{application="greeter",'
              f'code="OK",method="{METHOD}"}}')
        internal = ok.replace('code="OK"', 'code="INTERNAL"')
        return ok in text and internal in text \
            and "broker_serve_proxy_grpc_request_duration_seconds_bucket" in text
    _wait_for(counted)


async def _concurrent(address: str, pb2: Any, count: int) -> list[Any]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = channel.unary_unary(METHOD, request_serializer=pb2.UserDefinedMessage
                                   .SerializeToString,
                                   response_deserializer=pb2.UserDefinedResponse.FromString)
        return list(await asyncio.gather(*(
            stub(pb2.UserDefinedMessage(name=f"n{i}", num=i), timeout=30)
            for i in range(count))))


def test_concurrent_calls_each_get_their_own_answer(grpc_cluster):
    _, address, pb2 = grpc_cluster
    serve.run(Greeter.bind("hi"), name="greeter", route_prefix="/greeter")
    _wait_for(lambda: _call(address, pb2, None, name="x", timeout=5))
    replies = asyncio.run(_concurrent(address, pb2, 32))
    assert [(r.greeting, r.num) for r in replies] == [(f"hi n{i}", i) for i in range(32)]




def test_a_method_the_deployment_lacks_is_unimplemented(grpc_cluster):
    _, address, pb2 = grpc_cluster
    serve.run(Greeter.bind("hi"), name="greeter", route_prefix="/greeter")
    _wait_for(lambda: _call(address, pb2, "greeter", name="x", timeout=5))
    with grpc.insecure_channel(address) as channel:
        # A registered service's method that Greeter has no method for: the replica's 404.
        lacking = channel.unary_unary(
            "/userdefinedprotos.UserDefinedService/Multiplexing",
            request_serializer=pb2.UserDefinedMessage2.SerializeToString,
            response_deserializer=pb2.UserDefinedResponse2.FromString)
        code, details = _code_of(lambda: lacking(pb2.UserDefinedMessage2(), timeout=10))
        assert code == grpc.StatusCode.UNIMPLEMENTED, (code, details)
        assert "Multiplexing" in details
        # A method no registered service has never reaches a replica.
        unknown = channel.unary_unary("/nowhere.Service/Method")
        code, _ = _code_of(lambda: unknown(b"", timeout=10))
        assert code == grpc.StatusCode.UNIMPLEMENTED
    # An unknown application stays NOT_FOUND.
    code, _ = _code_of(lambda: _call(address, pb2, "nowhere", name="x"))
    assert code == grpc.StatusCode.NOT_FOUND


def test_access_lines_carry_the_request_id(cluster, tmp_path, monkeypatch, capfd):
    # Started in the test, not a fixture: the cluster's processes then write to the stderr
    # capfd reads.
    try:
        address, pb2 = _start_grpc(cluster, tmp_path, monkeypatch)
        _access_line_of_a_call(address, pb2, capfd)
    finally:
        sys.modules.pop("user_defined_protos_pb2", None)
        sys.modules.pop("user_defined_protos_pb2_grpc", None)


def _access_line_of_a_call(address: str, pb2: Any, capfd: pytest.CaptureFixture[str]) -> None:
    serve.run(Greeter.bind("hi"), name="greeter", route_prefix="/greeter")
    _wait_for(lambda: _call(address, pb2, "greeter", name="x", timeout=5))
    with grpc.insecure_channel(address) as channel:
        stub = channel.unary_unary(METHOD, request_serializer=pb2.UserDefinedMessage
                                   .SerializeToString,
                                   response_deserializer=pb2.UserDefinedResponse.FromString)
        reply = stub(pb2.UserDefinedMessage(name="Ann"), timeout=30,
                     metadata=(("application", "greeter"), ("request_id", "grpc-id-7")))
        assert reply.greeting == "hi Ann"
    seen: list[str] = []

    def logged() -> list[str]:  # access lines are written in batches
        seen.extend(capfd.readouterr().err.splitlines())
        return [line for line in seen if "request_id=grpc-id-7 " in line + " "]
    lines = _wait_for(lambda: any(" proxy " in line for line in logged()) and logged(),
                      timeout_s=15)
    assert any(f"proxy broker_serve.access - GRPC {METHOD} OK" in line
               and "application=greeter" in line for line in lines), lines
