from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import cloudpickle
import pytest
from fastapi import Depends, FastAPI, Request, Response, WebSocket
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from broker_serve.replica import ingress as ingress_module
from broker_serve.replica.ingress import (
    asgi_app_of,
    get_servable,
    ingress,
    serving_app,
    set_servable,
)

if TYPE_CHECKING:
    from starlette.testclient import TestClient

# starlette.testclient warns, on import, that it wants httpx2 rather than httpx.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Using `httpx` with `starlette.testclient` is deprecated"
    ":starlette.exceptions.StarletteDeprecationWarning"
)

PROJECT_ROOT = pathlib.Path(ingress_module.__file__).resolve().parents[1]


class Item(BaseModel):
    name: str
    price: float


@pytest.fixture(autouse=True)
def no_servable() -> Iterator[None]:
    set_servable(None)
    yield
    set_servable(None)


def client_for(app: ASGIApp | None, raise_server_exceptions: bool = True) -> TestClient:
    from starlette.testclient import TestClient  # here, so the warning filter applies

    assert app is not None
    return TestClient(app, raise_server_exceptions=raise_server_exceptions)


def test_ray_docs_example_with_two_methods_named_root() -> None:
    app = FastAPI()

    @ingress(app)
    class MyFastAPIDeployment:
        @app.get("/")
        def root(self) -> str:
            return "Hello, world!"

        # The same name again, as in Ray Serve's docs.
        @app.post("/{subpath}")  # type: ignore[no-redef]
        def root(self, subpath: str) -> str:  # noqa: F811
            return f"Hello from {subpath}!"

    set_servable(MyFastAPIDeployment())
    client = client_for(asgi_app_of(MyFastAPIDeployment))
    assert client.get("/").json() == "Hello, world!"
    assert client.post("/Serve").json() == "Hello from Serve!"


def test_decorator_returns_the_class_itself_and_stores_the_app() -> None:
    app = FastAPI()

    class Deployment:
        @app.get("/")
        def get(self) -> int:
            return 1

    assert ingress(app)(Deployment) is Deployment
    frozen = asgi_app_of(Deployment)
    assert isinstance(frozen, FastAPI) and frozen is not app  # a copy, as Ray makes
    assert asgi_app_of(Deployment()) is frozen
    assert asgi_app_of(object()) is None


def test_methods_see_instance_state() -> None:
    app = FastAPI()

    @ingress(app)
    class Counter:
        def __init__(self) -> None:
            self.count = 0

        @app.post("/increment")
        async def increment(self) -> int:
            self.count += 1
            return self.count

    counter = Counter()
    set_servable(counter)
    client = client_for(asgi_app_of(Counter))
    assert client.post("/increment").json() == 1
    assert client.post("/increment").json() == 2
    assert counter.count == 2


def test_path_query_and_body_parameters() -> None:
    app = FastAPI()

    @ingress(app)
    class Shop:
        def __init__(self) -> None:
            self.currency = "EUR"

        @app.put("/items/{item_id}")
        def update(self, item_id: int, item: Item, discount: float = 0.0) -> dict[str, object]:
            price = item.price - discount
            return {"id": item_id, "name": item.name, "price": price, "currency": self.currency}

    set_servable(Shop())
    client = client_for(asgi_app_of(Shop))
    response = client.put("/items/3", params={"discount": 0.5}, json={"name": "pen", "price": 2})
    assert response.json() == {"id": 3, "name": "pen", "price": 1.5, "currency": "EUR"}
    assert client.put("/items/x", json={"name": "pen", "price": 2}).status_code == 422
    assert client.put("/items/3", json={"name": "pen"}).status_code == 422

    operation = client.get("/openapi.json").json()["paths"]["/items/{item_id}"]["put"]
    assert {p["name"]: p["in"] for p in operation["parameters"]} == {
        "item_id": "path",
        "discount": "query",
    }
    assert "requestBody" in operation


def test_existing_app_routes_are_untouched_and_openapi_has_no_self() -> None:
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, bool]:
        return {"ok": True}

    health_route = app.routes[-1]

    @ingress(app)
    class Deployment:
        @app.get("/hello")
        def hello(self, name: str) -> str:
            return f"hello {name}"

    @app.get("/after")
    def after() -> str:
        return "after"

    assert app.routes[-3] is health_route
    assert [getattr(route, "path", None) for route in app.routes[-3:]] == [
        "/health",
        "/hello",
        "/after",
    ]
    set_servable(Deployment())
    client = client_for(asgi_app_of(Deployment))
    assert client.get("/health").json() == {"ok": True}
    assert client.get("/hello", params={"name": "you"}).json() == "hello you"
    assert client.get("/after").status_code == 404  # added after decoration: frozen out

    response = client.get("/openapi.json")
    assert response.status_code == 200
    assert set(response.json()["paths"]) == {"/health", "/hello"}
    assert '"self"' not in response.text


def test_app_without_class_routes_is_served_as_is() -> None:
    app = FastAPI()

    @app.get("/")
    def index() -> str:
        return "index"

    routes = list(app.routes)

    @ingress(app)
    class Deployment:
        pass

    assert all(a is b for a, b in zip(app.routes, routes, strict=True))
    assert client_for(app).get("/").json() == "index"


def test_one_method_on_two_routes() -> None:
    app = FastAPI()

    @ingress(app)
    class Deployment:
        @app.get("/a")
        @app.get("/b")
        def both(self, n: int) -> int:
            return n * 2

    set_servable(Deployment())
    client = client_for(asgi_app_of(Deployment))
    assert client.get("/a", params={"n": 2}).json() == 4
    assert client.get("/b", params={"n": 3}).json() == 6


def test_websocket_method() -> None:
    app = FastAPI()

    @ingress(app)
    class Echo:
        def __init__(self) -> None:
            self.prefix = "echo: "

        @app.websocket("/ws")
        async def ws(self, websocket: WebSocket) -> None:
            await websocket.accept()
            text = await websocket.receive_text()
            await websocket.send_text(self.prefix + text)
            await websocket.close()

    set_servable(Echo())
    with client_for(asgi_app_of(Echo)).websocket_connect("/ws") as websocket:
        websocket.send_text("hi")
        assert websocket.receive_text() == "echo: hi"


def test_dependency_overrides_still_apply_to_rebuilt_routes() -> None:
    app = FastAPI()

    def greeting() -> str:
        return "hello"

    # Before decoration: the app is frozen then, its overrides with it.
    app.dependency_overrides[greeting] = lambda: "overridden"

    @ingress(app)
    class Greeter:
        @app.get("/")
        def get(self, word: str = Depends(greeting)) -> str:
            return word

        @app.websocket("/ws")
        async def ws(self, websocket: WebSocket, word: str = Depends(greeting)) -> None:
            await websocket.accept()
            await websocket.send_text(word)
            await websocket.close()

    set_servable(Greeter())
    client = client_for(asgi_app_of(Greeter))
    assert client.get("/").json() == "overridden"
    with client.websocket_connect("/ws") as websocket:
        assert websocket.receive_text() == "overridden"


def test_streaming_method_keeps_its_item_model() -> None:
    app = FastAPI()

    @ingress(app)
    class Stream:
        @app.get("/items")
        async def items(self) -> AsyncIterator[Item]:
            yield Item(name="a", price=1)

    set_servable(Stream())
    client = client_for(asgi_app_of(Stream))
    response = client.get("/items")
    assert [json.loads(line) for line in response.text.splitlines()] == [
        {"name": "a", "price": 1.0}
    ]
    assert "Item" in client.get("/openapi.json").json()["components"]["schemas"]


def test_no_servable_is_a_clear_error() -> None:
    app = FastAPI()

    @ingress(app)
    class Deployment:
        @app.get("/")
        def get(self) -> int:
            return 1

    with pytest.raises(RuntimeError, match="set_servable"):
        get_servable()
    with pytest.raises(RuntimeError, match="set_servable"):
        client_for(asgi_app_of(Deployment)).get("/")


def test_starlette_app_is_not_rewritten() -> None:
    async def hello(request: object) -> PlainTextResponse:
        return PlainTextResponse("hello")

    app = Starlette(routes=[Route("/", hello)])

    @ingress(app)
    class Deployment:
        pass

    frozen = asgi_app_of(Deployment)
    assert isinstance(frozen, Starlette) and frozen is not app
    assert client_for(frozen).get("/").text == "hello"


def test_plain_asgi_function_is_not_bound_to_the_instance() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse("raw")(scope, receive, send)

    @ingress(app)
    class Deployment:
        pass

    served = asgi_app_of(Deployment())
    assert served is app
    assert client_for(served).get("/").text == "raw"


def test_rejects_what_is_not_an_app_or_a_class() -> None:
    with pytest.raises(TypeError):
        ingress("not an app")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ingress(FastAPI())(lambda: None)  # type: ignore[type-var]


PICKLED_MODULE = """
from fastapi import APIRouter, FastAPI, Request
from pydantic import BaseModel

app = FastAPI()
app.state.currency = "EUR"
admin = APIRouter(prefix="/admin")


class Order(BaseModel):
    item: str
    quantity: int


def shout(text):
    return text.upper()


@admin.get("/ping")
def ping():
    return "pong"


app.include_router(admin)


@ingress(app)
class Shop:
    def __init__(self):
        self.greeting = "welcome"

    @app.get("/")
    def root(self):
        return shout(self.greeting)

    @app.get("/currency")
    def currency(self, request: Request):
        return request.app.state.currency

    @app.post("/orders/{customer}")
    async def order(self, customer: str, order: Order, express: bool = False):
        return {"customer": customer, "order": order, "express": express}
"""

SUBPROCESS_SCRIPT = """
import importlib.util, json, sys, warnings

assert importlib.util.find_spec(sys.argv[1]) is None, "the module must not be importable"
import cloudpickle
from broker_serve.replica.ingress import asgi_app_of, set_servable

Shop = cloudpickle.loads(sys.stdin.buffer.read())
set_servable(Shop())
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient
client = TestClient(asgi_app_of(Shop))
print(json.dumps([
    client.get("/").json(),
    client.get("/admin/ping").json(),
    client.get("/currency").json(),
    client.post("/orders/ann?express=true", json={"item": "pen", "quantity": 2}).json(),
    '"self"' in client.get("/openapi.json").text,
]))
"""


def test_cloudpickle_by_value_round_trip_into_a_fresh_process(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = "bs_test_ingress_pickled_shop"
    path = tmp_path / f"{name}.py"
    path.write_text("from broker_serve.replica.ingress import ingress\n" + PICKLED_MODULE)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)

    cloudpickle.register_pickle_by_value(module)
    try:
        payload = cloudpickle.dumps(module.Shop)
    finally:
        cloudpickle.unregister_pickle_by_value(module)

    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SUBPROCESS_SCRIPT), name],
        input=payload,
        capture_output=True,
        cwd=PROJECT_ROOT,  # `-c` puts the cwd on sys.path: it must not be tmp_path
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert json.loads(result.stdout) == [
        "WELCOME",
        "pong",
        "EUR",
        {"customer": "ann", "order": {"item": "pen", "quantity": 2}, "express": True},
        False,
    ]


def test_ingress_refuses_a_class_with_call_as_ray_does():
    app = FastAPI()

    class Callable_:
        def __call__(self) -> str:
            return "never reached"

    with pytest.raises(ValueError, match="may not have __call__ method"):
        ingress(app)(Callable_)

    class Inherits(Callable_):
        pass

    with pytest.raises(ValueError, match="may not have __call__ method"):
        ingress(app)(Inherits)

    class Plain:
        pass

    assert ingress(app)(Plain) is Plain


# Freezing, builders and the class-less form (Ray 2.x) -------------------------------------------
def test_routes_middleware_and_handlers_added_after_decoration_are_not_served() -> None:
    app = FastAPI()

    @app.get("/early")
    def early() -> str:
        raise ValueError("early")

    @ingress(app)
    class Deployment:
        pass

    @app.get("/late")
    def late() -> str:
        return "late"

    @app.middleware("http")
    async def tag(request: object, call_next: Callable[[object], Awaitable[Response]]
                  ) -> Response:
        response = await call_next(request)
        response.headers["x-late"] = "1"
        return response

    @app.exception_handler(ValueError)
    async def handled(request: object, exc: ValueError) -> PlainTextResponse:
        return PlainTextResponse("handled", status_code=418)

    served = client_for(asgi_app_of(Deployment), raise_server_exceptions=False)
    assert served.get("/late").status_code == 404
    early_response = served.get("/early")
    assert early_response.status_code == 500 and "x-late" not in early_response.headers
    original = client_for(app, raise_server_exceptions=False)
    assert original.get("/late").headers["x-late"] == "1"
    assert original.get("/early").status_code == 418


def test_a_frozen_app_keeps_its_startup_handlers_and_lifespan() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        events.append("lifespan started")
        yield {"from_lifespan": "yes"}
        events.append("lifespan ended")

    with_lifespan, with_hooks = FastAPI(lifespan=lifespan), FastAPI()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # on_event is deprecated, not gone

        @with_hooks.on_event("startup")
        def started() -> None:
            events.append("startup hook")

    @ingress(with_lifespan)
    class Deployment:
        @with_lifespan.get("/")
        def get(self, request: Request) -> str:
            return str(request.state.from_lifespan)

    frozen = asgi_app_of(Deployment)
    set_servable(Deployment())
    with client_for(frozen) as client:
        assert client.get("/").json() == "yes"
    assert events == ["lifespan started", "lifespan ended"]

    hooked = asgi_app_of(ingress(with_hooks)())
    assert isinstance(hooked, FastAPI) and hooked.router.on_startup == [started]
    with client_for(hooked):
        assert events[-1] == "startup hook"


def test_frozen_routes_see_helpers_defined_later_and_share_the_app_state() -> None:
    app = FastAPI()
    app.state.greeting = "hello"

    @ingress(app)
    class Deployment:
        @app.get("/")
        def get(self, request: Request) -> str:
            # `suffix` is assigned after the decoration: a snapshot would not have it.
            return f"{request.app.state.greeting} {suffix()}"

    def suffix() -> str:
        return "world"

    app.state.greeting = "hi"  # the app's data, not its structure: shared with the copy
    set_servable(Deployment())
    assert client_for(asgi_app_of(Deployment)).get("/").json() == "hi world"


def test_what_the_app_holds_is_shared_not_copied() -> None:
    class Limiter:
        def __init__(self) -> None:
            self.lock = threading.Lock()  # cannot be pickled: a whole-app copy would fail

        def __call__(self) -> None:
            with self.lock:
                pass

    limiter = Limiter()
    app = FastAPI()

    @app.get("/", dependencies=[Depends(limiter)])
    def get() -> str:
        return "limited"

    frozen = asgi_app_of(ingress(app)())
    assert isinstance(frozen, FastAPI)
    (route,) = [route for route in frozen.routes if getattr(route, "path", "") == "/"]
    assert route is not app.routes[-1] and route.dependencies[0].dependency is limiter
    assert route.endpoint is get
    assert client_for(frozen).get("/").json() == "limited"


def test_the_class_less_form_keeps_its_constructor_arguments() -> None:
    app = FastAPI()

    @app.get("/")
    def get() -> str:
        return "alone"

    cls = ingress(app)()
    assert cls.__name__ == "ASGIIngressDeployment"
    assert cls.__module__ == __name__  # so serve.run ships this module with it
    instance = cls(1, two=2)
    assert (instance.args, instance.kwargs) == ((1,), {"two": 2})
    assert client_for(asgi_app_of(instance)).get("/").json() == "alone"
    assert ingress(app)() is not cls  # a class of its own each time, as in Ray


def test_a_builder_is_called_by_serving_app_only() -> None:
    calls: list[int] = []

    def build() -> FastAPI:
        built = FastAPI()
        calls.append(1)

        @built.get("/")
        def get() -> int:
            return len(calls)

        return built

    @ingress(build)
    class Deployment:
        pass

    assert calls == [] and asgi_app_of(Deployment) is None
    served = serving_app(Deployment)
    assert served is not None and calls == [1]
    assert client_for(served).get("/").json() == 1
    assert serving_app(object) is None


def test_builder_shapes_that_are_refused() -> None:
    async def not_plain() -> FastAPI:
        return FastAPI()

    with pytest.raises(TypeError, match="plain function"):
        ingress(not_plain)

    def no_app() -> str:
        return "not an app"

    @ingress(no_app)  # type: ignore[arg-type]
    class Deployment:
        pass

    with pytest.raises(TypeError, match="returned str, not an ASGI app"):
        serving_app(Deployment)
