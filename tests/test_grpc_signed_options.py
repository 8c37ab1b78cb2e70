"""Signed grpc_options (docs/architecture.md, "Trust"): a record written to Redis without the
cluster secret names modules that neither the proxy nor a replica imports, with a clear error;
the record serve.start signs is served."""

from __future__ import annotations

import hashlib
import hmac
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
import redis

from broker_serve import serve

from .conftest import REDIS_URL, free_port
from .grpc_protos import SERVICER_FUNCTIONS, compile_protos
from .test_grpc_proxy import Greeter, _call
from .test_protocol_foreign import ForeignClient, pack, request_queue
from .waiting import wait_for

FORGED_MODULE = """\
from pathlib import Path
Path({marker!r}).write_text("imported")

def add_ForgedServicer_to_server(servicer, server):
    pass
"""


@pytest.fixture
def app_dir(cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The guide's protos in the app dir, and beside them a module that records its import."""
    directory = tmp_path / "app"
    directory.mkdir()
    compile_protos(directory)
    monkeypatch.chdir(directory)
    monkeypatch.syspath_prepend(str(directory))
    forged = tmp_path / "forged"
    forged.mkdir()
    (forged / "forged_servicer.py").write_text(
        FORGED_MODULE.format(marker=str(tmp_path / "imported")))
    cluster.grpc_port = free_port()
    try:
        yield tmp_path
    finally:
        for name in ("user_defined_protos_pb2", "user_defined_protos_pb2_grpc",
                     "forged_servicer"):
            sys.modules.pop(name, None)


def forged_options(cluster: Any, tmp_path: Path) -> dict[str, Any]:
    return {"port": cluster.grpc_port, "grpc_servicer_functions": [
        "forged_servicer.add_ForgedServicer_to_server", *SERVICER_FUNCTIONS],
        "sys_path": [str(tmp_path / "forged")]}


def write_record(cluster: Any, value: bytes) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.set(f"bs:{cluster.name}:grpc_options", value)
    finally:
        client.close()


def signed_with(secret: bytes, cluster: Any, record: dict[str, Any]) -> bytes:
    data = orjson.dumps(record)
    domain = f"broker-serve grpc_options {cluster.name}\n".encode()
    sig = hmac.new(secret, domain + data, hashlib.sha256).hexdigest()
    return orjson.dumps({"record": data.decode(), "sig": sig})


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_forged_grpc_options_are_never_imported(cluster: Any, app_dir: Path,
                                                capfd: pytest.CaptureFixture[str]) -> None:
    # Unsigned, as one with Redis write access and a file on the host would write them.
    write_record(cluster, orjson.dumps(forged_options(cluster, app_dir)))
    serve.run(Greeter.bind("hi"), name="greeter", route_prefix="/greeter")
    output = ""

    def logged(text: str) -> bool:
        nonlocal output
        output += capfd.readouterr().err
        return text in output

    wait_for(lambda: logged("not serving gRPC: the stored grpc_options have no signature"))
    assert not port_open(cluster.grpc_port)
    assert logged("serves no gRPC: the stored grpc_options have no signature")
    # The replica answers a gRPC request with why, importing nothing.
    client = ForeignClient()
    try:
        queue = request_queue(cluster.name, "greeter", "Greeter")
        request_id = client.publish(queue, "grpc", pack({
            "method": "/userdefinedprotos.UserDefinedService/__call__", "body": b"",
            "streaming": False, "metadata": []}))
        [event] = client.wait_for(request_id)
    finally:
        client.close()
    assert event.type == "error" and event.body["status"] == 403, event.body
    assert event.body["error"] == "UntrustedPayload"
    assert "no signature" in event.body["message"]

    # Signed, but not with this cluster's secret.
    write_record(cluster, signed_with(b"s" * 64, cluster, forged_options(cluster, app_dir)))
    wait_for(lambda: logged("not serving gRPC: the signature of the stored grpc_options "
                            "does not verify under this cluster's secret"))
    assert not port_open(cluster.grpc_port)
    assert not (app_dir / "imported").exists()

    # What serve.start signs is served: by the proxy, and by a replica started after it.
    serve.start(grpc_options={"port": cluster.grpc_port,
                              "grpc_servicer_functions": SERVICER_FUNCTIONS})
    serve.run(Greeter.bind("hello"), name="greeter", route_prefix="/greeter")
    import user_defined_protos_pb2 as pb2

    address = f"127.0.0.1:{cluster.grpc_port}"
    wait_for(lambda: _greeting(address, pb2) == "hello Ann")
    assert not (app_dir / "imported").exists()


def _greeting(address: str, pb2: Any) -> str | None:
    try:
        return str(_call(address, pb2, "greeter", timeout=5, name="Ann").greeting)
    except grpc.RpcError:
        return None
