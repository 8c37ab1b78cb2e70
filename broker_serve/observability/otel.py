"""The spans broker-serve makes, and how their context travels (docs/architecture.md, "Tracing").

Imported only once `tracing.setup` found an exporter configured, so a process without the
`otel` extra never imports OpenTelemetry. The W3C trace context travels as the `traceparent`
and `tracestate` headers of AMQP messages (docs/protocol.md, "Request message"); `inject` and
`extract` are the only code that reads or writes them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

# W3C Trace Context only, whatever OTEL_PROPAGATORS says: its two headers are the protocol's
# (messages.HEADER_TRACEPARENT, HEADER_TRACESTATE).
_PROPAGATOR = TraceContextTextMapPropagator()
_MESSAGING = {"messaging.system": "rabbitmq"}
_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})


class _TextGetter(Getter[Any]):
    """Reads a header of an AMQP headers table (str or bytes values), or of a list of
    (name, value) pairs: an ASGI scope's headers (bytes), gRPC metadata (str)."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        if isinstance(carrier, Mapping):
            value = carrier.get(key)
        else:
            value = next((v for k, v in carrier if _text(k).lower() == key), None)
        return None if value is None else [_text(value)]

    def keys(self, carrier: Any) -> list[str]:
        return [_text(k) for k in carrier] if isinstance(carrier, Mapping) else [
            _text(k) for k, _ in carrier]


def _text(value: Any) -> str:
    return bytes(value).decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)


_GETTER = _TextGetter()


class Traces:
    """This process's tracer provider and the spans of each part."""

    def __init__(self, role: str, instance_id: str | None, exporters: Iterable[SpanExporter]
                 ) -> None:
        resource = Resource.create({"broker_serve.process": role})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: f"broker-serve-{role}"}))
        if instance_id:
            resource = resource.merge(Resource({SERVICE_INSTANCE_ID: instance_id}))
        # tracing.shutdown flushes, from the entry point or at exit.
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        for exporter in exporters:
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        # Global, so that spans the user's code makes join the request's trace.
        trace.set_tracer_provider(self.provider)
        self.tracer = self.provider.get_tracer("broker_serve")

    def shutdown(self) -> None:
        self.provider.shutdown()  # exports what is left

    # propagation -------------------------------------------------------------------------
    @staticmethod
    def inject_current(headers: MutableMapping[str, Any]) -> None:
        """Write the current span's context into AMQP headers."""
        _PROPAGATOR.inject(headers)

    @staticmethod
    def reparent_scope(scope: MutableMapping[str, Any]) -> None:
        """Point an ASGI scope's `traceparent` and `tracestate` headers at the current span
        (the replica's processing span). They are what the client sent the proxy, and an
        instrumented app takes its parent from them (FastAPI makes spans of its own once a
        tracer provider is set): its spans were siblings of the proxy's span, or roots of
        other traces, instead of children of the request's processing."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        headers = scope.get("headers")
        kept = [pair for pair in headers if not (
            isinstance(pair, (list, tuple)) and pair and isinstance(pair[0], bytes)
            and pair[0].lower() in _TRACE_HEADERS)] if isinstance(headers, list) else []
        scope["headers"] = kept + [[name.encode(), value.encode()]
                                   for name, value in carrier.items()]

    @staticmethod
    def extract(carrier: Any) -> Context:
        """The remote parent in AMQP headers, an ASGI header list or gRPC metadata; without
        a valid one, an empty context: what starts from it is a root, never a child of
        whatever this process's current span is."""
        return _PROPAGATOR.extract(carrier, Context(), getter=_GETTER)

    # spans of each part ------------------------------------------------------------------
    def http_request(self, scope: Mapping[str, Any]) -> Active:
        """The proxy's span of one HTTP request, arrival to the end of the response; the
        client's traceparent, if it sent one, is its parent. Current until it ends, so what
        the proxy publishes for it is its child."""
        method = scope["method"]
        span = self.tracer.start_span(
            method, self.extract(scope["headers"]), SpanKind.SERVER,
            {"http.request.method": method, "url.path": scope["path"],
             "url.scheme": scope.get("scheme", "http")})
        return Active(span, activate=True)

    def websocket(self, scope: Mapping[str, Any], route: str, app: str) -> Active:
        span = self.tracer.start_span(
            f"WEBSOCKET {route}", self.extract(scope["headers"]), SpanKind.SERVER,
            {"url.path": scope["path"], "http.route": route, "broker_serve.application": app})
        return Active(span)

    def grpc_call(self, method: str, metadata: Iterable[tuple[str, Any]]) -> Active:
        service, _, name = method.lstrip("/").rpartition("/")
        span = self.tracer.start_span(
            method.lstrip("/"), self.extract(list(metadata)), SpanKind.SERVER,
            {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})
        return Active(span)

    def replica_request(self, headers: Mapping[str, Any], *, kind: str, queue: str, app: str,
                        deployment: str, replica: str, correlation_id: str, request_id: str,
                        published_us: int | None, job: bool) -> Active:
        """The replica's processing span (CONSUMER), current while the request runs; and,
        for a first delivery that says when it was published, its queue wait, from then to
        now. Both are children of the publisher's span; without one (an untraced caller),
        the processing span starts a trace, and the queue wait is its child."""
        now = time.time_ns()
        parent = self.extract(headers)
        attributes: dict[str, Any] = {
            **_MESSAGING, "messaging.destination.name": queue,
            "messaging.message.id": correlation_id, "broker_serve.application": app,
            "broker_serve.deployment": deployment, "broker_serve.replica": replica,
            "broker_serve.request_id": request_id, "broker_serve.kind": kind}
        span = self.tracer.start_span(
            f"process {app}/{deployment}", parent, SpanKind.CONSUMER,
            {**attributes, "broker_serve.job_id": correlation_id} if job else attributes,
            start_time=now)
        if published_us is not None:
            if not trace.get_current_span(parent).get_span_context().is_valid:
                parent = trace.set_span_in_context(span)
            wait = self.tracer.start_span(
                f"queue {app}/{deployment}", parent, SpanKind.INTERNAL, attributes,
                start_time=min(published_us * 1000, now))
            wait.end(now)
        return Active(span, activate=True)

    def handle_call(self, app: str, deployment: str | None, method: str, request_id: str
                    ) -> Active:
        """A handle call (CLIENT), child of the caller's current span; its context goes
        with the call message."""
        span = self.tracer.start_span(
            f"call {app}/{deployment or '<ingress>'}.{method}", None, SpanKind.CLIENT,
            {**_MESSAGING, "broker_serve.application": app,
             "broker_serve.deployment": deployment or "", "broker_serve.method": method,
             "broker_serve.request_id": request_id})
        return Active(span)

    def job_submit(self, app: str, deployment: str, job_id: str) -> Active:
        """Publishing a job (PRODUCER): the parent of the replica's spans that run it."""
        span = self.tracer.start_span(
            f"submit {app}/{deployment}", None, SpanKind.PRODUCER,
            {**_MESSAGING, "broker_serve.application": app,
             "broker_serve.deployment": deployment, "broker_serve.job_id": job_id})
        return Active(span)


class Active:
    """A span in progress: its context goes into the AMQP headers of what it publishes, and
    `end` records the outcome (the first `end` counts). An activated span is current until
    it ends, which must happen in the context it was activated in (the same task)."""

    __slots__ = ("_ended", "_token", "span")

    def __init__(self, span: Span, *, activate: bool = False) -> None:
        self.span = span
        self._ended = False
        self._token = otel_context.attach(trace.set_span_in_context(span)) if activate else None

    def inject(self, headers: MutableMapping[str, Any]) -> None:
        """Write this span's `traceparent` (and `tracestate`) into AMQP headers."""
        _PROPAGATOR.inject(headers, trace.set_span_in_context(self.span))

    def rename(self, name: str) -> None:
        self.span.update_name(name)

    def set(self, key: str, value: Any) -> None:
        self.span.set_attribute(key, value)

    def end(self, status: int | None = None, *, error: str | None = None,
            attributes: Mapping[str, Any] | None = None) -> None:
        """End it with a status (an HTTP-like one, where the request has one): >= 500, or
        an `error` type, marks the span as failed."""
        if self._ended:
            return
        self._ended = True
        span = self.span
        if attributes:
            span.set_attributes(attributes)
        if status is not None:
            span.set_attribute("broker_serve.status", status)
        if error is not None or (status is not None and status >= 500):
            span.set_attribute("error.type", error or str(status))
            span.set_status(Status(StatusCode.ERROR, error))
        span.end()
        if self._token is not None:
            otel_context.detach(self._token)
            self._token = None


def exporters(names: Iterable[str]) -> list[SpanExporter]:
    """The span exporters OTEL_TRACES_EXPORTER names: `otlp` (OTLP over HTTP/protobuf, its
    endpoint, headers and timeout from OTEL_EXPORTER_OTLP_*) and `console`."""
    found: list[SpanExporter] = []
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            found.append(OTLPSpanExporter())
        elif name == "console":
            found.append(ConsoleSpanExporter())
        else:
            raise ValueError(f"unsupported OTEL_TRACES_EXPORTER {name!r} (otlp, console, none)")
    return found
