"""TLS on a shared network (docs/security.md, "TLS"): amqps:// and rediss:// with a CA and a
client certificate, HTTPS from the REST API and the proxies, and bad settings refused at
start-up. Against a RabbitMQ and a Redis of this module's own that listen with TLS only to
clients the test's CA signed (tests/tls_services.py)."""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import requests
import starlette.requests

from broker_serve import serve
from broker_serve.cli.rest_client import RestClient
from broker_serve.exceptions import ClusterUnavailable
from broker_serve.observability import stats
from broker_serve.proxy.grpc_api import serve_pb2, serve_pb2_grpc
from broker_serve.settings import Settings
from broker_serve.state import connection
from broker_serve.state.store import Store
from broker_serve.tls import ClientTls, ServerTls, TlsSettingError
from broker_serve.transport.broker import Broker, connection_name

from .conftest import ROOT, Cluster, free_port, namespace
from .grpc_protos import SERVICER_FUNCTIONS, compile_protos
from .rabbit_cluster import rabbitmqctl
from .tls_services import Certificates, TlsServices

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def services() -> Iterator[TlsServices]:
    with TlsServices() as started:
        yield started


def trusted(certificates: Certificates) -> ClientTls:
    return ClientTls(certificates.ca, certificates.client_cert, certificates.client_key)


# AMQP ---------------------------------------------------------------------------------------
def test_amqps_connects_with_the_ca_and_a_client_certificate(services):
    files = services.certificates

    async def connected_clients() -> list[dict[str, object]]:
        broker = Broker(services.amqps_url, connection_name("tls", "test", "trusted"),
                        tls=trusted(files))
        await broker.connect()
        try:
            listed = await asyncio.to_thread(
                rabbitmqctl, services.rabbit.nodes[0].name, "list_connections",
                "ssl", "peer_cert_subject", "--formatter", "json")
            return list(json.loads(listed.stdout))
        finally:
            await broker.close()

    [client] = asyncio.run(connected_clients())
    # The broker's own view: this connection is TLS, and presented the test's client certificate.
    assert client["ssl"] is True
    assert "broker-serve test client" in str(client["peer_cert_subject"])


def test_amqp_url_options_win_over_the_settings(services):
    """An amqps:// URL's own cafile/certfile/keyfile (aiormq's names) override the settings:
    here the settings name a CA that signed nothing, and the URL the right files."""
    files = services.certificates
    url = (f"{services.amqps_url}?cafile={files.ca}&certfile={files.client_cert}"
           f"&keyfile={files.client_key}")
    broker = Broker(url, connection_name("tls", "test", "url"), tls=ClientTls(files.other_ca))

    async def connect_and_close() -> None:
        await broker.connect()
        await broker.close()

    asyncio.run(connect_and_close())


@pytest.mark.parametrize(("case", "expected"), [
    ("no CA", "CERTIFICATE_VERIFY_FAILED"),  # the system's CAs do not know the test's CA
    ("another CA", "CERTIFICATE_VERIFY_FAILED"),
    # The broker's fail_if_no_peer_cert: its TLS alert, or the reset that follows it, whichever
    # the client reads first.
    ("no client certificate", "CERTIFICATE_REQUIRED|Connection reset by peer"),
])
def test_amqps_is_refused_without_the_ca_or_a_client_certificate(services, case, expected):
    files = services.certificates
    tls = {"no CA": ClientTls(None, files.client_cert, files.client_key),
           "another CA": ClientTls(files.other_ca, files.client_cert, files.client_key),
           "no client certificate": ClientTls(files.ca)}[case]
    broker = Broker(services.amqps_url, connection_name("tls", "test", "refused"), tls=tls)
    with pytest.raises(ClusterUnavailable, match=expected):
        asyncio.run(asyncio.wait_for(broker.connect(), 15))  # refused at once, not retried


# Redis --------------------------------------------------------------------------------------
def test_rediss_connects_with_the_ca_and_a_client_certificate(services):
    files = services.certificates

    async def round_trip() -> bytes | None:
        store = Store(services.rediss_url, "tls", trusted(files))  # every process's
        client = connection.async_client(services.rediss_url, trusted(files))
        try:
            await store.ping()
            return await client.echo(b"over tls")
        finally:
            await client.aclose()
            await store.close()

    # The Redis has no plain port: any answer came over TLS.
    assert asyncio.run(round_trip()) == b"over tls"
    client = connection.sync_client(services.rediss_url, trusted(files))  # the driver's
    try:
        assert client.ping() is True
    finally:
        client.close()


@pytest.mark.parametrize(("case", "expected"), [
    ("no CA", "CERTIFICATE_VERIFY_FAILED"),
    # Redis' tls-auth-clients: as the broker's
    ("no client certificate", "CERTIFICATE_REQUIRED|Connection reset by peer"),
])
def test_rediss_is_refused_without_the_ca_or_a_client_certificate(services, case, expected):
    files = services.certificates
    tls = ClientTls(files.ca) if case == "no client certificate" else ClientTls(
        None, files.client_cert, files.client_key)

    async def ping() -> None:
        store = Store(services.rediss_url, "tls", tls)
        try:
            await store.ping()
        finally:
            await store.close()

    with pytest.raises(ClusterUnavailable, match=expected):
        asyncio.run(asyncio.wait_for(ping(), 15))


# Settings -----------------------------------------------------------------------------------
def test_unusable_tls_settings_fail_naming_the_setting(services, tmp_path, monkeypatch):
    files = services.certificates
    monkeypatch.setenv("BROKER_SERVE_TLS_KEY_FILE", str(files.client_key))
    with pytest.raises(ValueError, match="BROKER_SERVE_TLS_KEY_FILE is set but "
                                         "BROKER_SERVE_TLS_CERT_FILE is not"):
        Settings()
    monkeypatch.setenv("BROKER_SERVE_TLS_CERT_FILE", str(files.server_cert))  # not its key's
    with pytest.raises(ValueError, match="BROKER_SERVE_TLS_CERT_FILE: cannot use"):
        Settings()
    monkeypatch.setenv("BROKER_SERVE_TLS_CERT_FILE", str(files.client_cert))
    assert Settings().client_tls() == ClientTls(None, files.client_cert, files.client_key)
    monkeypatch.setenv("BROKER_SERVE_TLS_CA_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match="BROKER_SERVE_TLS_CA_FILE: cannot read .*missing.pem"):
        Settings()
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    monkeypatch.setenv("BROKER_SERVE_TLS_CA_FILE", str(tmp_path / "garbage.pem"))
    with pytest.raises(ValueError, match="BROKER_SERVE_TLS_CA_FILE: cannot use .*garbage.pem"):
        Settings()
    with pytest.raises(TlsSettingError, match="^X_CA_FILE: cannot use"):
        ClientTls(tmp_path / "garbage.pem").check("X")
    monkeypatch.delenv("BROKER_SERVE_TLS_CA_FILE")
    monkeypatch.setenv("BROKER_SERVE_HTTPS_KEY_FILE", str(files.server_key))
    with pytest.raises(ValueError, match="BROKER_SERVE_HTTPS_KEY_FILE is set but"):
        Settings()


def test_the_grpc_key_and_chain_come_apart_from_one_file_or_two(services, tmp_path):
    """grpcio takes the key and the chain apart; uvicorn lets the key live in the
    certificate's file. Both layouts give grpcio the same two PEM blocks."""
    files = services.certificates
    key, chain = files.server_key.read_bytes(), files.server_cert.read_bytes()
    combined = tmp_path / "server-and-key.pem"
    combined.write_bytes(chain + key)
    for tls in (ServerTls(files.server_cert, files.server_key), ServerTls(combined)):
        assert tls.key_and_chain() == (key, chain)
    with pytest.raises(TlsSettingError, match="must hold one PEM private key"):
        ServerTls(files.server_cert).key_and_chain()  # a certificate without its key


def test_a_process_with_a_bad_tls_setting_exits_at_once_saying_why(tmp_path):
    """A controller given a certificate that does not exist stops at start-up with the
    setting's name, instead of retrying a connection that cannot work."""
    env = {"PATH": "/usr/bin:/bin", "BROKER_SERVE_STATE_DIR": str(tmp_path),
           "BROKER_SERVE_HTTPS_CERT_FILE": str(tmp_path / "absent.pem")}
    result = subprocess.run([sys.executable, "-m", "broker_serve", "controller"], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "BROKER_SERVE_HTTPS_CERT_FILE: cannot read" in result.stderr
    assert "absent.pem" in result.stderr


# End to end ---------------------------------------------------------------------------------
@serve.deployment
class Hello:
    async def __call__(self, request: starlette.requests.Request) -> dict[str, str]:
        return {"hello": request.query_params.get("name", "?")}


@pytest.fixture
def tls_cluster(services: TlsServices, monkeypatch: pytest.MonkeyPatch,
                tmp_path: Path) -> Iterator[Cluster]:
    """A cluster namespace whose every process speaks amqps:// and rediss:// to the TLS
    services, and serves HTTPS with the test's server certificate."""
    files = services.certificates
    tls_env = {
        "BROKER_SERVE_AMQP_URL": services.amqps_url,  # read by `namespace`
        "BROKER_SERVE_TLS_CA_FILE": str(files.ca),
        "BROKER_SERVE_TLS_CERT_FILE": str(files.client_cert),
        "BROKER_SERVE_TLS_KEY_FILE": str(files.client_key),
        "BROKER_SERVE_HTTPS_CERT_FILE": str(files.server_cert),
        "BROKER_SERVE_HTTPS_KEY_FILE": str(files.server_key),
    }
    for key, value in tls_env.items():
        monkeypatch.setenv(key, value)
    with namespace(monkeypatch, tmp_path) as created:
        monkeypatch.setenv("BROKER_SERVE_REDIS_URL", services.rediss_url)
        created.env.update(tls_env, BROKER_SERVE_REDIS_URL=services.rediss_url)
        yield created


def test_a_deployment_over_amqps_and_rediss_answers_over_https(tls_cluster, services):
    files = services.certificates
    serve.run(Hello.bind(), name="hello", route_prefix="/hello")
    proxy = f"https://localhost:{tls_cluster.port}/hello"

    answer = requests.get(proxy, params={"name": "tls"}, verify=str(files.ca), timeout=30)
    assert answer.status_code == 200 and answer.json() == {"hello": "tls"}
    # A client trusting another CA refuses the proxy; plain HTTP gets no HTTP answer. Raw
    # sockets, closed here: a connection left open would hold the proxy's graceful shutdown.
    with socket.create_connection(("localhost", tls_cluster.port), timeout=10) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):
        ssl.create_default_context(cafile=files.other_ca).wrap_socket(
            raw, server_hostname="localhost").close()
    with socket.create_connection(("localhost", tls_cluster.port), timeout=10) as raw:
        raw.sendall(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert not raw.recv(1024).startswith(b"HTTP/")

    # The CLI's REST client: https:// by default under HTTPS settings, checked with the CA.
    client = RestClient(Settings(), None, None)
    assert client.address.startswith("https://127.0.0.1:")
    applications = client.request("GET", "/api/serve/applications/")
    assert applications["applications"]["hello"]["status"] == "RUNNING"

    # `serve.stat`'s live reading finds the proxy's and the REST API's metrics over HTTPS.
    settings = Settings()
    secure = [url for url in stats.discover(settings) if url.startswith("https://")]
    assert {url.rsplit("/", 1)[1] for url in secure} == {"metrics"} and len(secure) == 2
    assert stats.read(secure, settings.client_tls().verify()).unreachable == []


@serve.deployment
class GrpcGreeter:
    async def __call__(self, request: Any) -> Any:
        import user_defined_protos_pb2 as pb2

        return pb2.UserDefinedResponse(greeting=f"hello {request.name}")


def test_the_grpc_ingress_serves_tls_with_the_https_certificate(tls_cluster, services,
                                                                 tmp_path, monkeypatch):
    """The proxy's gRPC port serves TLS with BROKER_SERVE_HTTPS_CERT_FILE: a client trusting
    the CA gets its answer; a plaintext client, or one trusting another CA, gets none."""
    files = services.certificates
    protos = compile_protos(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [str(protos), os.environ.get("PYTHONPATH")])))
    monkeypatch.syspath_prepend(str(protos))
    tls_cluster.env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    pb2 = importlib.import_module("user_defined_protos_pb2")
    address = f"localhost:{free_port()}"
    try:
        serve.start(grpc_options={"port": int(address.rsplit(":", 1)[1]),
                                  "grpc_servicer_functions": SERVICER_FUNCTIONS})
        serve.run(GrpcGreeter.bind(), name="greeter", route_prefix="/greeter")

        def greet(channel: grpc.Channel) -> Any:
            stub = channel.unary_unary(
                "/userdefinedprotos.UserDefinedService/__call__",
                request_serializer=pb2.UserDefinedMessage.SerializeToString,
                response_deserializer=pb2.UserDefinedResponse.FromString)
            return stub(pb2.UserDefinedMessage(name="tls"), timeout=30)

        trusting = grpc.ssl_channel_credentials(root_certificates=files.ca.read_bytes())
        with grpc.secure_channel(address, trusting) as channel:
            _until_healthy(channel)  # the proxy starts its gRPC server once it reads the options
            assert greet(channel).greeting == "hello tls"
        # A plaintext client's HTTP/2 preface is no TLS handshake: the port answers nothing.
        with grpc.insecure_channel(address) as channel, \
                pytest.raises(grpc.RpcError) as plaintext:
            greet(channel)
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
        other = grpc.ssl_channel_credentials(root_certificates=files.other_ca.read_bytes())
        with grpc.secure_channel(address, other) as channel, \
                pytest.raises(grpc.RpcError) as untrusted:
            greet(channel)
        assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        sys.modules.pop("user_defined_protos_pb2", None)
        sys.modules.pop("user_defined_protos_pb2_grpc", None)


def _until_healthy(channel: grpc.Channel, timeout_s: float = 30) -> None:
    """Until the proxy's gRPC Healthz answers `success` on `channel`."""
    api = serve_pb2_grpc.RayServeAPIServiceStub(channel)
    deadline = time.monotonic() + timeout_s
    answer: object = None
    while time.monotonic() < deadline:
        try:
            answer = api.Healthz(serve_pb2.HealthzRequest(), timeout=5).message
            if answer == "success":
                return
        except grpc.RpcError as exc:
            answer = exc
        time.sleep(0.05)
    raise AssertionError(f"the gRPC ingress is not healthy within {timeout_s}s: {answer}")
