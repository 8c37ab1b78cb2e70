"""The REST API (Ray Serve's V1 and V2), served by every controller with a bearer token.

    PUT|GET|DELETE  /api/serve/applications/
    PATCH           /api/serve/applications/{app}/deployments/{deployment}   {"num_replicas": N}
    PUT|GET|DELETE  /api/serve/deployments/
    GET             /api/serve/deployments/status
    GET             /api/serve/capacity/                 replicas wanted and running (KEDA)
    GET|PUT         /api/serve/traffic/                  a traffic record (broker-serve's)
    DELETE          /api/serve/traffic/{name}
    GET             /api/serve/dead/?app=&deployment=&limit=   dead letters (broker-serve's)
    GET             /api/serve/dead/{id}
    POST            /api/serve/dead/replay|purge         {"ids": [...]} | {"app", "deployment"} | {"all": true}
    GET             /metrics   (the controller's Prometheus metrics; no token)
    GET             /, /static/..., /api/serve/overview/; POST /login, /logout
                               the status page (`status_page/`), which checks its own cookie

Ray's dashboard API has no authentication, which let attackers run code on exposed clusters
(CVE-2023-48022); every call here but /metrics needs `Authorization: Bearer <token>`,
with one of the tokens `api_token.py` lists. The server runs in the controller's event loop
and leaves signals to the controller.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, ExceptionHandler, Receive, Scope, Send
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_fixed

from ..exceptions import (
    BrokerServeError,
    ClusterSecretMissing,
    ClusterUnavailable,
    StateError,
    TransportError,
)
from ..http_server import HttpServer
from ..lifecycle import sleep_or_stop
from ..schema import ServeApplicationSchema, ServeDeploySchema, TrafficSchema
from ..settings import Settings
from ..state.status import read_details, v1_status
from ..state.store import Store
from ..state.traffic import make_traffic, public_view, write_traffic
from ..transport.dead_letters import DEFAULT_LIMIT, DeadLetters, Selector
from . import declarative, status_page
from .api_token import bearer_matches, server_tokens, token_bytes

log = logging.getLogger("broker_serve.controller.rest")

MAX_BODY_BYTES = 10 * 1024 * 1024
LISTEN_RETRY_S = 5.0
V1_APP_NAME = "default"
M = TypeVar("M", bound=BaseModel)


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_replicas: PositiveInt


class DeadSelector(BaseModel):
    """Which dead letters to replay or purge: by id, by app (and deployment), or all."""

    model_config = ConfigDict(extra="forbid")

    ids: list[str] | None = None
    app: str | None = None
    deployment: str | None = None
    all: bool = False
    limit: PositiveInt = Field(default=DEFAULT_LIMIT, le=100_000)

    def selector(self) -> Selector:
        """Refuses an empty selector, so that nothing is replayed or dropped by accident."""
        chosen = self.ids or self.app is not None or self.deployment is not None
        if not chosen and not self.all:
            raise HTTPError(400, 'name the dead letters: {"ids": [...]}, {"app": ..., '
                                 '"deployment": ...} or {"all": true}')
        if chosen and self.all:
            raise HTTPError(400, '"all" goes alone')
        return Selector(set(self.ids) if self.ids else None, self.app, self.deployment)


class HTTPError(BrokerServeError):
    """A request the API refuses: answered with `status` and `{"detail": detail}`."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


# authentication ---------------------------------------------------------------------------------
class BearerAuth:
    """Refuses (401) every HTTP request without one of the tokens, but those for `/metrics`,
    which only read counters (Prometheus scrapes them), and the status page's, which takes
    the token through its login form."""

    PUBLIC = frozenset({"/metrics"})

    def __init__(self, app: ASGIApp, tokens: str | Sequence[str]) -> None:
        self.app = app
        self.tokens = token_bytes(tokens)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.PUBLIC and \
                not status_page.handles(scope["path"]) and \
                not self._authorized(Headers(scope=scope)):
            response = JSONResponse(
                {"detail": "missing or wrong bearer token"}, status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="broker-serve"'})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, headers: Headers) -> bool:
        return bearer_matches(headers.get("authorization", ""), self.tokens)


# endpoints --------------------------------------------------------------------------------------
# The controller's Prometheus exposition (`_metrics.ControllerMetrics`).
Metrics = Callable[[], Awaitable[bytes]]


def create_app(store: Store, settings: Settings, tokens: str | Sequence[str],
               metrics: Metrics | None = None,
               dead_letters: DeadLetters | None = None,
               queue_depths: status_page.QueueDepths | None = None) -> ASGIApp:
    api = _Endpoints(store, settings, dead_letters)
    routes: list[BaseRoute] = [
        Route("/api/serve/applications/", api.get_applications, methods=["GET"]),
        Route("/api/serve/applications/", api.put_applications, methods=["PUT"]),
        Route("/api/serve/applications/", api.delete_applications, methods=["DELETE"]),
        Route("/api/serve/applications/{app}/deployments/{deployment}", api.scale,
              methods=["PATCH"]),
        Route("/api/serve/deployments/", api.get_v1_config, methods=["GET"]),
        Route("/api/serve/deployments/", api.put_v1, methods=["PUT"]),
        Route("/api/serve/deployments/", api.delete_applications, methods=["DELETE"]),
        Route("/api/serve/deployments/status", api.get_v1_status, methods=["GET"]),
        Route("/api/serve/capacity/", api.get_capacity, methods=["GET"]),
        Route("/api/serve/traffic/", api.get_traffic, methods=["GET"]),
        Route("/api/serve/traffic/", api.put_traffic, methods=["PUT"]),
        # `path`: a name defaults to its route prefix, so it may hold slashes.
        Route("/api/serve/traffic/{name:path}", api.delete_traffic, methods=["DELETE"]),
        Route("/api/serve/dead", api.list_dead, methods=["GET"]),
        Route("/api/serve/dead/", api.list_dead, methods=["GET"]),
        Route("/api/serve/dead/replay", api.replay_dead, methods=["POST"]),
        Route("/api/serve/dead/purge", api.purge_dead, methods=["POST"]),
        Route("/api/serve/dead/{id}", api.show_dead, methods=["GET"]),
    ]
    if metrics is not None:
        async def exposition(request: Request) -> Response:
            return Response(await metrics(), media_type=CONTENT_TYPE_LATEST)

        routes.append(Route("/metrics", exposition, methods=["GET"]))
    routes += status_page.StatusPage(store, settings, tokens, queue_depths).routes()
    return BearerAuth(Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS), tokens)


class _Endpoints:
    def __init__(self, store: Store, settings: Settings,
                 dead_letters: DeadLetters | None) -> None:
        self.store = store
        self.settings = settings
        self._dead_letters = dead_letters

    async def get_applications(self, request: Request) -> Response:
        details = await read_details(self.store)
        return _json(details.model_dump(mode="json"))

    async def put_applications(self, request: Request) -> Response:
        config = await _parse(request, ServeDeploySchema)
        return _json(await declarative.apply_config(self.store, self.settings, config))

    async def delete_applications(self, request: Request) -> Response:
        return _json({"deleted": await declarative.delete_all(self.store)})

    async def scale(self, request: Request) -> Response:
        body = await _parse(request, ScaleRequest)
        app, deployment = request.path_params["app"], request.path_params["deployment"]
        await declarative.scale(self.store, app, deployment, body.num_replicas)
        return _json({"app": app, "deployment": deployment, "num_replicas": body.num_replicas})

    async def put_v1(self, request: Request) -> Response:
        app = await _parse(request, ServeApplicationSchema)
        config = ServeDeploySchema(applications=[app])
        return _json(await declarative.apply_config(self.store, self.settings, config))

    async def get_v1_config(self, request: Request) -> Response:
        config = await self.store.deploy_config()
        app = config.application(V1_APP_NAME) if config else None
        return _json(app.model_dump(mode="json", exclude_unset=True) if app else {})

    async def get_v1_status(self, request: Request) -> Response:
        details = await read_details(self.store)
        return _json(v1_status(details, V1_APP_NAME).model_dump(mode="json"))

    async def get_capacity(self, request: Request) -> Response:
        """What the worker nodes must hold: the replicas the deployments want (their target,
        the autoscaler's included) and those running. KEDA's metrics-api trigger scales the
        worker nodes on `target_replicas` (deploy/k8s), so a deployment with a fixed
        `num_replicas` keeps a worker even while no request is queued."""
        details = await read_details(self.store)
        deployments = [deployment for app in details.applications.values()
                       for deployment in app.deployments.values()]
        return _json({
            "target_replicas": sum(d.target_num_replicas for d in deployments),
            "running_replicas": sum(r.state == "RUNNING" for d in deployments
                                    for r in d.replicas)})

    async def get_traffic(self, request: Request) -> Response:
        records = await self.store.traffic()
        return _json({"traffic": [public_view(records[name]) for name in sorted(records)]})

    async def put_traffic(self, request: Request) -> Response:
        """Set one traffic record. An invalid one, or one naming an application that does not
        exist, is a 400 saying why (as `serve.set_traffic`'s ValueError)."""
        data = await _read_json(request)
        try:
            body = TrafficSchema.model_validate(data)
            record = make_traffic(body.name, body.route_prefix, body.split, body.shadow,
                                  body.methods)
            await write_traffic(self.store, record)
        except ValidationError as exc:
            raise HTTPError(400, _reasons(exc)) from exc
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from exc
        return _json(public_view(record))

    async def delete_traffic(self, request: Request) -> Response:
        name = request.path_params["name"]
        if not await self.store.delete_traffic(name):
            raise declarative.UnknownTarget(f"there is no traffic record {name!r}")
        await self.store.announce("traffic")
        return _json({"deleted": name})

    @property
    def dead_letters(self) -> DeadLetters:
        if self._dead_letters is None:
            raise HTTPError(503, "this controller does not serve the dead letters")
        return self._dead_letters

    async def list_dead(self, request: Request) -> Response:
        query = request.query_params
        try:
            limit = int(query.get("limit", DEFAULT_LIMIT))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100_000:
            raise HTTPError(400, "limit must be an integer from 1 to 100000")
        letters = await self.dead_letters.list(query.get("app"), query.get("deployment"),
                                               limit)
        return _json({"count": len(letters),
                      "dead_letters": [letter.to_json() for letter in letters]})

    async def show_dead(self, request: Request) -> Response:
        letter_id = request.path_params["id"]
        shown = await self.dead_letters.show(letter_id)
        if shown is None:
            raise HTTPError(404, f"there is no dead letter {letter_id!r} among the first "
                                 f"{DEFAULT_LIMIT}")
        letter, body = shown
        return _json({**letter.to_json(), "body": body})

    async def replay_dead(self, request: Request) -> Response:
        body = await _parse(request, DeadSelector)
        outcome = await self.dead_letters.replay(body.selector(), body.limit)
        return _json({"replayed": len(outcome.replayed), "ids": outcome.replayed,
                      "kept": outcome.kept})

    async def purge_dead(self, request: Request) -> Response:
        body = await _parse(request, DeadSelector)
        return _json({"purged": await self.dead_letters.purge(body.selector(), body.limit)})


# errors -----------------------------------------------------------------------------------------
# Every failure of an endpoint becomes a JSON answer with the right status.
async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPError)
    return _json({"detail": exc.detail}, exc.status)


def _answer(status: int) -> ExceptionHandler:
    async def handler(request: Request, exc: Exception) -> Response:
        return _json({"detail": str(exc)}, status)

    return handler


async def _redis_unavailable(request: Request, exc: Exception) -> Response:
    log.warning("REST %s %s: Redis is unavailable: %s", request.method, request.url.path, exc)
    return _json({"detail": f"the cluster's Redis is unavailable: {exc}"}, 503)


async def _broker_unavailable(request: Request, exc: Exception) -> Response:
    log.warning("REST %s %s: RabbitMQ failed: %s", request.method, request.url.path, exc)
    return _json({"detail": f"the cluster's RabbitMQ is unavailable: {exc}"}, 503)


async def _internal_error(request: Request, exc: Exception) -> Response:
    # Starlette raises the error again after this answer, and uvicorn logs its traceback.
    log.error("REST %s %s failed: %s: %s", request.method, request.url.path,
              type(exc).__name__, exc)
    return _json({"detail": "internal error; see the controller's log"}, 500)


EXCEPTION_HANDLERS: dict[Any, ExceptionHandler] = {
    HTTPError: _refused,
    declarative.UnknownTarget: _answer(404),
    declarative.Refused: _answer(409),
    RedisError: _redis_unavailable,
    ClusterUnavailable: _redis_unavailable,
    ClusterSecretMissing: _answer(503),  # the operator must give the controller one
    StateError: _redis_unavailable,
    TransportError: _broker_unavailable,
    Exception: _internal_error,
}


async def _parse(request: Request, model: type[M]) -> M:
    data = await _read_json(request)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise HTTPError(422, orjson.loads(exc.json(include_url=False))) from exc


async def _read_json(request: Request) -> Any:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPError(413, f"the body is larger than {MAX_BODY_BYTES} bytes")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPError(400, f"the body is not JSON: {exc}") from exc


def _reasons(exc: ValidationError) -> str:
    """A validation error in one line: where, and what is wrong there."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'body'}: "
        f"{error['msg'].removeprefix('Value error, ')}" for error in exc.errors())


def _json(content: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


# the server ------------------------------------------------------------------------------------
class RestServer:
    """Serves the API on the dashboard address. While another controller on this host holds
    that address, it waits and retries, so a standby takes the API over with the lead."""

    def __init__(self, settings: Settings, store: Store, metrics: Metrics | None = None,
                 dead_letters: DeadLetters | None = None,
                 queue_depths: status_page.QueueDepths | None = None) -> None:
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.dead_letters = dead_letters
        self.queue_depths = queue_depths
        self.server: HttpServer | None = None
        self._stopping = asyncio.Event()
        # Set once the API is served, its address was found taken, or serving ended.
        self._settled = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Returns once the API is served, or its address was found taken."""
        app = create_app(self.store, self.settings, server_tokens(self.settings.cluster),
                         self.metrics, self.dead_letters, self.queue_depths)
        self._task = asyncio.create_task(self._serve(app))
        self._task.add_done_callback(lambda _: self._settled.set())
        await self._settled.wait()

    async def stop(self) -> None:
        self._stopping.set()
        if self.server is not None:
            self.server.should_exit = True
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 10)
            except TimeoutError:
                log.warning("the REST API did not stop within 10s")

    async def _serve(self, app: ASGIApp) -> None:
        host, port = self.settings.dashboard_host, self.settings.dashboard_port

        async def listen() -> socket.socket | None:
            return None if self._stopping.is_set() else _listen(host, port)

        def retrying(state: RetryCallState) -> None:
            if state.attempt_number == 1:
                exc = state.outcome.exception() if state.outcome else None
                log.warning("not serving the REST API yet: cannot listen on %s:%d (%s); "
                            "retrying every %.0fs", host, port, exc, LISTEN_RETRY_S)
                self._settled.set()

        sock: socket.socket | None = await AsyncRetrying(
            retry=retry_if_exception_type(OSError), wait=wait_fixed(LISTEN_RETRY_S),
            sleep=lambda seconds: sleep_or_stop(self._stopping, seconds),
            before_sleep=retrying)(listen)
        if sock is None:
            return
        tls = self.settings.server_tls()
        config = uvicorn.Config(app, loop="none", lifespan="off", access_log=False,
                                log_level="warning", log_config=None,  # the root's format
                                timeout_graceful_shutdown=3, **tls.uvicorn_options())
        # The controller owns SIGTERM and SIGINT (lifecycle.stop_on_signals).
        self.server = HttpServer(config, on_started=self._settled.set)
        log.info("REST API on %s://%s:%d", tls.scheme, host, sock.getsockname()[1])
        try:
            await self.server.serve(sockets=[sock])
        except SystemExit:  # uvicorn exits on a startup failure; the controller must not
            log.error("the REST API failed to start")


async def serve_rest_api(settings: Settings, store: Store, metrics: Metrics | None = None,
                         dead_letters: DeadLetters | None = None,
                         queue_depths: status_page.QueueDepths | None = None) -> RestServer:
    server = RestServer(settings, store, metrics, dead_letters, queue_depths)
    await server.start()
    return server


def _listen(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock
