"""Running one request inside a replica: the ASGI bridge for `http` and the method call for `call`.

The bridge turns a request message into ASGI `receive`/`send` callables. Response events are
published as they are sent, so a stream reaches the caller chunk by chunk; nothing is buffered
until the end. The one exception: `http.response.start` waits for the first body chunk so that a
unary response is a single message (docs/protocol.md, "Reply events").
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import traceback
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from starlette.requests import Request

from ..client.handle import calls_of_current_request, deadline_of_current_request
from ..context import _web
from ..exceptions import BrokerServeError, ProtocolError, RayServeException
from ..protocol import messages as protocol
from ..protocol.call_values import pack_value, unpack_call
from ..protocol.remote_errors import describe
from ..settings import CHUNK_BYTES
from . import batching, destructor, ingress, multiplex
from .lifespan import Lifespan
from .responses import to_response
from .threads import ThreadRunner

log = logging.getLogger("broker_serve.replica.replica")

Publish = Callable[[str, dict[str, Any]], Awaitable[None]]
# What the caller sent one request through the replica's inbox (body chunks, WebSocket frames,
# a disconnect), sorted out by correlation id.
CallerMessages = asyncio.Queue[tuple[str, dict[str, Any]]]

# A caller that stops sending body chunks must not hold a replica slot forever.
BODY_CHUNK_TIMEOUT_S = 30.0
# A stream sends at most one message per this interval; a chunk waits at most this long.
COALESCE_S = 0.001
ASGIApp = Callable[..., Awaitable[None]]


class ReplyStream:
    """The events of one request delivery, numbered in order; and what the replica's metrics
    and log line say of the request: its method, (HTTP method, path), status, and whether it
    failed (an error event)."""

    def __init__(self, publish: Publish) -> None:
        self._publish = publish
        self.seq = 0
        self.finished = False
        self.started = False
        self.method = ""
        self.http: tuple[str, str] | None = None
        self.status = 200
        self.failed = False

    async def send(self, event: str, fields: dict[str, Any], *, final: bool = False) -> None:
        if self.finished:
            return
        fields["seq"] = self.seq
        self.seq += 1
        self.finished = final
        await self._publish(event, fields)

    async def error(self, status: int, error: str, message: str,
                    extra: dict[str, Any] | None = None) -> None:
        if not self.finished:
            self.status, self.failed = status, True
        await self.send(protocol.ERROR, {"status": status, "error": error, "message": message,
                                         **(extra or {})}, final=True)


class Servable:
    """The user's deployment instance (or function), how to call it, and how its service starts
    and ends: the ingress app's lifespan, `__del__`, the multiplexed models."""

    def __init__(self, target: Any, is_function: bool, asgi_app: ASGIApp | None,
                 threads: ThreadRunner) -> None:
        self.target = target
        self.is_function = is_function
        self.asgi_app = asgi_app
        self.threads = threads
        self.lifespan = Lifespan(asgi_app) if asgi_app is not None else None
        # A deployment called only through handles may have no `__call__`.
        self._http_entry = None if asgi_app or not callable(target) else (
            target if is_function else target.__call__)
        self._takes_request = self._http_entry is not None and _takes_argument(self._http_entry)

    def _resolve(self, method: str) -> Callable[..., Any]:
        if self.is_function:
            if method != "__call__":
                raise ProtocolError(f"function deployment has no method {method!r}",
                                    status=404, error="NoSuchMethod")
            return self.target  # type: ignore[no-any-return]
        if method.startswith("_") and method != "__call__":
            raise ProtocolError(f"method {method!r} is private", status=404, error="NoSuchMethod")
        fn = getattr(self.target, method, None)
        if fn is None or not callable(fn):
            raise ProtocolError(f"deployment has no method {method!r}", status=404,
                                error="NoSuchMethod")
        return fn  # type: ignore[no-any-return]

    async def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run user code: coroutines on the loop, plain functions in a worker thread, in a
        copy of the request's context (its multiplexed model id goes with it)."""
        if (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
                or getattr(fn, batching.ON_EVENT_LOOP, False)):
            result = fn(*args, **kwargs)
        elif kwargs:
            result = await self.threads.run(partial(fn, *args, **kwargs))
        else:
            result = await self.threads.run(fn, *args)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def call_lifecycle(self, method: str, *args: Any) -> Any:
        """Call a lifecycle method of the user's class (reconfigure, check_health), if it has
        it; sync ones off the loop, in the default executor."""
        func = None if self.is_function else getattr(self.target, method, None)
        if func is None:
            return None
        if inspect.iscoroutinefunction(func):
            return await func(*args)
        result = await asyncio.get_running_loop().run_in_executor(None, func, *args)
        return await result if inspect.isawaitable(result) else result

    async def start(self) -> None:
        """Run the ingress app's startup hooks; the instance is constructed already, as in
        Ray. Raises if they fail."""
        if self.lifespan is not None:
            await self.lifespan.startup()

    async def stop(self, timeout: float) -> None:
        """End the service, once requests are done, within `timeout` seconds: the app's
        shutdown hooks, then the instance's `__del__`, then the multiplexed models' unloading
        (Ray's order). What does not finish in time is cancelled and logged."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.lifespan is not None:
            await self.lifespan.shutdown(timeout)
        if not self.is_function:
            await _within(destructor.call_del(self.target), deadline - loop.time(), "__del__")
        await _within(multiplex.unload_all(), deadline - loop.time(),
                      "unloading the multiplexed models")

    async def run_asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Run the ingress app for one request or session, with its copy of the lifespan
        state."""
        assert self.asgi_app is not None and self.lifespan is not None
        scope["state"] = self.lifespan.state.copy()
        await self.asgi_app(scope, receive, send)

    async def handle_http(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.asgi_app is not None:
            await self.run_asgi(scope, receive, send)
            return
        if self._http_entry is None:
            raise ProtocolError("this deployment has no __call__ method, so it does not serve "
                                "HTTP; call its methods through a handle", status=404,
                                error="NoSuchMethod")
        args = (Request(scope, receive),) if self._takes_request else ()
        result = await self.call(self._http_entry, *args)
        await to_response(result)(scope, receive, send)


async def construct(definition: dict[str, Any], threads: ThreadRunner, user_config: Any,
                    constructed: Callable[[Any], None]) -> Servable:
    """Build the user's deployment from its definition (class or function, init arguments):
    the instance, `constructed(instance)`, its ingress app and startup hooks, then
    `reconfigure(user_config)`. A replica process and local testing mode both build so."""
    target = definition["func_or_class"]
    is_function = not inspect.isclass(target)
    if is_function:
        instance = target
    else:
        instance = target(*definition["args"], **definition["kwargs"])
        if inspect.isawaitable(instance):  # an `async def __init__` pattern via __new__
            instance = await instance
    constructed(instance)
    # After the constructor, as in Ray: an ingress builder makes its app now, in the replica.
    asgi_app = None if is_function else ingress.serving_app(target)
    servable = Servable(instance, is_function, asgi_app, threads)
    await servable.start()  # the ingress app's startup hooks: a failure fails the replica
    if user_config is not None and hasattr(instance, "reconfigure"):
        result = instance.reconfigure(user_config)
        if inspect.isawaitable(result):
            await result
    return servable


async def run_attempt(dispatch: Awaitable[None], stream: ReplyStream, *, kind: str | None,
                      secret: bytes, correlation_id: str,
                      cancelled_by_caller: Callable[[], bool], restartable: bool) -> None:
    """Await `dispatch`, which runs the request into `stream`; what escapes it becomes the
    stream's error event. A cancel by its caller ends it 499 (and cascades to the handle calls
    it made); another cancel (the replica stops) propagates, unless the response started and
    is not `restartable`: then it ends 503. A user exception ends it 500, naming its class
    (and, for a handle caller, packing what rebuilds it)."""
    try:
        await dispatch
    except ProtocolError as exc:
        await stream.error(exc.status, exc.error, str(exc))
    except asyncio.CancelledError:
        if cancelled_by_caller():  # done, not retried
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            for call in calls_of_current_request.get() or ():
                call.cancel()  # cascade to the handle calls it made
            await stream.error(499, "Cancelled", "the request was cancelled")
        elif restartable or not stream.started:
            raise  # shutdown: left unacked, RabbitMQ gives it to another replica
        else:  # a started response cannot move to another replica: end it for the caller
            await stream.error(503, "ReplicaStopped", "the replica stopped mid-response")
    except Exception as exc:  # noqa: BLE001 - user code: the caller gets an error event
        log.error("request %s failed:\n%s", correlation_id, traceback.format_exc())
        # A gRPC client gets the message too (as INTERNAL), but no class to raise again.
        detail = (str(exc) if kind in (protocol.KIND_CALL, protocol.KIND_GRPC)
                  else "Internal Server Error")
        # A callee's error passing through keeps its original type, however many hops.
        error_type = (exc.error_type if isinstance(exc, RayServeException) and exc.error_type
                      else type(exc).__name__)
        # Which class to raise again, for a handle caller; an HTTP client is told nothing.
        cause = describe(exc, secret) if kind == protocol.KIND_CALL else None
        await stream.error(500, error_type, detail[:2000], cause)


async def within_deadline(headers: dict[str, Any], stream: ReplyStream) -> bool:
    """Whether the request may still run: a deadline that passed ends it 408. Its deadline
    is inherited by the handle calls it makes."""
    deadline = headers.get(protocol.HEADER_DEADLINE)
    if isinstance(deadline, int):
        if deadline < time.time() * 1000:
            await stream.error(408, "DeadlineExceeded",
                               "the request's deadline passed before a replica took it")
            return False
        deadline_of_current_request.set(deadline)
    return True


class FlowWindow:
    """Response bytes the caller still accepts; its credits open the window again
    (docs/protocol.md, "Flow control")."""

    def __init__(self, size: int) -> None:
        self.available = size
        self._granted: asyncio.Event | None = None

    def grant(self, size: int) -> None:
        self.available += size
        if self._granted is not None:
            self._granted.set()

    def try_spend(self, size: int) -> bool:
        """Spend at once if the window is open (as `spend` would without waiting)."""
        if self.available <= 0:
            return False
        self.available -= size
        return True

    async def spend(self, size: int) -> None:
        while self.available <= 0:
            self._granted = self._granted or asyncio.Event()
            self._granted.clear()
            try:
                await asyncio.wait_for(self._granted.wait(), BODY_CHUNK_TIMEOUT_S)
            except TimeoutError:
                raise ProtocolError(f"the caller granted no credit for "
                                    f"{BODY_CHUNK_TIMEOUT_S:.0f}s", status=504,
                                    error="CreditTimeout") from None
        self.available -= size


class HttpBridge:
    """ASGI receive/send for one `http` request message. `inbox` is the name of the replica's
    inbox, where the caller sends the rest of the body and its credits."""

    def __init__(self, stream: ReplyStream, first_body: bytes, more_body: bool,
                 from_caller: CallerMessages | None,
                 max_body_bytes: int, inbox: str, window: FlowWindow | None = None) -> None:
        self.stream = stream
        self._inbox = inbox
        self._window = window
        self._pending_body: bytes | None = first_body
        self._more_body = more_body
        self._from_caller = from_caller
        self._received = len(first_body)
        self._max_body = max_body_bytes
        self._start: dict[str, Any] | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._buffered_since = 0.0
        self._last_flush = 0.0
        self._publishing = asyncio.Lock()
        self._flush_task: asyncio.Future[None] | None = None
        self._flush_error: Exception | None = None
        self.disconnected = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        if self._pending_body is not None:
            body, self._pending_body = self._pending_body, None
            return {"type": "http.request", "body": body, "more_body": self._more_body}
        if self._more_body and self._from_caller is not None:
            try:
                kind, fields = await asyncio.wait_for(self._from_caller.get(),
                                                      BODY_CHUNK_TIMEOUT_S)
            except TimeoutError:
                raise ProtocolError(
                    f"no request body chunk arrived for {BODY_CHUNK_TIMEOUT_S:.0f}s",
                    status=408, error="BodyIncomplete",
                ) from None
            if kind == protocol.BODY:
                body, self._more_body = protocol.body_chunk(fields)
                self._received += len(body)
                if self._received > self._max_body:
                    raise ProtocolError("request body too large", status=413, error="BodyTooLarge")
                return {"type": "http.request", "body": body, "more_body": self._more_body}
            self.disconnected.set()
            return {"type": "http.disconnect"}
        # The body is complete: like a server, block until the client goes away.
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self._start = {
                "inbox": self._inbox,
                "status": message["status"],
                "headers": [[bytes(k), bytes(v)] for k, v in message.get("headers", ())],
            }
        elif kind == "http.response.body":
            body, more_body = message.get("body", b""), message.get("more_body", False)
            if not more_body and self._start is not None and not self._buffer \
                    and len(body) <= CHUNK_BYTES \
                    and (self._window is None or self._window.try_spend(len(body))):
                await self._send_whole(bytes(body))  # a unary response: one message
            else:
                await self._buffer_body(body, more_body)

    async def _send_whole(self, body: bytes) -> None:
        assert self._start is not None
        fields, self._start = self._start, None
        fields.update(body=body, more_body=False)
        self.stream.started = True
        self.stream.status = fields["status"]
        await self.stream.send(protocol.START, fields, final=True)

    async def _buffer_body(self, body: bytes, more_body: bool) -> None:
        """Response chunks produced fast share messages; each still leaves within 1 ms.

        The start and first chunk go at once. After that a stream sends at most one message per
        `COALESCE_S` (or per MiB): a chunk that follows a quiet period leaves at the app's next
        await, and chunks that come faster share a message, which still tells them apart.
        Per-message cost, not per-chunk cost, then bounds a stream's throughput, and a slow
        token stream sees no delay.
        """
        if self._flush_error is not None:
            raise self._flush_error
        if body:
            if not self._buffer:
                self._buffered_since = time.monotonic()
            self._buffer.append(bytes(body))
            self._buffered += len(body)
        if not more_body:
            await self._flush(final=True)
        elif (not self.stream.started or self._buffered >= CHUNK_BYTES
              or time.monotonic() - self._buffered_since >= COALESCE_S):
            await self._flush(final=False)
            # Publishing only queues the frames: give the connection's writer its turn, or a
            # generator that never awaits would hold them until it ends.
            await asyncio.sleep(0)
        else:
            if self._flush_task is None:
                delay = self._last_flush + COALESCE_S - time.monotonic()
                self._flush_task = asyncio.ensure_future(self._flush_after(delay))
            return
        if self._flush_error is not None:
            raise self._flush_error

    async def finish(self) -> None:
        """End the response if the app returned without ending it."""
        if not self.stream.finished and (self.stream.started or self._start is not None):
            await self._flush(final=True)

    async def _flush_after(self, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        await self._flush(final=False)

    async def _flush(self, final: bool) -> None:
        async with self._publishing:  # FIFO: buffered chunks leave in the order they came
            self._flush_task = None
            chunks, self._buffer, self._buffered = self._buffer, [], 0
            if not chunks and not final:
                return
            self._last_flush = time.monotonic()
            try:
                await self._publish_body(chunks, more_body=not final)
            except BrokerServeError as exc:  # a lost broker or no credit: the app's next
                # send raises it
                self._flush_error = exc

    async def _publish_body(self, chunks: list[bytes], more_body: bool) -> None:
        """Publish the app's chunks, several to an event; `chunk_sizes` keeps where each ends,
        so that the caller writes each as its own HTTP chunk."""
        for body in protocol.body_events(chunks, more_body, CHUNK_BYTES):
            more = body["more_body"]
            if self._window is not None:
                await self._window.spend(len(body["body"]))  # a slow client pauses the app here
            if self._start is not None:
                fields, self._start = self._start, None
                fields.update(body)
                self.stream.started = True
                self.stream.status = fields["status"]
                await self.stream.send(protocol.START, fields, final=not more)
            elif self.stream.started:
                await self.stream.send(protocol.BODY, body, final=not more)


async def run_http(servable: Servable, stream: ReplyStream, payload: dict[str, Any],
                   from_caller: CallerMessages | None, inbox: str, max_body_bytes: int,
                   window: FlowWindow | None = None) -> None:
    scope = protocol.http_scope(payload)
    _web.set(True)  # serve.context.web, for this request's task (and its worker thread)
    stream.http = (scope["method"], scope["path"])  # the replica set the method label
    multiplex._set_model_id(protocol.model_id_from_headers(scope["headers"]))
    first_body, more_body = protocol.body_chunk(payload)
    if len(first_body) > max_body_bytes:
        raise ProtocolError("request body too large", status=413, error="BodyTooLarge")
    if more_body:
        await stream.send(protocol.ACCEPTED, {"inbox": inbox})
    bridge = HttpBridge(stream, first_body, more_body, from_caller, max_body_bytes, inbox, window)
    await servable.handle_http(scope, bridge.receive, bridge.send)
    await bridge.finish()
    if not stream.finished:
        await stream.error(500, "NoResponse", "the application returned without a response")


class WebSocketBridge:
    """ASGI receive/send for one `websocket` session: client frames come through the replica's
    inbox, the app's frames go out as reply events (docs/protocol.md, `websocket`)."""

    def __init__(self, stream: ReplyStream, from_caller: CallerMessages, inbox: str) -> None:
        self.stream = stream
        self._from_caller = from_caller
        self._inbox = inbox
        self._connected = False
        self.accepted = False

    async def receive(self) -> dict[str, Any]:
        if not self._connected:
            self._connected = True
            return {"type": "websocket.connect"}
        kind, fields = await self._from_caller.get()
        if kind == protocol.WS_RECEIVE:
            if fields.get("bytes") is not None:
                return {"type": "websocket.receive", "bytes": bytes(fields["bytes"])}
            return {"type": "websocket.receive", "text": str(fields.get("text", ""))}
        return {"type": "websocket.disconnect", "code": int(fields.get("code", 1000))}

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "websocket.accept":
            self.accepted = True
            self.stream.status = 101
            headers = [[bytes(k), bytes(v)] for k, v in message.get("headers") or ()]
            await self.stream.send(protocol.WS_ACCEPT, {
                "inbox": self._inbox, "subprotocol": message.get("subprotocol"),
                "headers": headers})
        elif kind == "websocket.send":
            data = message.get("bytes")
            fields = {"bytes": bytes(data)} if data is not None else {
                "text": message.get("text") or ""}
            await self.stream.send(protocol.WS_SEND, fields)
        elif kind == "websocket.close":
            if not self.accepted:
                self.stream.status = 403
            await self.stream.send(protocol.WS_CLOSE, {
                "code": int(message.get("code", 1000)), "reason": message.get("reason") or ""},
                final=True)


async def run_websocket(servable: Servable, stream: ReplyStream, payload: dict[str, Any],
                        from_caller: CallerMessages, inbox: str) -> None:
    scope = protocol.websocket_scope(payload)
    stream.http = ("WEBSOCKET", scope["path"])
    if servable.asgi_app is None:
        raise ProtocolError("WebSockets need an ASGI ingress (@serve.ingress with a FastAPI "
                            "or Starlette app)", status=404, error="NoSuchMethod")
    bridge = WebSocketBridge(stream, from_caller, inbox)
    await servable.run_asgi(scope, bridge.receive, bridge.send)
    if not stream.finished:  # the app returned without closing: close for it
        await stream.send(protocol.WS_CLOSE, {"code": 1000, "reason": ""}, final=True)


async def run_call(servable: Servable, stream: ReplyStream, payload: dict[str, Any],
                   secret: bytes) -> None:
    method = payload.get("method", "__call__")
    if not isinstance(method, str):
        raise ProtocolError("'method' must be a string")
    fn = servable._resolve(method)
    _web.set(False)
    stream.method = method  # only a method that exists: labels stay bounded
    multiplex._set_model_id(str(payload.get("multiplexed_model_id") or ""))
    try:
        args, kwargs = unpack_call(payload, secret)
    except TypeError as exc:
        raise ProtocolError(str(exc)) from exc
    result = await servable.call(fn, *args, **kwargs)
    if inspect.isasyncgen(result):
        async for item in result:
            await stream.send(protocol.RESULT, {**pack_value(item, secret), "more": True})
        await stream.send(protocol.RESULT, {"more": False}, final=True)
    elif inspect.isgenerator(result):
        sentinel = object()
        while (item := await servable.threads.run(next, result, sentinel)) is not sentinel:
            await stream.send(protocol.RESULT, {**pack_value(item, secret), "more": True})
        await stream.send(protocol.RESULT, {"more": False}, final=True)
    else:
        await stream.send(protocol.RESULT, {**pack_value(result, secret), "more": False},
                          final=True)


async def _within(step: Awaitable[None], timeout: float, what: str) -> None:
    try:
        await asyncio.wait_for(step, max(timeout, 0))
    except TimeoutError:
        log.warning("%s did not finish within the graceful shutdown timeout; cancelled", what)


def _takes_argument(fn: Callable[..., Any]) -> bool:
    """True if `fn` (a bound method or function) accepts the request as an argument."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        for p in parameters
    )
