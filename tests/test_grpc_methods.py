"""The gRPC method resolver (broker_serve/protocol/grpc_methods.py) on Ray's guide proto,
compiled here with grpcio-tools."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker_serve.exceptions import ProtocolError
from broker_serve.protocol.grpc_methods import GrpcMethods

from .grpc_protos import SERVICER_FUNCTIONS, compile_protos


@pytest.fixture
def protos(tmp_path: Path) -> Iterator[Path]:
    compile_protos(tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("user_defined_protos_pb2", "user_defined_protos_pb2_grpc"):
            sys.modules.pop(name, None)


def test_unary_method_round_trips_its_messages(protos: Path) -> None:
    import user_defined_protos_pb2 as pb2

    methods = GrpcMethods(SERVICER_FUNCTIONS)
    call = methods.method("/userdefinedprotos.UserDefinedService/__call__")
    assert call.name == "__call__" and call.streaming is False
    request = pb2.UserDefinedMessage(name="foo", origin="bar", num=3)
    decoded = call.request_deserializer(request.SerializeToString())
    assert decoded == request and type(decoded) is pb2.UserDefinedMessage
    reply = pb2.UserDefinedResponse(greeting="hi", num=4)
    assert pb2.UserDefinedResponse.FromString(call.response_serializer(reply)) == reply


def test_streaming_and_second_service_methods(protos: Path) -> None:
    import user_defined_protos_pb2 as pb2

    methods = GrpcMethods(SERVICER_FUNCTIONS)
    streaming = methods.method("/userdefinedprotos.UserDefinedService/Streaming")
    assert streaming.streaming is True and streaming.name == "Streaming"
    fruit = methods.method("/userdefinedprotos.FruitService/FruitStand")
    assert fruit.streaming is False
    amounts = pb2.FruitAmounts(orange=1, apple=2)
    assert fruit.request_deserializer(amounts.SerializeToString()) == amounts
    assert methods.method("/userdefinedprotos.FruitService/FruitStand") is fruit  # cached


def test_unknown_method_is_no_such_method(protos: Path) -> None:
    methods = GrpcMethods(SERVICER_FUNCTIONS[:1])
    for path in ("/userdefinedprotos.UserDefinedService/Missing",
                 "/userdefinedprotos.FruitService/FruitStand", "garbage"):
        with pytest.raises(ProtocolError) as info:
            methods.method(path)
        assert info.value.status == 404 and info.value.error == "NoSuchMethod"
        assert path in str(info.value)


def test_bad_servicer_function_paths_say_what_is_wrong(protos: Path) -> None:
    with pytest.raises(ValueError, match="cannot import 'no_such_pb2_grpc'"):
        GrpcMethods(["no_such_pb2_grpc.add_XServicer_to_server"])
    with pytest.raises(ValueError, match="has no 'add_MissingServicer_to_server'"):
        GrpcMethods(["user_defined_protos_pb2_grpc.add_MissingServicer_to_server"])
    with pytest.raises(ValueError, match="is not callable"):
        GrpcMethods(["user_defined_protos_pb2.DESCRIPTOR"])
    with pytest.raises(ValueError, match="import paths"):
        GrpcMethods(["nodots"])
    with pytest.raises(ValueError, match="failed when called"):
        GrpcMethods(["user_defined_protos_pb2.UserDefinedMessage"])


def test_context_records_the_status_and_refuses_bad_values() -> None:
    import grpc

    from broker_serve.grpc_util import RayServegRPCContext

    context = RayServegRPCContext([("k", "v")])
    assert context.invocation_metadata() == (("k", "v"),)
    assert context.code() is None and context.details() == "" and context.final_fields() == {}
    context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
    context.set_details("slow down")
    context.set_trailing_metadata([("a", "1")])
    assert context.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert context.trailing_metadata() == [("a", "1")]
    assert context.final_fields() == {"code": 8, "details": "slow down",
                                      "trailing_metadata": [["a", "1"]]}
    with pytest.raises(TypeError, match="grpc.StatusCode"):
        context.set_code(5)
    with pytest.raises(TypeError, match="str"):
        context.set_details(b"bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="pairs"):
        context.set_trailing_metadata([("a", 1)])  # type: ignore[list-item]
