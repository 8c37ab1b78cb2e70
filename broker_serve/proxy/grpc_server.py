"""The gRPC ingress: grpcio's asyncio server beside the HTTP proxy, one `grpc` message per call.

A call picks its application by the `application` metadata key (or the only application
there is) and the ingress deployment's method by the last segment of its gRPC method path. The
request message is published as the serialized bytes the client sent, and each `result` event's
`body` is written back as it came: the handlers are registered without (de)serializers, so the
proxy never decodes a message (docs/protocol.md, "`grpc` body"). The route table, reply queue,
correlation ids, deadlines and cancellation are the HTTP proxy's own.

With BROKER_SERVE_HTTPS_CERT_FILE set, the port serves TLS with that certificate, the one the
proxy's HTTP port serves; else plaintext.

grpcio is the optional extra `grpc`: proxy/server.py imports this module only when the
cluster's grpc_options name servicer functions.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from ..config import gRPCOptions
from ..exceptions import BackPressureError, BrokerServeError, ProtocolError
from ..observability import tracing
from ..observability.logging import AccessLog
from ..protocol import deadlines, priorities
from ..protocol import messages as protocol
from ..protocol.grpc_methods import GrpcMethods
from ..transport.broker import ReplyEvents
from .grpc_api import serve_pb2
from .http import NO_ROUTES_MESSAGE, Proxy

log = logging.getLogger("broker_serve.proxy.grpc")

API_SERVICE = "/ray.serve.RayServeAPIService/"
HEALTHZ_OK = "success"
# Metadata keys the proxy consumes; the rest travel to the replica (docs/protocol.md).
APPLICATION_KEY = "application"
MODEL_ID_KEY = "multiplexed_model_id"
REQUEST_ID_KEY = "request_id"
_OWN_KEYS = frozenset((APPLICATION_KEY, MODEL_ID_KEY, REQUEST_ID_KEY))

# A replica's error status → the gRPC code the client sees (docs/architecture.md,
# "gRPC ingress"). QueueFull's 503 and NoSuchMethod's 404 are told apart by their `error`.
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
}
_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
# What grpc core counts in metadata besides the client's own entries: the pseudo-headers,
# content-type, te, user-agent, grpc-timeout... (measured: about 500 bytes).
METADATA_OVERHEAD_BYTES = 4096


class _Refused(Exception):
    """Ends a call before or instead of its relay: the gRPC status and details to answer."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class GrpcIngress:
    """The gRPC server of one proxy: started on grpc_options.port, stopped with the proxy."""

    def __init__(self, proxy: Proxy, options: gRPCOptions, host: str) -> None:
        self.proxy = proxy
        self.options = options
        self.methods = GrpcMethods(options.grpc_servicer_functions)
        self.address = f"{host}:{options.port}"
        self.access = AccessLog(_access_text, _access_fields)
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=self._server_options())
        server.add_generic_rpc_handlers((_Handlers(self),))
        # TLS with the proxy's HTTPS certificate, where one is set (docs/security.md, "TLS").
        tls = self.proxy.settings.server_tls()
        if tls.enabled:
            credentials = grpc.ssl_server_credentials([tls.key_and_chain()])
            port = server.add_secure_port(self.address, credentials)
        else:
            port = server.add_insecure_port(self.address)
        if port == 0:
            raise RuntimeError(f"the gRPC server cannot listen on {self.address}")
        await server.start()
        self._server = server
        log.info("proxy %s serving gRPC%s on %s", self.proxy.proxy_id,
                 " over TLS" if tls.enabled else "", self.address)

    def _server_options(self) -> list[tuple[str, int]]:
        """grpc core's own bounds, the HTTP limits' counterparts (docs/architecture.md,
        "Limits on untrusted input"). Core refuses a message over the body limit with
        RESOURCE_EXHAUSTED before the proxy sees it. The metadata bound leaves room for
        HTTP/2's pseudo-headers and HPACK's 32 bytes an entry, so the proxy's own check of the
        client's metadata (`refusal`, counted) is what refuses first."""
        limits = self.proxy.limits
        metadata = limits.header_bytes + 32 * limits.header_count + METADATA_OVERHEAD_BYTES
        return [("grpc.max_receive_message_length", self.proxy.max_body),
                ("grpc.max_metadata_size", metadata),
                ("grpc.absolute_max_metadata_size", metadata)]

    def refusal(self, metadata: tuple[tuple[str, str | bytes], ...]) -> _Refused | None:
        """RESOURCE_EXHAUSTED for too many metadata entries, too many bytes of them, or a
        proxy with its limit of requests in flight; counted by reason."""
        limits = self.proxy.limits
        if len(metadata) > limits.header_count:
            limits.metrics.refused("too_many_headers")
            return _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{len(metadata)} metadata entries, over the limit of "
                            f"{limits.header_count} (max_header_count)")
        size = sum(len(key) + len(value) for key, value in metadata)
        if size > limits.header_bytes:
            limits.metrics.refused("headers_too_large")
            return _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"{size} bytes of metadata, over the limit of "
                            f"{limits.header_bytes} (max_header_bytes)")
        if self.proxy._inflight + self.proxy._websockets >= limits.inflight:
            limits.metrics.refused("too_many_inflight")
            return _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"this proxy has its limit of {limits.inflight} requests in "
                            "flight (max_inflight_requests); retry later")
        return None

    async def stop(self, grace_s: float = 30) -> None:
        """Finish the calls in progress (for up to `grace_s`), then cancel the rest."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace_s)
        self.access.flush()

    # the service API (Ray's RayServeAPIService) -------------------------------------------
    async def list_applications(self, _: bytes, context: grpc.aio.ServicerContext) -> bytes:
        names = sorted({str(entry["app"]) for entry in self.proxy.table.routes.values()})
        return bytes(serve_pb2.ListApplicationsResponse(application_names=names)
                     .SerializeToString())

    async def healthz(self, _: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """As /-/healthz answers: `success` once the proxy can route, else UNAVAILABLE."""
        connection = self.proxy.broker.connection
        if connection is None or connection.is_closed:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "RabbitMQ connection is down")
        if not self.proxy.table.populated:
            await context.abort(grpc.StatusCode.UNAVAILABLE, NO_ROUTES_MESSAGE)
        return bytes(serve_pb2.HealthzResponse(message=HEALTHZ_OK).SerializeToString())

    # user calls --------------------------------------------------------------------------
    async def unary(self, method: str, body: bytes, context: grpc.aio.ServicerContext
                    ) -> bytes:
        call = _Call(method, context)
        reply = b""
        try:
            async for message in self._call(call, body, streaming=False):
                reply = message
        except _Refused as refused:
            call.code = refused.code
            await context.abort(refused.code, refused.details)
        finally:
            self._finished(call)
        return reply

    async def stream(self, method: str, body: bytes, context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[bytes]:
        call = _Call(method, context)
        try:
            async for message in self._call(call, body, streaming=True):
                yield message
        except _Refused as refused:
            call.code = refused.code
            await context.abort(refused.code, refused.details)
        finally:
            self._finished(call)

    async def _call(self, call: _Call, body: bytes, *, streaming: bool
                    ) -> AsyncIterator[bytes]:
        proxy = self.proxy
        metadata = _metadata(call.context)
        call.correlation_id = f"{proxy.proxy_id}-g{next(proxy._ids)}"
        call.request_id = metadata.get(REQUEST_ID_KEY) or call.correlation_id
        route = self._route(call, metadata.get(APPLICATION_KEY))
        deadline = self._deadline(call.context)
        events = proxy.router.register(call.correlation_id)
        proxy._inflight += 1  # the proxy's one gauge of requests in progress
        try:
            await self._publish(call, route, body, streaming, metadata, deadline, events)
            relay = self._relay(call, events)
            async with asyncio.timeout(None if deadline is None
                                       else (deadline - deadlines.now_ms()) / 1000):
                async for message in relay:
                    yield message
        except TimeoutError:
            proxy._cancel(call.correlation_id)
            raise _Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                           "no complete response by the request's deadline") from None
        except asyncio.CancelledError:
            # The client cancelled or its deadline passed: stop the work it asked for.
            call.code = grpc.StatusCode.CANCELLED
            proxy._cancel(call.correlation_id)
            raise
        except BackPressureError as exc:
            proxy.metrics.rejected(call.app)
            raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except BrokerServeError as exc:  # RabbitMQ away: as the HTTP proxy's 503
            raise _Refused(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        finally:
            proxy._inflight -= 1
            proxy.router.unregister(call.correlation_id)

    def _route(self, call: _Call, application: str | None) -> dict[str, Any]:
        """The route entry of the call's application: by metadata, else the only one."""
        by_app = {str(entry["app"]): entry for entry in self.proxy.table.routes.values()}
        if application is None:
            if len(by_app) != 1:
                raise _Refused(grpc.StatusCode.NOT_FOUND,
                               "Application metadata not set. Please ping "
                               "/ray.serve.RayServeAPIService/ListApplications for available "
                               f"applications: {sorted(by_app)}.")
            application = next(iter(by_app))
        route = by_app.get(application)
        if route is None:
            raise _Refused(grpc.StatusCode.NOT_FOUND,
                           f"Application {application!r} not found. Please ping "
                           "/ray.serve.RayServeAPIService/ListApplications for available "
                           f"applications: {sorted(by_app)}.")
        call.app = application
        if not route.get("ready"):
            reason = route.get("message") or f"application {application!r} is {route['status']}"
            raise _Refused(grpc.StatusCode.UNAVAILABLE, str(reason))
        return route

    def _deadline(self, context: grpc.aio.ServicerContext) -> int | None:
        """The earlier of the client's gRPC deadline and grpc_options.request_timeout_s."""
        arrived_ms = deadlines.now_ms()
        remaining = context.time_remaining()
        own = None if remaining is None else arrived_ms + int(remaining * 1000)
        timeout_s = self.options.request_timeout_s
        timeout = None if timeout_s is None else arrived_ms + int(timeout_s * 1000)
        return deadlines.earlier(own, timeout)

    async def _publish(self, call: _Call, route: dict[str, Any], body: bytes, streaming: bool,
                       metadata: dict[str, str], deadline: int | None,
                       events: ReplyEvents) -> None:
        payload: dict[str, Any] = {
            "method": call.method, "body": body, "streaming": streaming,
            "metadata": [[k, v] for k, v in metadata.items() if k not in _OWN_KEYS],
        }
        if metadata.get(MODEL_ID_KEY):
            payload["multiplexed_model_id"] = metadata[MODEL_ID_KEY]
        expiration = remaining = None
        if deadline is not None:
            remaining = deadline - deadlines.now_ms()
            expiration = deadlines.expiration(remaining)
        priority = priorities.of_request(None, bool(route.get("ordered")), remaining)
        broker, router = self.proxy.broker, self.proxy.router
        arguments: dict[str, Any] = {
            "type": protocol.KIND_GRPC, "correlation_id": call.correlation_id,
            "reply_to": router.queue_name,
            "headers": protocol.request_headers(deadline, published_us=protocol.now_us(),
                                                request_id=metadata.get(REQUEST_ID_KEY)),
            "expiration": expiration, "priority": priority, "mandatory": True}
        if call.span is not None:
            call.span.inject(arguments["headers"])
        if not await broker.publish_request(
                route["queue"], protocol.pack(payload), bounded=bool(route.get("bounded")),
                durable=bool(route.get("durable")), events=events, deadline_ms=deadline,
                **arguments):
            raise BackPressureError(f"application {call.app!r} has max_queued_requests "
                                    "waiting already; retry later")

    async def _relay(self, call: _Call, events: Any) -> AsyncIterator[bytes]:
        """Each `result` body as a response message; the final event's status and metadata."""
        replica: str | None = None
        sent = False
        while True:
            kind, event = await events.get()
            if replica is not None and event.get("replica", replica) != replica and sent:
                raise _Refused(grpc.StatusCode.UNAVAILABLE,
                               f"replica {replica} died mid-stream")
            replica = event.get("replica", replica)
            if kind == protocol.ERROR:
                raise _Refused(_error_code(event), str(event.get("message", "")))
            if kind != protocol.RESULT:
                continue
            if "body" in event:
                sent = True
                yield bytes(event["body"])
            if not event.get("more"):
                self._finish_status(call, event)
                return

    def _finish_status(self, call: _Call, event: dict[str, Any]) -> None:
        """The status code, details and trailing metadata the deployment set, if any."""
        context = call.context
        if event.get("trailing_metadata"):
            context.set_trailing_metadata(tuple((str(k), str(v))
                                                for k, v in event["trailing_metadata"]))
        if event.get("code") is not None:
            code = _BY_VALUE.get(int(event["code"]), grpc.StatusCode.UNKNOWN)
            call.code = code
            context.set_code(code)
        if event.get("details"):
            context.set_details(str(event["details"]))

    def _finished(self, call: _Call) -> None:
        seconds = time.perf_counter() - call.arrived
        code = call.code.name
        self.proxy.metrics.observe_grpc(call.app, call.method, code, seconds)
        if self.access.enabled:
            self.access.add((call.method, code, seconds, call.request_id, call.app))
        if call.span is not None:
            call.span.end(error=None if call.code == grpc.StatusCode.OK else code, attributes={
                "rpc.grpc.status_code": call.code.value[0], "broker_serve.application": call.app,
                "broker_serve.request_id": call.request_id})


class _Call:
    """One gRPC call at the proxy: what its relay, metrics and log line need."""

    __slots__ = ("app", "arrived", "code", "context", "correlation_id", "method", "request_id",
                 "span")

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.context = context
        self.arrived = time.perf_counter()
        self.code = grpc.StatusCode.OK
        self.app = self.correlation_id = self.request_id = ""
        traces = tracing.traces
        # The call's span, parent of what it publishes (a client's traceparent metadata is
        # its parent); not current: the handler is a generator that grpc steps.
        self.span = None if traces is None else traces.grpc_call(
            method, context.invocation_metadata() or ())


class _Handlers(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Every method of the registered services, plus Ray's RayServeAPIService, with bytes in
    and bytes out (no (de)serializers: the proxy never decodes a message)."""

    def __init__(self, ingress: GrpcIngress) -> None:
        self.ingress = ingress

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path: str = details.method
        ingress = self.ingress
        if path.startswith(API_SERVICE):
            own = {"ListApplications": ingress.list_applications,
                   "Healthz": ingress.healthz}.get(path.removeprefix(API_SERVICE))
            return None if own is None else grpc.unary_unary_rpc_method_handler(own)
        try:
            method = ingress.methods.method(path)
        except ProtocolError:
            return None  # grpc answers UNIMPLEMENTED
        refused = ingress.refusal(details.invocation_metadata or ())
        if refused is not None:  # before the message is read
            return grpc.unary_unary_rpc_method_handler(_bound(_refuse, refused))
        if method.streaming:
            return grpc.unary_stream_rpc_method_handler(_bound(ingress.stream, path))
        return grpc.unary_unary_rpc_method_handler(_bound(ingress.unary, path))


async def _refuse(refused: _Refused, _: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(refused.code, refused.details)
    raise AssertionError("abort raises")


def _bound(behaviour: Callable[..., Any], bound: Any) -> Callable[..., Any]:
    # A partial, not a closure: grpc tells coroutine and async generator handlers apart by
    # inspecting them, and inspect sees through a partial.
    return functools.partial(behaviour, bound)


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """The client's ASCII metadata (binary `-bin` values do not travel)."""
    return {str(key): value for key, value in context.invocation_metadata() or ()
            if isinstance(value, str)}


def _error_code(event: dict[str, Any]) -> grpc.StatusCode:
    error = event.get("error")
    if error == "QueueFull":
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if error == "NoSuchMethod":  # the deployment lacks the method: as Ray, and grpc, answer
        return grpc.StatusCode.UNIMPLEMENTED
    return _CODES.get(int(event.get("status", 500)), grpc.StatusCode.UNKNOWN)


def _access_text(line: tuple[Any, ...]) -> str:
    method, code, seconds, request_id, app = line
    return (f"GRPC {method} {code} {seconds * 1000:.2f}ms request_id={request_id} "
            f"application={app}")


def _access_fields(line: tuple[Any, ...]) -> dict[str, Any]:
    method, code, seconds, request_id, app = line
    return {"method": "GRPC", "path": method, "status": code,
            "duration_ms": round(seconds * 1000, 3), "request_id": request_id,
            "application": app}
