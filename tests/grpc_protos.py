"""Ray's gRPC guide example proto (doc/source/serve/advanced-guides/grpc-guide.md), compiled
with grpcio-tools into a directory that tests put on sys.path or use as an app dir."""

from __future__ import annotations

from pathlib import Path

USER_DEFINED_PROTO = """\
syntax = "proto3";

option java_multiple_files = true;
option java_package = "io.ray.examples.user_defined_protos";
option java_outer_classname = "UserDefinedProtos";

package userdefinedprotos;

message UserDefinedMessage {
  string name = 1;
  string origin = 2;
  int64 num = 3;
}

message UserDefinedResponse {
  string greeting = 1;
  int64 num = 2;
}

message UserDefinedMessage2 {}

message UserDefinedResponse2 {
  string greeting = 1;
}

message FruitAmounts {
    int64 orange = 1;
    int64 apple = 2;
    int64 banana = 3;
}

message FruitCosts {
    float costs = 1;
}

service UserDefinedService {
  rpc __call__(UserDefinedMessage) returns (UserDefinedResponse);
  rpc Multiplexing(UserDefinedMessage2) returns (UserDefinedResponse2);
  rpc Streaming(UserDefinedMessage) returns (stream UserDefinedResponse);
}

service FruitService {
  rpc FruitStand(FruitAmounts) returns (FruitCosts);
}
"""

SERVICER_FUNCTIONS = [
    "user_defined_protos_pb2_grpc.add_UserDefinedServiceServicer_to_server",
    "user_defined_protos_pb2_grpc.add_FruitServiceServicer_to_server",
]


def compile_protos(directory: Path) -> Path:
    """Write user_defined_protos.proto to `directory` and generate its `_pb2` and `_pb2_grpc`
    modules beside it, as the guide's `python -m grpc_tools.protoc` command does."""
    from grpc_tools import protoc

    (directory / "user_defined_protos.proto").write_text(USER_DEFINED_PROTO)
    status = protoc.main(["grpc_tools.protoc", f"-I{directory}", f"--python_out={directory}",
                          f"--grpc_python_out={directory}",
                          str(directory / "user_defined_protos.proto")])
    if status != 0:
        raise RuntimeError(f"grpc_tools.protoc failed with {status}")
    return directory
