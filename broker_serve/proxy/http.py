"""The HTTP proxy: a stateless ASGI app that turns each HTTP request into one message.

Request path: match the longest route prefix, publish one `http` message to the ingress
deployment's queue, and stream the reply events to the client as they arrive. The route table is
cached in memory and refreshed from Redis on change events and periodically; nothing on the
request path calls Redis or opens a channel.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..config import HTTPOptions
from ..exceptions import BackPressureError, BrokerServeError, ClusterUnavailable, TransportError
from ..observability import tracing
from ..observability.logging import AccessLog
from ..observability.metrics import ProxyMetrics
from ..protocol import deadlines, priorities
from ..protocol import messages as protocol
from ..settings import CHUNK_BYTES, Settings
from ..state.liveness import process_id
from ..state.store import Store, now
from ..transport.affinity import AffinityTable
from ..transport.broker import Broker, ReplyEvents, ReplyRouter, connection_name
from ..transport.cancellation import AbandonedRequests, cancel
from .client_input import ClientGone, DisconnectWatch, read_chunk
from .jobs import JobGateway, prefers_async
from .limits import Limits, refuse_websocket
from .traffic import ShadowSender, TrafficPolicy, policies
from .websocket import WebSocketSession

if TYPE_CHECKING:
    from ..observability.otel import Active

log = logging.getLogger("broker_serve.proxy.http")

ROUTE_REFRESH_S = 2.0
# What a replica may send ahead of a client, per response (docs/protocol.md, "Flow control").
# Two chunks keep the pipe full; a stalled client costs the proxy at most about this much.
FLOW_WINDOW_BYTES = 2 * CHUNK_BYTES
# A client's X-Request-Id is taken as the request's id if it is this (printable ASCII, no
# spaces, at most 128 bytes); otherwise the proxy's own id is.
_CLIENT_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")
# What /-/healthz answers, as Ray's proxy does, until this proxy has seen a route
# (deploy/healthcheck.py reads it too).
NO_ROUTES_MESSAGE = "Route table is not populated yet."


class ReplicaChanged(BrokerServeError):
    """The response had started when another replica took the request over; it cannot be
    taken back, so the client connection is closed."""


class RouteTable:
    def __init__(self) -> None:
        self.version = 0
        self.routes: dict[str, dict[str, Any]] = {}
        self._by_length: list[tuple[str, dict[str, Any]]] = []
        # Routes with a traffic split, by prefix: their weights, methods and shadows.
        self.policies: dict[str, TrafficPolicy] = {}
        # Set by the first table with a route and never cleared, as in Ray: deleting the last
        # application leaves the proxy healthy, answering 404.
        self.populated = False

    def load(self, table: Mapping[str, Any]) -> None:
        self.version = int(table.get("version", 0))
        self.routes = dict(table.get("routes", {}))
        self.populated = self.populated or bool(self.routes)
        self._by_length = sorted(self.routes.items(), key=lambda item: len(item[0]), reverse=True)
        self.policies = policies(self.routes, self.policies)

    def match(self, path: str) -> tuple[str, dict[str, Any]] | None:
        for prefix, entry in self._by_length:
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                return prefix, entry
        return None


class Proxy:
    def __init__(self, settings: Settings, options: HTTPOptions) -> None:
        self.settings = settings
        self.options = options
        self.proxy_id = process_id()
        self.store = Store(settings.redis_url, settings.cluster, settings.client_tls())
        self.names = self.store.names
        self.broker = Broker(settings.amqp_url,
                             connection_name(settings.cluster, "proxy", self.proxy_id),
                             cancel_exchange=self.names.cancel_exchange,
                             tls=settings.client_tls())
        self.router = ReplyRouter(self.broker, self.names.reply_queue(f"proxy-{self.proxy_id}"),
                                  on_abandoned=AbandonedRequests(self.broker, self.store))
        self.table = RouteTable()
        self.affinity = AffinityTable()
        self.max_body = min(options.max_body_bytes, settings.max_body_bytes)
        self._ids = itertools.count()
        self._stopping = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[None]] = set()
        self.metrics = ProxyMetrics()
        self.limits = Limits(options, self.metrics)
        self._inflight = self._streams = self._websockets = 0
        self.metrics.inflight.set_function(lambda: self._inflight)
        self.metrics.open_streams.set_function(lambda: self._streams)
        self.metrics.open_websockets.set_function(lambda: self._websockets)
        self.access = AccessLog(_access_text, _access_fields)
        self.shadows = ShadowSender(self.broker, self.router, self.metrics, self._cancel,
                                    options.request_timeout_s)
        self.jobs = JobGateway(self.broker, self.store, self.max_body)
        self._internal = Starlette(routes=[
            Route("/-/healthz", self._healthz),
            Route("/-/metrics", self._metrics),
            Route("/-/routes", self._routes),
            Route("/-/routes/detail", self._routes_detail),
            *self.jobs.routes(),
        ])

    # lifecycle -----------------------------------------------------------------------------
    async def startup(self) -> None:
        await self.store.ping()
        await self.broker.connect()
        await self.router.start()
        await self._refresh(None)
        self._watcher = asyncio.create_task(
            self.store.watch_events(self._refresh, ROUTE_REFRESH_S, self._stopping)
        )
        log.info("proxy %s serving on %s:%d", self.proxy_id, self.options.host, self.options.port)

    async def shutdown(self) -> None:
        self._stopping.set()
        self.access.flush()
        if self._watcher is not None:
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self.shadows.stop()
        try:
            await self.store.delete_field(self.names.proxies, self.proxy_id)
            await self.store.drop_heartbeat(self.names.proxy_alive(self.proxy_id))
        except BrokerServeError as exc:  # its record expires on its own
            log.warning("could not remove proxy %s from Redis: %s", self.proxy_id, exc)
        try:
            await asyncio.wait_for(self.broker.close(), 5)
        except (BrokerServeError, TimeoutError) as exc:
            log.warning("could not close the RabbitMQ connection cleanly: %s", exc)
        await self.store.close()

    async def _refresh(self, event: str | None) -> None:
        if event not in (None, "routes"):
            return
        try:
            table = await self.store.routes()
            # No table at all: Redis restarted empty. Keep serving the cached routes until a
            # controller writes them back.
            if table.get("version", 0) and table["version"] != self.table.version:
                self.table.load(table)
                log.info("routes v%d: %s", self.table.version, sorted(self.table.routes))
            await self.store.heartbeat(self.names.proxy_alive(self.proxy_id))
            await self.store.put_proxy({
                "proxy_id": self.proxy_id, "host": self.options.host, "port": self.options.port,
                "hostname": socket.gethostname(),
                "pid": os.getpid(), "routes_version": self.table.version, "updated": now(),
            })
        except BrokerServeError as exc:  # keep serving the cached routes while Redis is away
            log.warning("could not refresh routes: %s", exc)

    # ASGI ------------------------------------------------------------------------------------
    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            await self._forward_websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"].startswith("/-/"):
            refusal = self.limits.of_headers(scope["headers"])
            if refusal is not None:  # /-/jobs publishes too
                request = _ProxyRequest(receive, send)
                request.request_id = f"{self.proxy_id}-{next(self._ids)}"
                await _plain(request, *refusal)
                return
            await self._internal(scope, receive, send)
            return
        request = _ProxyRequest(receive, send)
        traces = tracing.traces
        # Current while the request runs: what it publishes is its child.
        span = None if traces is None else traces.http_request(scope)
        self._inflight += 1
        try:
            await self._forward(scope, request)
        except ReplicaChanged:
            raise  # uvicorn closes the connection: a started response cannot be taken back
        except (ClusterUnavailable, TransportError) as exc:
            await _plain(request, 503, f"Service Unavailable: {exc}")
        except BackPressureError:
            self.metrics.rejected(request.app)
            await _plain(request, 503, f"Service Unavailable: application {request.app} has "
                                       "max_queued_requests waiting already; retry later.",
                         extra_headers=[(b"retry-after", b"1")])
        except Exception:  # the proxy's boundary: a bug here must cost one request, not hang it
            if request.started:
                raise  # uvicorn logs it once and closes the connection
            log.exception("request %s failed in the proxy", request.request_id)
            await _plain(request, 500, "Internal Server Error")
        finally:
            self._inflight -= 1
            self._finished(scope, request)
            if span is not None:
                _end_span(span, scope, request)

    def _finished(self, scope: dict[str, Any], request: _ProxyRequest) -> None:
        """One request's metrics and log line: a counter, a histogram, a list append."""
        seconds = time.perf_counter() - request.arrived
        status = request.status or 499  # nothing was sent: the client left first
        self.metrics.observe(request.app, request.route, status, seconds)
        if self.access.enabled:
            self.access.add((scope["method"], scope["path"], status, seconds,
                             request.request_id, request.app, request.route))

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _match(self, scope: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        root_path = scope.get("root_path", "")
        return self.table.match(scope["path"].removeprefix(root_path) or "/")

    async def _forward(self, scope: dict[str, Any], request: _ProxyRequest) -> None:
        # The correlation id is always the proxy's own, so it is unique; a client's
        # X-Request-Id, if it sent one, is the id logged, returned and passed on.
        request.correlation_id = f"{self.proxy_id}-{next(self._ids)}"
        headers, limits = scope["headers"], self.limits
        if len(headers) > limits.header_count:  # before reading them one by one
            request.request_id = request.correlation_id
            await _plain(request, *limits.too_many_headers(len(headers)))
            return
        length, client_id, slo, priority, job, header_bytes = _scan_headers(headers)
        request.request_id = client_id or request.correlation_id
        if header_bytes > limits.header_bytes:
            await _plain(request, *limits.headers_too_large(header_bytes))
            return
        if self._inflight + self._websockets > limits.inflight:  # this one counted
            await _plain(request, *limits.too_many_inflight())
            return
        matched = self._match(scope)
        if matched is None:
            await _plain(request, 404, f"Not Found: no application serves {scope['path']!r}.")
            return
        prefix, route = matched
        policy = self.table.policies.get(prefix)
        if policy is not None:  # a traffic split: the target is drawn by weight
            route = policy.choose() or route
        request.route, request.app = prefix, route["app"]
        if policy is not None and not policy.allows(scope["method"]):
            await _plain(request, 405, f"Method Not Allowed: {prefix} takes "
                         f"{policy.allow.decode()}.", extra_headers=[(b"allow", policy.allow)])
            return
        refusal = self._refusal(route, length)
        if refusal is None and job:
            await self._submit_job(scope, request, route, prefix, client_id)
            return
        refusal = refusal or _take_deadline(request, slo, self.options.request_timeout_s)
        if refusal is None and priority is not None:
            refusal = _take_priority(request, priority)
        if refusal is not None:
            await _plain(request, *refusal)
            return
        try:
            first, request.more_body = await read_chunk(request.receive)
        except ClientGone:
            return  # nothing was published, so there is nothing to cancel
        request.body_sent = len(first)
        if request.body_sent > self.max_body:  # a chunked body has no content-length
            self.metrics.refused("body_too_large")
            await _plain(request, 413, f"Payload Too Large: the limit is {self.max_body} bytes.")
            return
        request.events = self.router.register(request.correlation_id)
        request.queue, request.chosen = route["queue"], self._pick_replica(scope, route)
        watch = DisconnectWatch(request.receive) if not request.more_body else None
        deadline = request.deadline_ms
        try:
            await self._publish(scope, request, route=route, prefix=prefix, body=first,
                                client_id=client_id)
            if policy is not None and policy.shadows and not request.more_body:
                self.shadows.copy(policy, {"method": scope["method"],
                                           **_request_scope(scope, prefix)},
                                  first, request.correlation_id, client_id)
            relay = self._relay(request)
            if deadline is None:
                await relay
            else:
                async with asyncio.timeout((deadline - deadlines.now_ms()) / 1000):
                    await relay
        except TimeoutError:
            self._cancel(request.correlation_id)
            waited = time.perf_counter() - request.arrived
            if request.started:
                raise ReplicaChanged(f"passed its deadline after {waited:.3f}s mid-response"
                                     ) from None
            await _plain(request, 408, f"Request Timeout: no complete response by the "
                                       f"request's deadline, {waited:.3f}s after it arrived.")
        except asyncio.CancelledError:
            if watch is None or not watch.client_gone:
                raise
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            self._cancel(request.correlation_id)  # the client left: stop the work it asked for
        finally:
            self._release(request, watch)

    async def _submit_job(self, scope: dict[str, Any], request: _ProxyRequest,
                          route: dict[str, Any], prefix: str, client_id: str | None) -> None:
        """`Prefer: respond-async`: publish the request as a job, and answer 202 with where
        its result will be (docs/protocol.md, "Jobs over HTTP")."""
        status, answer = await self.jobs.submit(
            request.receive, {"method": scope["method"], **_request_scope(scope, prefix)},
            route, client_id)
        headers = [(b"content-type", b"application/json")]
        if status == 202:
            headers += [(b"location", f"/-/jobs/{answer['id']}".encode()),
                        (b"preference-applied", b"respond-async")]
        body = orjson.dumps(answer)
        headers.append((b"content-length", str(len(body)).encode()))
        await request.send(request.start(status, headers))
        await request.send({"type": "http.response.body", "body": body})

    def _refusal(self, route: dict[str, Any], length: int | None) -> tuple[int, str] | None:
        """The status and text to answer at once with, if the request cannot go on."""
        if not route.get("ready"):
            reason = route.get("message") or f"application {route['app']!r} is {route['status']}"
            return 503, f"Service Unavailable: {reason}"
        if length is not None and length > self.max_body:
            self.metrics.refused("body_too_large")
            return 413, f"Payload Too Large: the limit is {self.max_body} bytes."
        return None

    def _pick_replica(self, scope: dict[str, Any], route: dict[str, Any]) -> str | None:
        """The replica holding the request's multiplexed model, if one is known; never for a
        bounded queue, whose confirms say when it is full, nor a durable one, whose replicas
        have no affinity queue."""
        queue = route["queue"]
        if not self.affinity.knows(queue) or route.get("bounded") or route.get("durable"):
            return None
        model_id = protocol.model_id_from_headers(scope["headers"])
        return self.affinity.pick(queue, model_id) if model_id else None

    def _release(self, request: _ProxyRequest, watch: DisconnectWatch | None) -> None:
        if watch is not None:
            watch.stop()
        if request.chosen is not None:
            self.affinity.done(request.queue, request.chosen)
        self.router.unregister(request.correlation_id)

    async def _forward_websocket(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Pin a WebSocket session to the replica that accepts it and carry its frames."""
        refusal = self.limits.of_headers(scope["headers"])
        if refusal is None and self._inflight + self._websockets >= self.limits.inflight:
            refusal = self.limits.too_many_inflight()
        if refusal is not None:
            await refuse_websocket(scope, send, refusal)
            return
        matched = self._match(scope)
        if matched is None or not matched[1].get("ready"):
            await send({"type": "websocket.close", "code": 1008})  # before accept: a 403
            return
        prefix, route = matched
        policy = self.table.policies.get(prefix)
        route = (policy.choose() if policy is not None else None) or route
        request_id = f"{self.proxy_id}-{next(self._ids)}"
        events = self.router.register(request_id)
        session = WebSocketSession(self.broker, request_id, receive, send,
                                   self.metrics.refused)
        arrived = time.perf_counter()
        traces = tracing.traces
        span = None if traces is None else traces.websocket(scope, prefix, route["app"])
        self._websockets += 1
        try:
            payload = {"scope": {**_request_scope(scope, prefix),
                                 "subprotocols": scope.get("subprotocols", [])}}
            await receive()  # websocket.connect: answered once the app accepts or refuses
            headers = protocol.request_headers(published_us=protocol.now_us())
            if span is not None:
                span.inject(headers)
            await self.broker.publish(
                route["queue"], protocol.pack(payload), type=protocol.KIND_WEBSOCKET,
                correlation_id=request_id, reply_to=self.router.queue_name,
                headers=headers, mandatory=True,
            )
            await session.relay(events)
        except (ClusterUnavailable, TransportError):
            await session.close(1011)
        except Exception:  # the proxy's boundary: a bug here must close one session, not hang it
            log.exception("WebSocket session %s failed in the proxy", request_id)
            await session.close(1011)
        finally:
            self._websockets -= 1
            await session.stop()
            self.router.unregister(request_id)
            if span is not None:
                span.end(101 if session.accepted else 403)
            if self.access.enabled:
                self.access.add(("WEBSOCKET", scope["path"], 101 if session.accepted else 403,
                                 time.perf_counter() - arrived, request_id, route["app"],
                                 prefix))

    def _cancel(self, request_id: str) -> None:
        task = asyncio.ensure_future(cancel(self.broker, self.store, [request_id]))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish(self, scope: dict[str, Any], request: _ProxyRequest, *,
                       route: dict[str, Any], prefix: str, body: bytes,
                       client_id: str | None) -> None:
        payload = {
            "scope": {"method": scope["method"], **_request_scope(scope, prefix)},
            "body": body,
            "more_body": request.more_body,
            "window": FLOW_WINDOW_BYTES,
        }
        request_id, deadline = request.correlation_id, request.deadline_ms
        queue = self.names.affinity_queue(request.chosen) if request.chosen else request.queue
        expiration = remaining = None
        if deadline is not None:  # a request that outlives its deadline in the queue never runs
            remaining = deadline - deadlines.now_ms()
            expiration = deadlines.expiration(remaining)
        priority = priorities.of_request(request.priority, bool(route.get("ordered")), remaining)
        headers = protocol.request_headers(deadline, published_us=protocol.now_us(),
                                           request_id=client_id)
        if tracing.traces is not None:
            tracing.traces.inject_current(headers)
        accepted = await self.broker.publish_request(
            queue, protocol.pack(payload), bounded=bool(route.get("bounded")),
            durable=bool(route.get("durable")), events=request.events, deadline_ms=deadline,
            type=protocol.KIND_HTTP, correlation_id=request_id,
            reply_to=self.router.queue_name, headers=headers, expiration=expiration,
            priority=priority, mandatory=True)
        if not accepted:
            raise BackPressureError(
                f"application {route['app']!r} has max_queued_requests waiting already")

    async def _relay(self, request: _ProxyRequest) -> None:
        """Pass reply events to the client; upload the rest of the body once a replica asks.

        The first event tells what the replica the request went to holds (affinity)."""
        events, send, chosen = request.events, request.send, request.chosen
        replica: str | None = None
        started = streaming = False
        upload: asyncio.Task[str | None] | None = None
        try:
            while True:
                kind, event = await events.get()
                if replica is not None and event.get("replica", replica) != replica \
                        and await _answer_redelivery(request, replica, started, upload):
                    return
                if replica is None and (chosen is not None or "models" in event):
                    self.affinity.observe(request.queue, chosen, event)
                replica = event.get("replica", replica)
                if kind == protocol.ACCEPTED and request.more_body and upload is None:
                    upload = asyncio.create_task(self._upload(
                        request.receive, event["inbox"], request.correlation_id,
                        request.body_sent))
                elif kind == protocol.START:
                    chunks, more = protocol.body_chunks(event), bool(event.get("more_body"))
                    started = True
                    credit = _Credit(self.broker, event.get("inbox"), request.correlation_id)
                    await send(request.start(event["status"],
                                             [tuple(h) for h in event.get("headers", ())]))
                    await _send_chunks(send, chunks, more)
                    if not more:
                        return
                    streaming = True
                    self._streams += 1
                    await credit.passed_on(len(event.get("body", b"")))
                elif kind == protocol.BODY and started:
                    more = bool(event.get("more_body"))
                    await _send_chunks(send, protocol.body_chunks(event), more)
                    if not more:
                        return
                    await credit.passed_on(len(event.get("body", b"")))
                elif kind == protocol.ERROR:
                    await _answer_error(request, event, started, upload)
                    return
        finally:
            if streaming:
                self._streams -= 1
            if upload is not None and not upload.done():
                upload.cancel()

    async def _upload(self, receive: Any, inbox: str, request_id: str, sent: int) -> str | None:
        """Stream the rest of the request body to the replica's inbox. Returns an error text."""
        more = True
        while more:
            try:
                chunk, more = await read_chunk(receive)
            except ClientGone:
                await self._send_disconnect(inbox, request_id)
                return "Client Closed Request"
            sent += len(chunk)
            if sent > self.max_body:
                await self._send_disconnect(inbox, request_id)
                return f"Payload Too Large: the limit is {self.max_body} bytes."
            await self.broker.publish(inbox, protocol.pack({"body": chunk, "more_body": more}),
                                      type=protocol.BODY, correlation_id=request_id)
        return None

    async def _send_disconnect(self, inbox: str, request_id: str) -> None:
        await self.broker.publish(inbox, protocol.pack({}), type=protocol.DISCONNECT,
                                  correlation_id=request_id)

    # internal endpoints --------------------------------------------------------------------
    async def _healthz(self, request: Request) -> Response:
        """200 `success` once the proxy can route; 503 while RabbitMQ is away, or until its
        route table has held a route (proxy/README.md says what each answer means)."""
        connection = self.broker.connection
        if connection is None or connection.is_closed:
            return PlainTextResponse("RabbitMQ connection is down", status_code=503)
        if not self.table.populated:
            return PlainTextResponse(NO_ROUTES_MESSAGE, status_code=503)
        return PlainTextResponse("success")

    async def _metrics(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def _routes(self, request: Request) -> Response:
        return JSONResponse({prefix: r["app"] for prefix, r in self.table.routes.items()})

    async def _routes_detail(self, request: Request) -> Response:
        return Response(orjson.dumps({"version": self.table.version, "routes": self.table.routes}),
                        media_type="application/json")


def _request_scope(scope: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The `scope` map of a request message (docs/protocol.md): the client's ASGI scope with
    the matched route prefix added to its root path."""
    root_path = scope.get("root_path", "")
    return {
        "path": scope["path"],
        "raw_path": scope.get("raw_path"),
        "query_string": scope["query_string"],
        "headers": scope["headers"],
        "root_path": root_path + prefix if prefix != "/" else root_path,
        "http_version": scope.get("http_version", "1.1"),
        "scheme": scope["scheme"],
        "client": scope.get("client"),
        "server": scope.get("server"),
    }


async def _send_chunks(send: Any, chunks: list[bytes], more_body: bool) -> None:
    """Each of the app's chunks as its own `http.response.body`, so uvicorn writes each as its
    own HTTP chunk, as Ray does (docs/performance.md, "Streaming", says what that costs)."""
    last = len(chunks) - 1
    for index, chunk in enumerate(chunks):
        await send({"type": "http.response.body", "body": chunk,
                    "more_body": more_body or index < last})
    if not chunks and not more_body:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Credit:
    """Grants a streaming replica more window as the client takes what it sent: the proxy
    never holds much more than FLOW_WINDOW_BYTES of one response."""

    def __init__(self, broker: Broker, inbox: str | None, request_id: str) -> None:
        self.broker = broker
        self.inbox = inbox
        self.request_id = request_id
        self.owed = 0

    async def passed_on(self, size: int) -> None:
        self.owed += size
        if self.inbox and self.owed >= FLOW_WINDOW_BYTES // 2:
            owed, self.owed = self.owed, 0
            await self.broker.publish(self.inbox, protocol.pack({"bytes": owed}),
                                            type=protocol.CREDIT,
                                            correlation_id=self.request_id)


class _ProxyRequest:
    """One HTTP request at the proxy: where it went and how its relay reads replies; its status
    once the response starts (a timeout must not answer twice); and what its metrics and log
    line need. One object per request, so its relay takes no long argument list."""

    __slots__ = ("app", "arrived", "body_sent", "chosen", "correlation_id", "deadline_ms",
                 "events", "more_body", "priority", "queue", "receive", "request_id", "route",
                 "send", "status")
    # Set by Proxy._forward before the request is published:
    correlation_id: str
    more_body: bool  # the rest of the body waits for a replica's `accepted`
    body_sent: int  # request body bytes sent so far
    events: ReplyEvents
    queue: str  # the deployment's queue
    chosen: str | None  # the replica whose affinity queue the request went to
    deadline_ms: int | None  # Unix ms: the earlier of request_timeout_s and the SLO headers

    def __init__(self, receive: Any, send: Any) -> None:
        self.receive = receive
        self.send = send
        self.arrived = time.perf_counter()
        self.status = 0
        self.app = self.route = self.request_id = ""
        # X-Serve-Priority's; None: the deadline's where the route is ordered, else 0.
        self.priority: int | None = None

    @property
    def started(self) -> bool:
        return self.status != 0

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
        """The `http.response.start` message. Every response carries the request's id as
        `X-Request-Id`, unless the app set one."""
        self.status = status
        for name, _ in headers:
            if name == b"x-request-id":
                break
        else:
            headers.append((b"x-request-id", self.request_id.encode()))
        return {"type": "http.response.start", "status": status, "headers": headers}


def _end_span(span: Active, scope: dict[str, Any], request: _ProxyRequest) -> None:
    """End a request's span (`otel.Traces.http_request`) with its route and status."""
    status = request.status or 499
    if request.route:  # no route matched: the span keeps the method alone as its name
        span.rename(f"{scope['method']} {request.route}")
        span.set("http.route", request.route)
    span.end(status, attributes={
        "http.response.status_code": status, "broker_serve.application": request.app,
        "broker_serve.request_id": request.request_id})


def _access_text(line: tuple[Any, ...]) -> str:
    method, path, status, seconds, request_id, app, _ = line
    return (f"{method} {path} {status} {seconds * 1000:.2f}ms request_id={request_id} "
            f"application={app}")


def _access_fields(line: tuple[Any, ...]) -> dict[str, Any]:
    method, path, status, seconds, request_id, app, route = line
    return {"method": method, "path": path, "status": status,
            "duration_ms": round(seconds * 1000, 3), "request_id": request_id,
            "application": app, "route": route}


def _upload_error(upload: asyncio.Task[str | None] | None) -> str | None:
    if upload is None or not upload.done() or upload.cancelled() or upload.exception():
        return None
    return upload.result()


def _scan_headers(headers: list[tuple[bytes, bytes]]
                  ) -> tuple[int | None, str | None, tuple[bytes | None, bytes | None],
                             bytes | None, bool, int]:
    """The request's content-length, the client's X-Request-Id if it is usable, its SLO
    headers (relative, absolute), its X-Serve-Priority, whether it asks to be a job
    (`Prefer: respond-async`), and the size of its headers (names and values)."""
    length = client_id = relative = absolute = priority = None
    job = False
    size = 0
    for name, value in headers:
        size += len(name) + len(value)
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                pass
        elif name == b"x-request-id" and _CLIENT_REQUEST_ID.fullmatch(value):
            client_id = value.decode("ascii")
        elif name == deadlines.HTTP_RELATIVE_SLO:
            relative = value
        elif name == deadlines.HTTP_ABSOLUTE_SLO:
            absolute = value
        elif name == priorities.HTTP_PRIORITY:
            priority = value
        elif name == b"prefer":
            job = job or prefers_async(value)
    return length, client_id, (relative, absolute), priority, job, size


def _take_deadline(request: _ProxyRequest, slo: tuple[bytes | None, bytes | None],
                   timeout_s: float | None) -> tuple[int, str] | None:
    """Set the request's deadline; the status and text to answer at once with if its SLO
    headers are bad or its deadline has passed already."""
    arrived_ms = deadlines.now_ms()
    try:
        request.deadline_ms = deadlines.of_http_request(*slo, timeout_s, arrived_ms)
    except ValueError as exc:
        return 400, f"Bad Request: {exc}."
    if request.deadline_ms is not None and request.deadline_ms <= arrived_ms:
        return 408, "Request Timeout: the request's deadline had passed when it arrived."
    return None


def _take_priority(request: _ProxyRequest, header: bytes) -> tuple[int, str] | None:
    """Set the request's explicit priority; the status and text to answer at once with if its
    X-Serve-Priority is bad."""
    try:
        request.priority = priorities.of_http_header(header)
    except ValueError as exc:
        return 400, f"Bad Request: {exc}."
    return None


async def _plain(request: _ProxyRequest, status: int, text: str,
                 extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = text.encode()
    await request.send(request.start(status, [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
        *(extra_headers or ()),
    ]))
    await request.send({"type": "http.response.body", "body": body})


async def _answer_redelivery(request: _ProxyRequest, replica: str, started: bool,
                             upload: asyncio.Task[str | None] | None) -> bool:
    """RabbitMQ redelivered the request after its replica died. A started response cannot be
    taken back; a body half sent to the dead replica ends the request with a 502 (True);
    otherwise the new replica takes it from the start (False)."""
    if started:
        raise ReplicaChanged(f"replica {replica} died mid-response")
    if upload is None:
        return False
    await _plain(request, 502, "Bad Gateway: the replica died while receiving the request body.")
    return True


async def _answer_error(request: _ProxyRequest, event: dict[str, Any], started: bool,
                        upload: asyncio.Task[str | None] | None) -> None:
    """Answer an error event: with 413 if the body outgrew the limit while uploading, else
    with the replica's status."""
    if started:
        raise ReplicaChanged(f"response cut short: {event.get('message')}")
    failed = _upload_error(upload)
    if failed is not None:
        await _plain(request, 413, failed)
        return
    status = int(event.get("status", 500))
    if status == 500:  # a user exception: its details stay in the replica's log
        text = "Internal Server Error"
    else:
        text = str(event.get("message", ""))
    await _plain(request, status, text)
