"""gRPC options from a config file, end to end: the proxies import the servicer modules from
the application's working_dir as its replicas do, an application still deploying answers
UNAVAILABLE, the REST API shows the options, and `broker-serve build` writes them."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
import yaml

from broker_serve.proxy.grpc_api import serve_pb2, serve_pb2_grpc

from .conftest import Cluster, free_port
from .grpc_protos import SERVICER_FUNCTIONS, compile_protos

BROKER_SERVE = [sys.executable, "-m", "broker_serve"]
METHOD = "/userdefinedprotos.UserDefinedService/__call__"

# Lives only in the working_dir, beside the generated protos: no process has it on its path.
HELD_APP = '''
import time
from pathlib import Path

from broker_serve import serve

import user_defined_protos_pb2 as pb2


@serve.deployment
class Held:
    def __init__(self, release: str) -> None:
        deadline = time.monotonic() + 120  # the test lets it go long before
        while not Path(release).exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def __call__(self, request):
        return pb2.UserDefinedResponse(greeting=f"held {request.name}")


def build(args: dict):
    return Held.bind(args["release"])
'''


def _cli(cluster: Cluster, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*BROKER_SERVE, *args], check=False, env=cluster.env, cwd=cwd,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def detached(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[Cluster, Path]]:
    """A detached cluster importing from tmp_path/apps; the protos are in apps/grpcdir."""
    app_dir = tmp_path / "apps"
    working_dir = app_dir / "grpcdir"
    working_dir.mkdir(parents=True)
    compile_protos(working_dir)
    (working_dir / "held_app.py").write_text(HELD_APP)
    _cli(cluster, app_dir, "start", "--http-port", str(cluster.port), "--app-dir", str(app_dir))
    try:
        yield cluster, app_dir
    finally:
        subprocess.run([*BROKER_SERVE, "stop"], check=False, env=cluster.env, cwd=app_dir,
                       capture_output=True, timeout=120)
        sys.modules.pop("user_defined_protos_pb2", None)
        sys.modules.pop("user_defined_protos_pb2_grpc", None)


def _outcome(address: str, pb2: Any, name: str) -> tuple[grpc.StatusCode, str, str]:
    with grpc.insecure_channel(address) as channel:
        stub = channel.unary_unary(METHOD, request_serializer=pb2.UserDefinedMessage
                                   .SerializeToString,
                                   response_deserializer=pb2.UserDefinedResponse.FromString)
        try:
            reply = stub(pb2.UserDefinedMessage(name=name), timeout=10,
                         metadata=(("application", "held"),))
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", ""
        return grpc.StatusCode.OK, "", reply.greeting


def _applications(address: str) -> list[str]:
    """What the proxy's gRPC server routes; none while it does not answer yet."""
    with grpc.insecure_channel(address) as channel:
        try:
            return list(serve_pb2_grpc.RayServeAPIServiceStub(channel).ListApplications(
                serve_pb2.ListApplicationsRequest(), timeout=5).application_names)
        except grpc.RpcError:
            return []


def _until(check: Any, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s}s: {check}")
        time.sleep(0.1)


def test_config_grpc_imports_from_working_dir_and_is_unavailable_while_deploying(
        detached, tmp_path, monkeypatch):
    cluster, app_dir = detached
    port = free_port()
    release = tmp_path / "release"
    config = {
        "grpc_options": {"port": port, "grpc_servicer_functions": SERVICER_FUNCTIONS},
        "applications": [{"name": "held", "route_prefix": "/held", "import_path": "held_app:build",
                          "runtime_env": {"working_dir": "grpcdir"},
                          "args": {"release": str(release)}}],
    }
    (app_dir / "config.yaml").write_text(yaml.safe_dump(config))
    _cli(cluster, app_dir, "deploy", "config.yaml")  # returns without waiting for the app

    # Only now may the test process import the protos, to make its own calls.
    monkeypatch.syspath_prepend(str(app_dir / "grpcdir"))
    pb2 = importlib.import_module("user_defined_protos_pb2")
    address = f"127.0.0.1:{port}"

    # The gRPC server serves (the proxy imported the servicer modules from the working_dir)
    # and the application's constructor is held: UNAVAILABLE, saying why.
    _until(lambda: "held" in _applications(address))
    code, details, _ = _outcome(address, pb2, "early")
    assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
    assert details == "application 'held' is DEPLOYING", details
    assert not release.exists()

    release.write_text("go")
    assert _until(lambda: (o := _outcome(address, pb2, "Ann"))[0] == grpc.StatusCode.OK
                  and o)[2] == "held Ann"

    # The REST API shows the options as Ray's does.
    api = f"http://127.0.0.1:{cluster.env['BROKER_SERVE_DASHBOARD_PORT']}"
    token = (Path(cluster.env["BROKER_SERVE_STATE_DIR"]) / cluster.name / "api-token"
             ).read_text().strip()
    details_json = requests.get(f"{api}/api/serve/applications/", timeout=10,
                                headers={"Authorization": f"Bearer {token}"}).json()
    assert details_json["grpc_options"] == {
        "port": port, "grpc_servicer_functions": SERVICER_FUNCTIONS, "request_timeout_s": None}

    # A config that names no servicer functions (what `build` writes) leaves gRPC as it is.
    config["grpc_options"] = {"port": 9000, "grpc_servicer_functions": []}
    (app_dir / "config.yaml").write_text(yaml.safe_dump(config))
    _cli(cluster, app_dir, "deploy", "config.yaml")
    assert _until(lambda: (o := _outcome(address, pb2, "Bo"))[0] == grpc.StatusCode.OK
                  and o)[2] == "held Bo"
    assert requests.get(f"{api}/api/serve/applications/", timeout=10, headers={
        "Authorization": f"Bearer {token}"}).json()["grpc_options"]["port"] == port


def test_build_writes_grpc_options_and_leaves_the_cluster_address_alone(tmp_path):
    (tmp_path / "plain.py").write_text(
        "from broker_serve import serve\n\n\n@serve.deployment\nclass Plain:\n"
        "    def __call__(self):\n        return 'plain'\n\n\napp = Plain.bind()\n")
    result = subprocess.run([*BROKER_SERVE, "build", "plain:app"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    built = yaml.safe_load(result.stdout)
    # No http_options: deploying the file must not move the cluster's stored address.
    assert list(built) == ["grpc_options", "applications"]
    assert built["grpc_options"] == {"port": 9000, "grpc_servicer_functions": []}
    assert built["applications"][0]["import_path"] == "plain:app"
