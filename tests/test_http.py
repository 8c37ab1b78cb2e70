"""End to end over real HTTP, RabbitMQ, Redis and processes: the proxy and replica behaviours."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pydantic
import pytest
import requests
import starlette.requests
from starlette.responses import PlainTextResponse, StreamingResponse

from broker_serve import DeployFailed, serve


@serve.deployment
class Echo:
    async def __call__(self, request: starlette.requests.Request) -> dict[str, object]:
        return {"path": request.url.path, "root_path": request.scope["root_path"],
                "query": dict(request.query_params)}


def test_query_params_round_trip(cluster):
    serve.run(Echo.bind())
    assert requests.get(f"{cluster.url}?a=b&c=d").json()["query"] == {"a": "b", "c": "d"}


def test_unknown_route_is_404_and_internal_endpoints(cluster):
    serve.run(Echo.bind(), name="echo", route_prefix="/echo")
    missing = requests.get(f"{cluster.url}/nope")
    assert missing.status_code == 404
    assert "no application" in missing.text
    assert requests.get(f"{cluster.url}/-/healthz").text == "success"
    assert requests.get(f"{cluster.url}/-/routes").json() == {"/echo": "echo"}
    detail = requests.get(f"{cluster.url}/-/routes/detail").json()
    assert detail["routes"]["/echo"]["queue"] == f"bs.{cluster.name}.echo.Echo"


def test_apps_side_by_side_longest_prefix_wins(cluster):
    serve.run(Echo.bind(), name="root", route_prefix="/")
    serve.run(Echo.options(name="Api").bind(), name="api", route_prefix="/api")
    serve.run(Echo.options(name="V2").bind(), name="v2", route_prefix="/api/v2")
    assert requests.get(f"{cluster.url}/other").json()["root_path"] == ""
    assert requests.get(f"{cluster.url}/api/x").json()["root_path"] == "/api"
    assert requests.get(f"{cluster.url}/api/v2/x").json()["root_path"] == "/api/v2"
    assert requests.get(f"{cluster.url}/apiary").json()["root_path"] == ""  # not a path prefix
    with pytest.raises(ValueError, match="already used"):
        serve.run(Echo.options(name="Clash").bind(), name="clash", route_prefix="/api")
    serve.delete("api")
    assert requests.get(f"{cluster.url}/api/x").json()["root_path"] == ""
    assert set(serve.status().applications) == {"root", "v2"}


@serve.deployment
class Broken:
    def __init__(self) -> None:
        raise RuntimeError("model weights are missing")

    def __call__(self) -> str:
        return "unreachable"


def test_failed_app_reports_and_answers_503(cluster):
    serve.run(Echo.bind(), name="ok", route_prefix="/ok")
    with pytest.raises(DeployFailed, match="model weights are missing"):
        serve.run(Broken.bind(), name="broken", route_prefix="/broken")
    response = requests.get(f"{cluster.url}/broken")
    assert response.status_code == 503
    assert "model weights are missing" in response.text
    assert serve.status().applications["broken"].status == "DEPLOY_FAILED"
    assert requests.get(f"{cluster.url}/ok").status_code == 200


@serve.deployment
class Faulty:
    def __call__(self, request: starlette.requests.Request) -> str:
        raise ValueError("secret internal detail")


def test_user_exception_is_short_500(cluster):
    serve.run(Faulty.bind())
    response = requests.get(cluster.url)
    assert response.status_code == 500
    assert response.text == "Internal Server Error"
    assert "secret" not in response.text and "Traceback" not in response.text


@pydantic.dataclasses.dataclass
class Point:
    x: int
    y: int


class Item(pydantic.BaseModel):
    name: str
    price: float


@serve.deployment
class Shapes:
    def __call__(self, request: starlette.requests.Request) -> object:
        kind = request.query_params["kind"]
        if kind == "model":
            return Item(name="pen", price=1.5)
        if kind == "dataclass":
            return dataclasses.asdict(Point(1, 2)) | {"point": Point(3, 4)}
        if kind == "text":
            return "plain"
        return PlainTextResponse("teapot", status_code=418, headers={"x-brewed": "no"})


def test_return_values_encode_like_ray(cluster):
    serve.run(Shapes.bind())
    assert requests.get(f"{cluster.url}?kind=model").json() == {"name": "pen", "price": 1.5}
    assert requests.get(f"{cluster.url}?kind=dataclass").json() == {
        "x": 1, "y": 2, "point": {"x": 3, "y": 4}}
    text = requests.get(f"{cluster.url}?kind=text")
    assert text.text == "plain" and text.headers["content-type"].startswith("text/plain")
    custom = requests.get(f"{cluster.url}?kind=response")
    assert (custom.status_code, custom.headers["x-brewed"], custom.text) == (418, "no", "teapot")


@serve.deployment
class Threads:
    def __init__(self) -> None:
        self.loop_thread = threading.get_ident()

    def __call__(self) -> dict[str, bool]:  # sync, and takes no argument
        return {"off_loop": threading.get_ident() != self.loop_thread}


def test_sync_handler_without_argument_runs_in_thread_pool(cluster):
    serve.run(Threads.bind())
    assert requests.get(cluster.url).json() == {"off_loop": True}


@serve.deployment(num_replicas=2, max_ongoing_requests=1)
class Pid:
    async def __call__(self) -> int:
        await asyncio.sleep(0.2)
        return os.getpid()


def test_two_replicas_are_two_processes_sharing_the_load(cluster):
    serve.run(Pid.bind())
    with ThreadPoolExecutor(8) as pool:
        pids = list(pool.map(lambda _: requests.get(cluster.url).json(), range(16)))
    assert len(set(pids)) == 2
    assert os.getpid() not in pids
    assert min(pids.count(pid) for pid in set(pids)) >= 4  # both did real work
    assert serve.status().applications["default"].deployments["Pid"].replica_states == {
        "RUNNING": 2}


@serve.deployment
class Bytes:
    async def __call__(self, request: starlette.requests.Request) -> object:
        if request.method == "POST":
            body = await request.body()
            return {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
        size = int(request.query_params["size"])
        return PlainTextResponse(_pattern(size))


def _pattern(size: int) -> bytes:
    block = hashlib.sha256(b"broker-serve").digest() * 2048  # 64 KiB, not compressible to zero
    return (block * (size // len(block) + 1))[:size]


def test_large_upload_and_download_are_intact(cluster):
    serve.run(Bytes.bind())
    upload = os.urandom(20 * 1024 * 1024)
    answer = requests.post(cluster.url, data=upload).json()
    assert answer == {"size": len(upload), "sha256": hashlib.sha256(upload).hexdigest()}

    def chunks():  # a chunked upload, with no content-length
        for start in range(0, len(upload), 300_000):
            yield upload[start:start + 300_000]

    assert requests.post(cluster.url, data=chunks()).json()["size"] == len(upload)
    download = requests.get(f"{cluster.url}?size={16 * 1024 * 1024}")
    assert download.status_code == 200
    assert hashlib.sha256(download.content).digest() == hashlib.sha256(
        _pattern(16 * 1024 * 1024)).digest()


def test_body_over_the_limit_is_413(cluster, monkeypatch):
    monkeypatch.setenv("BROKER_SERVE_MAX_BODY_BYTES", str(2 * 1024 * 1024))
    serve.run(Bytes.bind())
    assert requests.post(cluster.url, data=b"x" * (2 * 1024 * 1024)).status_code == 200
    too_big = requests.post(cluster.url, data=b"x" * (3 * 1024 * 1024))
    assert too_big.status_code == 413

    def chunks():  # no content-length: the proxy must count
        for _ in range(6):
            yield b"y" * (512 * 1024 + 1)

    assert requests.post(cluster.url, data=chunks()).status_code == 413
    assert requests.post(cluster.url, data=b"small").json()["size"] == 5


@serve.deployment
class Ticker:
    async def __call__(self, request: starlette.requests.Request) -> StreamingResponse:
        async def ticks():
            for i in range(5):
                yield f"{i}\n"
                await asyncio.sleep(0.05)

        return StreamingResponse(ticks(), media_type="text/plain")


def test_async_streaming_response(cluster):
    serve.run(Ticker.bind())
    with requests.get(cluster.url, stream=True) as response:
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert lines == ["0", "1", "2", "3", "4"]


@serve.deployment
def hello(request: starlette.requests.Request) -> str:
    return f"hello {serve.get_replica_context().deployment}"


def test_function_deployment_and_replica_context(cluster):
    handle = serve.run(hello.bind(), route_prefix="/hi")
    assert requests.get(f"{cluster.url}/hi").text == "hello hello"
    assert handle.deployment_name == "hello"


@serve.deployment(user_config={"greeting": "hey"})
class Configured:
    def __init__(self) -> None:
        self.greeting = "unset"

    def reconfigure(self, config: dict[str, str]) -> None:
        self.greeting = config["greeting"]

    def __call__(self) -> str:
        context = serve.get_replica_context()
        assert context.replica_tag == context.replica_id
        return self.greeting


def test_user_config_reaches_reconfigure(cluster):
    serve.run(Configured.bind())
    assert requests.get(cluster.url).text == "hey"


def test_redeploy_keeps_serving_and_switches_version(cluster):
    serve.run(Echo.bind())
    assert requests.get(cluster.url).status_code == 200
    serve.run(Shapes.options(name="Echo").bind())
    assert requests.get(f"{cluster.url}?kind=text").text == "plain"


@serve.deployment
def no_argument() -> str:
    return "no request needed"


def test_function_deployment_without_argument(cluster):
    serve.run(no_argument.bind())
    assert requests.get(cluster.url).text == "no request needed"


def test_a_bug_in_the_proxy_answers_500_and_is_logged_once(caplog):
    """The proxy's ASGI entry is a boundary: an error nothing else handles ends that one
    request with a 500, not a hang or a dropped connection."""
    from prometheus_client import CollectorRegistry

    from broker_serve.observability.logging import AccessLog
    from broker_serve.observability.metrics import ProxyMetrics
    from broker_serve.proxy.http import Proxy

    proxy = Proxy.__new__(Proxy)  # only what __call__ uses: no Redis, no RabbitMQ
    proxy._inflight = 0
    proxy.metrics = ProxyMetrics(CollectorRegistry())
    proxy.access = AccessLog(lambda line: "", lambda line: {})

    async def broken(*args, **kwargs):
        raise RuntimeError("a bug in the proxy")

    proxy._forward = broken
    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": []}
    asyncio.run(proxy(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 500
    assert sent[1]["body"] == b"Internal Server Error"
    failed = [r for r in caplog.records if "failed in the proxy" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None
