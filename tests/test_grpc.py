"""gRPC ingress, the replica side and end to end, on Ray's gRPC guide example: its
user_defined_protos.proto compiled here with grpcio-tools into the app dir.

The first tests publish `grpc` messages as docs/protocol.md ("`grpc` body") describes, as a
foreign caller would; the others call through the proxy's gRPC server with a grpc client.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pika
import pytest

from broker_serve import serve
from broker_serve.grpc_util import RayServegRPCContext

from .conftest import free_port
from .grpc_protos import SERVICER_FUNCTIONS, compile_protos
from .test_protocol_foreign import ForeignClient, pack, request_queue
from .waiting import wait_for

SERVICE = "/userdefinedprotos.UserDefinedService"


@serve.deployment
class GrpcDeployment:  # Ray's guide example, plus what the tests need to see
    def __init__(self, markers: str = "") -> None:
        self.markers = Path(markers) if markers else None

    def __call__(self, user_message: Any) -> Any:
        from user_defined_protos_pb2 import UserDefinedResponse

        greeting = f"Hello {user_message.name} from {user_message.origin}"
        num = user_message.num * 2
        return UserDefinedResponse(greeting=greeting, num=num)

    @serve.multiplexed(max_num_models_per_replica=1)
    async def get_model(self, model_id: str) -> str:
        return f"loading model: {model_id}"

    async def Multiplexing(self, user_message: Any) -> Any:  # named as the rpc
        from user_defined_protos_pb2 import UserDefinedResponse2

        model_id = serve.get_multiplexed_model_id()
        model = await self.get_model(model_id)
        return UserDefinedResponse2(greeting=f"Method2 called model, {model}")

    def Streaming(self, user_message: Any) -> Any:  # named as the rpc
        from user_defined_protos_pb2 import UserDefinedResponse

        for i in range(10):
            greeting = f"{i}: Hello {user_message.name} from {user_message.origin}"
            num = user_message.num * 2 + i
            yield UserDefinedResponse(greeting=greeting, num=num)


@serve.deployment
class Checked:
    """Sets its status through RayServegRPCContext, fails, and streams until cancelled."""

    def __init__(self, markers: str) -> None:
        self.markers = Path(markers)

    def __call__(self, user_message: Any, grpc_context: RayServegRPCContext) -> Any:
        import grpc
        from user_defined_protos_pb2 import UserDefinedResponse

        seen = dict(grpc_context.invocation_metadata())
        if user_message.name == "fail":
            raise ValueError(f"no such user {user_message.origin!r}")
        grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
        grpc_context.set_details(f"not found: {user_message.name}")
        grpc_context.set_trailing_metadata([("checked-by", "Checked")])
        return UserDefinedResponse(greeting=seen.get("x-greeting", ""), num=len(seen))

    async def Streaming(self, user_message: Any) -> Any:  # named as the rpc
        import asyncio

        from user_defined_protos_pb2 import UserDefinedResponse

        try:
            for i in range(10_000):
                yield UserDefinedResponse(greeting=user_message.name, num=i)
                await asyncio.sleep(0.05)  # a slow token stream
        finally:
            (self.markers / f"finally-{user_message.name}").write_text("closed")

    def _private(self, user_message: Any) -> Any:
        raise AssertionError("a private method must not be reachable")


@pytest.fixture
def protos(cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The guide's generated modules in the app dir (the driver's working directory, which
    the replicas import from), and a cluster started with grpc_options naming them."""
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    compile_protos(app_dir)
    monkeypatch.chdir(app_dir)
    monkeypatch.syspath_prepend(str(app_dir))
    cluster.grpc_port = free_port()
    serve.start(grpc_options={"port": cluster.grpc_port,
                              "grpc_servicer_functions": SERVICER_FUNCTIONS})
    import user_defined_protos_pb2

    try:
        yield user_defined_protos_pb2
    finally:
        for name in ("user_defined_protos_pb2", "user_defined_protos_pb2_grpc"):
            sys.modules.pop(name, None)


@pytest.fixture
def client() -> Iterator[ForeignClient]:
    foreign = ForeignClient()
    try:
        yield foreign
    finally:
        foreign.close()


def publish_grpc(client: ForeignClient, queue: str, method: str, message: Any, *,
                 streaming: bool = False, metadata: list[list[str]] | None = None,
                 model_id: str | None = None) -> str:
    body: dict[str, Any] = {"method": f"{SERVICE}/{method}", "body": message.SerializeToString(),
                            "streaming": streaming, "metadata": metadata or []}
    if model_id is not None:
        body["multiplexed_model_id"] = model_id
    return client.publish(queue, "grpc", pack(body))


def results(reply: Any, message_class: Any) -> list[Any]:
    assert all(e.type == "result" for e in reply.events), [(e.type, e.body)
                                                             for e in reply.events]
    return [message_class.FromString(e.body["body"]) for e in reply.events if "body" in e.body]


def cancel(cluster: Any, request_id: str) -> None:
    """docs/protocol.md, "Cancellation": the broadcast alone."""
    connection = pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@localhost:5672/"))
    try:
        connection.channel().basic_publish(
            f"bs.{cluster.name}.cancel", "",
            pack({"ids": [request_id], "expires": int(time.time() * 1000) + 60_000}),
            pika.BasicProperties(type="cancel", content_type="application/msgpack",
                                 headers={"bs-version": 1}))
    finally:
        connection.close()


# --- the replica side, through the wire protocol ----------------------------------------------
def test_guide_methods_answer_grpc_messages(cluster: Any, protos: Any,
                                            client: ForeignClient) -> None:
    serve.run(GrpcDeployment.bind(), name="guide", route_prefix=None)
    queue = request_queue(cluster.name, "guide", "GrpcDeployment")
    request = protos.UserDefinedMessage(name="foo", origin="bar", num=30)

    unary = client.collect(publish_grpc(client, queue, "__call__", request))
    assert [e.body["more"] for e in unary.events] == [False]
    assert results(unary, protos.UserDefinedResponse) == [
        protos.UserDefinedResponse(greeting="Hello foo from bar", num=60)]
    assert "code" not in unary.terminal.body  # OK

    multiplexed = client.collect(publish_grpc(client, queue, "Multiplexing",
                                              protos.UserDefinedMessage2(), model_id="999"))
    assert results(multiplexed, protos.UserDefinedResponse2) == [
        protos.UserDefinedResponse2(greeting="Method2 called model, loading model: 999")]

    stream = client.collect(publish_grpc(client, queue, "Streaming", request, streaming=True))
    assert [e.body["more"] for e in stream.events] == [True] * 10 + [False]
    assert results(stream, protos.UserDefinedResponse) == [
        protos.UserDefinedResponse(greeting=f"{i}: Hello foo from bar", num=60 + i)
        for i in range(10)]


def test_context_sets_code_details_and_trailing_metadata(cluster: Any, protos: Any,
                                                         client: ForeignClient,
                                                         tmp_path: Path) -> None:
    serve.run(Checked.bind(str(tmp_path)), name="checked", route_prefix=None)
    queue = request_queue(cluster.name, "checked", "Checked")
    reply = client.collect(publish_grpc(
        client, queue, "__call__", protos.UserDefinedMessage(name="ann"),
        metadata=[["x-greeting", "hi"], ["x-other", "1"]]))
    final = reply.terminal.body
    assert final["code"] == 5 and final["details"] == "not found: ann", final  # NOT_FOUND
    assert final["trailing_metadata"] == [["checked-by", "Checked"]]
    assert results(reply, protos.UserDefinedResponse) == [
        protos.UserDefinedResponse(greeting="hi", num=2)]


def test_user_exception_unknown_and_private_methods(cluster: Any, protos: Any,
                                                    client: ForeignClient,
                                                    tmp_path: Path) -> None:
    serve.run(Checked.bind(str(tmp_path)), name="checked", route_prefix=None)
    queue = request_queue(cluster.name, "checked", "Checked")
    failed = client.collect(publish_grpc(
        client, queue, "__call__", protos.UserDefinedMessage(name="fail", origin="zed")))
    body = failed.terminal.body
    assert failed.types == ["error"] and body["status"] == 500, body
    assert body["error"] == "ValueError" and body["message"] == "no such user 'zed'", body
    assert "Traceback" not in str(body) and "module" not in body

    for method in ("Missing", "_private"):
        missing = client.collect(client.publish(queue, "grpc", pack(
            {"method": f"{SERVICE}/{method}", "body": b""})))
        assert missing.terminal.body["status"] == 404, missing.terminal.body
        assert missing.terminal.body["error"] == "NoSuchMethod"
    # A method the service has but the deployment does not.
    absent = client.collect(publish_grpc(client, queue, "Multiplexing",
                                         protos.UserDefinedMessage2()))
    assert absent.terminal.body["error"] == "NoSuchMethod", absent.terminal.body
    garbage = client.collect(client.publish(queue, "grpc", pack(
        {"method": f"{SERVICE}/__call__", "body": b"\xff\xff\xff"})))
    assert garbage.terminal.body["status"] == 400, garbage.terminal.body


def test_cancelled_stream_closes_the_generator(cluster: Any, protos: Any,
                                               client: ForeignClient, tmp_path: Path) -> None:
    serve.run(Checked.bind(str(tmp_path)), name="checked", route_prefix=None)
    queue = request_queue(cluster.name, "checked", "Checked")
    name = uuid.uuid4().hex[:8]
    request_id = publish_grpc(client, queue, "Streaming", protos.UserDefinedMessage(name=name),
                              streaming=True)
    first = client.wait_for(request_id, 3)
    assert [protos.UserDefinedResponse.FromString(e.body["body"]).num for e in first] == [0, 1, 2]
    cancel(cluster, request_id)
    reply = client.collect(request_id)
    assert reply.terminal.type == "error" and reply.terminal.body["status"] == 499
    assert wait_for(lambda: (tmp_path / f"finally-{name}").exists(), timeout=10)


# --- end to end, through the proxy's gRPC server -----------------------------------------------
@pytest.fixture
def channel(cluster: Any, protos: Any) -> Iterator[Any]:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as opened:
        grpc.channel_ready_future(opened).result(timeout=30)
        yield opened


def stub(channel: Any) -> Any:
    import user_defined_protos_pb2_grpc

    return user_defined_protos_pb2_grpc.UserDefinedServiceStub(channel)


def when_routed(call: Any) -> Any:
    """The first answer once the proxy's cached route table has the application."""
    import grpc

    def attempt() -> Any:
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                return None
            raise
    return wait_for(attempt, timeout=30)


def test_guide_example_with_two_applications(cluster: Any, protos: Any, channel: Any,
                                             tmp_path: Path) -> None:
    import grpc

    # app2 first: a route table that has app1 then has app2 too (its NOT_FOUND is its own).
    serve.run(Checked.bind(str(tmp_path)), name="app2", route_prefix="/app2")
    serve.run(GrpcDeployment.bind(), name="app1", route_prefix="/app1")
    service = stub(channel)
    request = protos.UserDefinedMessage(name="foo", origin="bar", num=30)
    app1 = (("application", "app1"),)

    response, call = when_routed(lambda: service.__call__.with_call(request, metadata=app1))
    assert response == protos.UserDefinedResponse(greeting="Hello foo from bar", num=60)
    assert call.code() == grpc.StatusCode.OK

    multiplexed = service.Multiplexing(protos.UserDefinedMessage2(),
                                       metadata=(*app1, ("multiplexed_model_id", "999")))
    assert multiplexed.greeting == "Method2 called model, loading model: 999"

    streamed = list(service.Streaming(request, metadata=app1))
    assert streamed == [protos.UserDefinedResponse(greeting=f"{i}: Hello foo from bar",
                                                   num=60 + i) for i in range(10)]

    # The other application, by its metadata: it sets its status through the context.
    with pytest.raises(grpc.RpcError) as info:
        service.__call__(protos.UserDefinedMessage(name="ann"),
                         metadata=(("application", "app2"), ("x-greeting", "hi")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details() == "not found: ann"
    assert ("checked-by", "Checked") in tuple(info.value.trailing_metadata())


def test_user_exception_is_internal_with_its_message(cluster: Any, protos: Any,
                                                     channel: Any, tmp_path: Path) -> None:
    import grpc

    serve.run(Checked.bind(str(tmp_path)), name="app2", route_prefix="/app2")
    service = stub(channel)

    def failing() -> Any:
        with pytest.raises(grpc.RpcError) as info:
            service.__call__(protos.UserDefinedMessage(name="fail", origin="zed"))
        if info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
            return None  # the proxy has not seen the route yet
        return info.value

    error = wait_for(failing, timeout=30)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "no such user 'zed'" in error.details()
    assert "Traceback" not in error.details()


def test_cancelled_streaming_call_stops_the_generator(cluster: Any, protos: Any,
                                                      channel: Any, tmp_path: Path) -> None:
    serve.run(Checked.bind(str(tmp_path)), name="app2", route_prefix="/app2")
    service = stub(channel)
    name = uuid.uuid4().hex[:8]

    def started() -> Any:  # a streaming call raises at its first read, not when made
        call = service.Streaming(protos.UserDefinedMessage(name=name))
        return call, next(call)

    call, first = when_routed(started)
    received = [first.num, next(call).num, next(call).num]
    assert received == [0, 1, 2]
    call.cancel()
    assert wait_for(lambda: (tmp_path / f"finally-{name}").exists(), timeout=15)


def test_concurrent_calls_are_each_answered_once(cluster: Any, protos: Any,
                                                 channel: Any) -> None:
    serve.run(GrpcDeployment.options(max_ongoing_requests=8).bind(), name="app1",
              route_prefix="/app1")
    service = stub(channel)
    when_routed(lambda: service.__call__(protos.UserDefinedMessage(name="warm")))
    futures = [service.__call__.future(protos.UserDefinedMessage(name=f"n{i}", num=i))
               for i in range(32)]
    answers = [future.result(timeout=60) for future in futures]
    assert answers == [protos.UserDefinedResponse(greeting=f"Hello n{i} from ", num=2 * i)
                       for i in range(32)]
