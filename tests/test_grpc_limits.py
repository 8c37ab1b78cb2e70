"""The gRPC ingress's limits on untrusted input (docs/architecture.md, "Limits on untrusted
input"): the HTTP limits' settings bound a gRPC message, its metadata and the calls in flight,
each refused with RESOURCE_EXHAUSTED, and the metadata and in-flight refusals counted."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from broker_serve import serve

from .conftest import free_port
from .grpc_protos import SERVICER_FUNCTIONS, compile_protos
from .test_grpc_proxy import METHOD, Greeter, _call, _code_of
from .test_limits import refused
from .waiting import wait_for

LIMITS = {"max_header_count": 20, "max_header_bytes": 4096, "max_body_bytes": 10_000,
          "max_inflight_requests": 2}


@serve.deployment(max_ongoing_requests=8)
class Held:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.waiting = 0

    async def __call__(self, request: Any) -> Any:
        import user_defined_protos_pb2 as pb2

        self.waiting += 1
        await self.gate.wait()
        return pb2.UserDefinedResponse(greeting="released")

    async def release(self) -> None:
        self.gate.set()

    async def count(self) -> int:
        return self.waiting


@pytest.fixture
def limited(cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
            ) -> Iterator[tuple[Any, str, Any]]:
    compile_protos(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    port = free_port()
    serve.start(http_options=LIMITS,
                grpc_options={"port": port, "grpc_servicer_functions": SERVICER_FUNCTIONS})
    import user_defined_protos_pb2 as pb2

    address = f"127.0.0.1:{port}"
    try:
        yield cluster, address, pb2
    finally:
        for name in ("user_defined_protos_pb2", "user_defined_protos_pb2_grpc"):
            sys.modules.pop(name, None)


def _stub(channel: grpc.Channel, pb2: Any) -> Any:
    return channel.unary_unary(METHOD, request_serializer=pb2.UserDefinedMessage
                               .SerializeToString,
                               response_deserializer=pb2.UserDefinedResponse.FromString)


def test_messages_and_metadata_over_the_limits(limited: tuple[Any, str, Any]) -> None:
    cluster, address, pb2 = limited
    serve.run(Greeter.bind("hi"), name="greeter", route_prefix="/greeter")
    wait_for(lambda: _code_of(lambda: _call(address, pb2, "greeter", timeout=5, name="x"))[0]
             == grpc.StatusCode.OK)
    code, details = _code_of(lambda: _call(address, pb2, "greeter", name="x" * 20_000))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details, details
    assert "10000" in details

    before = {reason: refused(cluster, reason)
              for reason in ("too_many_headers", "headers_too_large")}
    with grpc.insecure_channel(address) as channel:
        stub = _stub(channel, pb2)
        many = (("application", "greeter"), *((f"x-h{i}", "v") for i in range(30)))
        code, details = _code_of(lambda: stub(pb2.UserDefinedMessage(), metadata=many,
                                              timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_header_count" in details
        assert refused(cluster, "too_many_headers") == before["too_many_headers"] + 1
        big = (("application", "greeter"), ("x-big", "v" * 5000))
        code, details = _code_of(lambda: stub(pb2.UserDefinedMessage(), metadata=big,
                                              timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_header_bytes" in details
        assert refused(cluster, "headers_too_large") == before["headers_too_large"] + 1
        # Far over the limit, grpc core's own bound refuses it before the proxy sees it.
        huge = (("application", "greeter"), ("x-big", "v" * 200_000))
        code, _ = _code_of(lambda: stub(pb2.UserDefinedMessage(), metadata=huge, timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _call(address, pb2, "greeter", name="Ann").greeting == "hi Ann"


def test_calls_over_the_in_flight_limit(limited: tuple[Any, str, Any]) -> None:
    cluster, address, pb2 = limited
    serve.run(Held.bind(), name="held", route_prefix="/held")
    handle = serve.get_app_handle("held")
    before = refused(cluster, "too_many_inflight")
    with grpc.insecure_channel(address) as channel:
        stub = _stub(channel, pb2)
        metadata = (("application", "held"),)
        wait_for(lambda: _code_of(lambda: _call(address, pb2, "nowhere", timeout=5))[0]
                 == grpc.StatusCode.NOT_FOUND)  # the proxy serves gRPC
        held = [stub.future(pb2.UserDefinedMessage(), metadata=metadata, timeout=60)
                for _ in range(2)]
        wait_for(lambda: handle.count.remote().result() == 2, timeout=30)
        code, details = _code_of(lambda: stub(pb2.UserDefinedMessage(), metadata=metadata,
                                              timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        assert "max_inflight_requests" in details
        assert refused(cluster, "too_many_inflight") == before + 1
        handle.release.remote().result()
        assert [call.result(timeout=30).greeting for call in held] == ["released"] * 2
    assert handle.count.remote().result() == 2  # the refused call never reached it

