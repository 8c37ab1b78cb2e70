"""`serve.ingress` as Ray 2.x has it, through real serve.run, replicas and HTTP: a builder
function (on a class, and without one), the class-less form, the app frozen at decoration, and
one FastAPI ingress per application (at serve.run and in a config).

No `from __future__ import annotations`: the routes' annotations must be objects, not names
a by-value copy of this module's functions would not carry to the replica.
"""

import asyncio
import collections
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import RequestResponseEndpoint
from starlette.responses import Response
from starlette.routing import Route

from broker_serve import RayServeException, serve
from broker_serve.handle import DeploymentHandle

from .waiting import wait_for

# Appended to by the builders: they run in replicas, so in the test process it stays empty.
BUILT_HERE: list[str] = []


def fastapi_builder() -> FastAPI:
    """Ray's tests' builder: routes, an included router, a middleware and an exception
    handler, all made in the replica."""
    BUILT_HERE.append("fastapi")
    app = FastAPI(docs_url="/custom-docs")

    @app.get("/")
    def f1() -> str:
        return "hello"

    router = APIRouter()

    @router.get("/f2")
    def f2() -> str:
        return "hello f2"

    @router.get("/error")
    def error() -> str:
        raise ValueError("some error")

    @router.get("/pid")
    def pid() -> int:
        return os.getpid()

    app.include_router(router)

    @app.middleware("http")
    async def add_header(request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        response.headers["X-Custom-Middleware"] = "fake-middleware"
        return response

    @app.exception_handler(ValueError)
    async def custom_exception_handler(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse(status_code=500, content={"error": "fake-error"})

    return app


def starlette_builder() -> Starlette:
    # Imported here, as in Ray's test, and no annotations in the class body: cloudpickle gives a
    # class body in a function only the globals the function names, not those the body names.
    from starlette.middleware.base import BaseHTTPMiddleware

    BUILT_HERE.append("starlette")

    class CustomHeaderMiddleware(BaseHTTPMiddleware):
        async def dispatch(self, request, call_next):  # type: ignore[no-untyped-def]
            response = await call_next(request)
            response.headers["X-Custom-Middleware"] = "fake-middleware"
            return response

    async def homepage(request: Request) -> JSONResponse:
        return JSONResponse("hello")

    return Starlette(routes=[Route("/", homepage)],
                     middleware=[Middleware(CustomHeaderMiddleware)])


@serve.deployment
class SubModel:
    def __call__(self, a: int) -> int:
        return a + 1


def fastapi_builder_with_sub_deployment() -> FastAPI:
    app = fastapi_builder()

    def sub_deployment_handle() -> DeploymentHandle:
        return serve.get_deployment_handle("SubModel", "composed")

    class Data(BaseModel):
        a: int

    @app.get("/sub_deployment", response_model=Data)
    async def sub(request: Request,
                  handle: DeploymentHandle = Depends(sub_deployment_handle),  # noqa: B008
                  ) -> Data:
        return Data(a=await handle.remote(int(request.query_params.get("a", 1))))

    return app


def assert_fastapi_builder_served(url: str) -> None:
    response = requests.get(url, timeout=30)
    assert response.json() == "hello"
    assert response.headers["X-Custom-Middleware"] == "fake-middleware"
    assert requests.get(f"{url}/f2", timeout=30).json() == "hello f2"
    error = requests.get(f"{url}/error", timeout=30)
    assert (error.status_code, error.json()) == (500, {"error": "fake-error"})
    assert requests.get(f"{url}/custom-docs", timeout=30).status_code == 200
    assert requests.get(f"{url}/pid", timeout=30).json() != os.getpid()


def test_a_builder_on_a_class_makes_its_app_in_the_replica(cluster):
    @serve.deployment
    @serve.ingress(fastapi_builder)
    class ASGIIngress:
        def __init__(self, sub_deployment: DeploymentHandle) -> None:
            self.sub_deployment = sub_deployment

    serve.run(ASGIIngress.bind(SubModel.bind()), name="composed")
    assert_fastapi_builder_served(cluster.url)
    assert BUILT_HERE == []  # called in the replica only, as Ray does


def test_the_class_less_form_with_an_app_and_with_builders(cluster):
    plain = FastAPI()

    @plain.get("/")
    def alone() -> str:
        return "alone"

    ingress_deployment = serve.deployment(serve.ingress(plain)())
    assert ingress_deployment.name == "ASGIIngressDeployment"
    serve.run(ingress_deployment.bind(), name="plain", route_prefix="/plain")
    serve.run(serve.deployment(serve.ingress(fastapi_builder)()).bind(), name="built",
              route_prefix="/built")
    serve.run(serve.deployment(serve.ingress(starlette_builder)()).bind(), name="starlette",
              route_prefix="/starlette")

    assert requests.get(f"{cluster.url}/plain", timeout=30).json() == "alone"
    assert_fastapi_builder_served(f"{cluster.url}/built")
    starlette_response = requests.get(f"{cluster.url}/starlette", timeout=30)
    assert starlette_response.json() == "hello"
    assert starlette_response.headers["X-Custom-Middleware"] == "fake-middleware"
    assert BUILT_HERE == []


def test_a_class_less_builder_bound_to_a_sub_deployment(cluster):
    app = serve.deployment(serve.ingress(fastapi_builder_with_sub_deployment)())
    # Its constructor takes and keeps what it is bound with, so the sub-deployment deploys.
    serve.run(app.bind(SubModel.bind()), name="composed")
    assert requests.get(f"{cluster.url}/sub_deployment?a=2", timeout=30).json() == {"a": 3}


def test_what_is_added_after_decoration_is_not_served(cluster):
    app = FastAPI()

    @app.get("/early")
    def early() -> str:
        return suffix()  # defined below: the route keeps its live namespace

    @serve.deployment
    @serve.ingress(app)
    class Frozen:
        @app.get("/method")
        def method(self) -> str:
            return "method"

    def suffix() -> str:
        return "early"

    @app.get("/late")
    def late() -> str:
        return "late"

    @app.middleware("http")
    async def late_header(request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        response.headers["X-Late"] = "1"
        return response

    serve.run(Frozen.bind())
    assert requests.get(f"{cluster.url}/method", timeout=30).json() == "method"
    early_response = requests.get(f"{cluster.url}/early", timeout=30)
    assert early_response.json() == "early" and "X-Late" not in early_response.headers
    assert requests.get(f"{cluster.url}/late", timeout=30).status_code == 404
    paths = requests.get(f"{cluster.url}/openapi.json", timeout=30).json()["paths"]
    assert set(paths) == {"/early", "/method"}


@pytest.mark.parametrize("two_fastapi", [True, False])
def test_two_fastapi_in_one_application(cluster, two_fastapi):
    """Ray's test, unchanged but for the import: a second FastAPI ingress in the graph is
    refused at serve.run; the same graph with a plain sub-deployment works."""
    app1, app2 = FastAPI(), FastAPI()

    class SubModel:
        def add(self, a: int) -> int:
            return a + 1

    @serve.deployment
    @serve.ingress(app1)
    class Model:
        def __init__(self, submodel: DeploymentHandle) -> None:
            self.submodel = submodel

        @app1.get("/{a}")
        async def func(self, a: int) -> int:
            return await self.submodel.add.remote(a)

    if two_fastapi:
        SubModel = serve.deployment(serve.ingress(app2)(SubModel))
        with pytest.raises(RayServeException) as e:
            serve.run(Model.bind(SubModel.bind()), name="app1")
        assert "FastAPI" in str(e.value)
        assert 'application "app1" (SubModel, Model)' in str(e.value)
        assert "app1" not in serve.status().applications
    else:
        handle = serve.run(Model.bind(serve.deployment(SubModel).bind()), name="app1")
        assert handle.func.remote(5).result() == 6
        assert requests.get(f"{cluster.url}/5", timeout=30).json() == 6


TWO_INGRESSES = '''
from fastapi import FastAPI

from broker_serve import serve

outer, inner = FastAPI(), FastAPI()


@serve.deployment
@serve.ingress(inner)
class Inner:
    pass


@serve.deployment
@serve.ingress(outer)
class Outer:
    def __init__(self, inner):
        self.inner = inner


app = Outer.bind(Inner.bind())
'''


def test_a_config_with_two_fastapi_ingresses_is_deploy_failed(cluster, tmp_path, monkeypatch):
    token = secrets.token_urlsafe(16)
    monkeypatch.setenv("BROKER_SERVE_API_TOKEN", token)
    (tmp_path / "two_ingresses.py").write_text(TWO_INGRESSES)
    serve.start()
    api = f"http://127.0.0.1:{cluster.env['BROKER_SERVE_DASHBOARD_PORT']}/api/serve/applications/"
    auth = {"Authorization": f"Bearer {token}"}

    def rest_api_up() -> bool:
        try:
            return requests.get(api, headers=auth, timeout=5).status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(rest_api_up)
    config = {"applications": [{"name": "twice", "route_prefix": "/twice",
                                "import_path": "two_ingresses:app",
                                "runtime_env": {"working_dir": str(tmp_path)}}]}
    put = requests.put(api, headers=auth, json=config, timeout=120)
    assert put.status_code == 200
    expected = 'Found multiple FastAPI deployments in application "twice" (Inner, Outer)'
    result = put.json()["applications"]["twice"]
    assert result["result"] == "failed" and result["message"].startswith(expected)
    status = serve.status().applications["twice"]
    assert status.status == "DEPLOY_FAILED" and status.message.startswith(expected)
    assert requests.get(f"{cluster.url}/twice", timeout=30).status_code in (404, 503)


def test_concurrent_requests_through_a_class_less_ingress(cluster):
    app = FastAPI()
    seen: list[int] = []
    running = {"now": 0, "peak": 0}

    @app.get("/echo/{i}")
    async def echo(i: int) -> dict[str, Any]:
        running["now"] += 1
        running["peak"] = max(running["peak"], running["now"])
        await asyncio.sleep(0.2)
        running["now"] -= 1
        seen.append(i)
        return {"i": i, "pid": os.getpid()}

    @app.get("/seen")
    def seen_so_far() -> dict[str, Any]:
        return {"seen": seen, "peak": running["peak"]}

    deployment = serve.deployment(serve.ingress(app)(), max_ongoing_requests=32)
    serve.run(deployment.bind())
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(
            lambda i: requests.get(f"{cluster.url}/echo/{i}", timeout=60), range(32)))
    assert [answer.status_code for answer in answers] == [200] * 32
    assert [answer.json()["i"] for answer in answers] == list(range(32))
    report = requests.get(f"{cluster.url}/seen", timeout=30).json()
    assert collections.Counter(report["seen"]) == collections.Counter(range(32))  # each once
    assert report["peak"] > 1  # they ran at once, not one after another


HIDDEN_MODULE = '''
from fastapi import FastAPI

from broker_serve import serve


def build():
    app = FastAPI()

    @app.get("/")
    def root():
        return "from a module the replica cannot import"

    return app


ingress = serve.deployment(serve.ingress(build)())
'''

SCRIPT = '''
import importlib.util, sys
import requests
from broker_serve import serve

spec = importlib.util.spec_from_file_location("bs_hidden_builders", {path!r})
module = importlib.util.module_from_spec(spec)
sys.modules["bs_hidden_builders"] = module
spec.loader.exec_module(module)
serve.run(module.ingress.bind())
print(requests.get("http://localhost:8000/").json())
'''


def test_a_class_less_ingress_belongs_to_the_module_that_declares_it(cluster, tmp_path):
    """Its builder travels by value with that module, as a decorated class's code does: the
    replica never imports the module (here it could not)."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "bs_hidden_builders.py").write_text(HIDDEN_MODULE)
    done = cluster.run_script(SCRIPT.format(path=str(hidden / "bs_hidden_builders.py")))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "from a module the replica cannot import"
