"""Wire protocol v1: the request and reply messages of docs/protocol.md.

This module only encodes and validates. It knows nothing of connections, so every caller (proxy,
handle, tests) and the replica share one definition of the format.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack

from ..exceptions import ProtocolError

VERSION = 1
CONTENT_TYPE = "application/msgpack"
HEADER_VERSION = "bs-version"
HEADER_DEADLINE = "bs-deadline"
# Optional: when the caller published the request (Unix time in microseconds), for the replica's
# queue-wait metric; and the id of the client request it serves, for joining log lines.
HEADER_PUBLISHED = "bs-published-us"
HEADER_REQUEST_ID = "bs-request-id"
# W3C Trace Context of the publisher's span, set only where tracing is on
# (observability/otel.py writes and reads them).
HEADER_TRACEPARENT = "traceparent"
HEADER_TRACESTATE = "tracestate"

# Request kinds (the AMQP `type` property of a request message).
KIND_HTTP = "http"
KIND_CALL = "call"
KIND_WEBSOCKET = "websocket"
KIND_GRPC = "grpc"

# Reply events (the AMQP `type` property of a reply message).
ACCEPTED = "accepted"
START = "start"
BODY = "body"
RESULT = "result"
ERROR = "error"

# WebSocket sessions: replica -> caller, then caller -> replica inbox.
WS_ACCEPT = "ws.accept"
WS_SEND = "ws.send"
WS_CLOSE = "ws.close"
WS_RECEIVE = "ws.receive"
WS_DISCONNECT = "ws.disconnect"

# Caller -> replica inbox messages.
DISCONNECT = "disconnect"
CREDIT = "credit"

# Caller -> every replica, on the cancel fanout exchange.
CANCEL = "cancel"

MAX_ID_LENGTH = 128

# The HTTP header that names a multiplexed model, as in Ray Serve.
MODEL_ID_HTTP_HEADER = b"serve_multiplexed_model_id"


def model_id_from_headers(headers: list[tuple[bytes, bytes]]) -> str:
    """The multiplexed model an HTTP request names, or ""."""
    for name, value in headers:
        if name == MODEL_ID_HTTP_HEADER:
            return value.decode("latin-1")
    return ""


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False)
    # msgpack's own errors and ValueError (incomplete input, a non-string map key, bad
    # UTF-8); TypeError for what its C unpacker cannot build.
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise ProtocolError(f"body is not valid msgpack: {exc}") from exc


def request_headers(deadline_ms: int | None = None, *, published_us: int | None = None,
                    request_id: str | None = None) -> dict[str, Any]:
    headers: dict[str, Any] = {HEADER_VERSION: VERSION}
    if deadline_ms is not None:
        headers[HEADER_DEADLINE] = deadline_ms
    if published_us is not None:
        headers[HEADER_PUBLISHED] = published_us
    if request_id:
        headers[HEADER_REQUEST_ID] = request_id
    return headers


def now_us() -> int:
    """The `bs-published-us` of a request published now."""
    return time.time_ns() // 1000


def check_version(headers: dict[str, Any] | None) -> None:
    version = (headers or {}).get(HEADER_VERSION)
    if version != VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version!r}; this replica speaks {VERSION}",
            error="UnsupportedProtocolVersion",
        )


def decode_map(body: bytes) -> dict[str, Any]:
    value = unpack(body)
    if not isinstance(value, dict):
        raise ProtocolError(f"body must be a msgpack map, got {type(value).__name__}")
    return value


def http_scope(payload: dict[str, Any]) -> dict[str, Any]:
    """Build a complete ASGI HTTP scope from a request's `scope` map, with the defaults."""
    raw = payload.get("scope")
    if not isinstance(raw, dict):
        raise ProtocolError("http request needs a 'scope' map")
    method, path = raw.get("method"), raw.get("path")
    if not isinstance(method, str) or not isinstance(path, str) or not path.startswith("/"):
        raise ProtocolError("scope needs a 'method' string and a 'path' starting with '/'")
    query = raw.get("query_string", b"")
    if isinstance(query, str):
        query = query.encode("latin-1")
    try:
        headers = [(_as_bytes(k).lower(), _as_bytes(v)) for k, v in raw.get("headers") or ()]
    except (TypeError, ValueError) as exc:
        raise ProtocolError("scope 'headers' must be a list of [name, value] pairs") from exc
    client, server = raw.get("client"), raw.get("server")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": raw.get("http_version", "1.1"),
        "method": method.upper(),
        "scheme": raw.get("scheme", "http"),
        "path": path,
        "raw_path": _as_bytes(raw.get("raw_path", path.encode("utf-8"))),
        "query_string": query,
        "root_path": raw.get("root_path", ""),
        "headers": headers,
        "client": tuple(client) if client else None,
        "server": tuple(server) if server else None,
        "state": {},
    }


def websocket_scope(payload: dict[str, Any]) -> dict[str, Any]:
    """An ASGI WebSocket scope from a `websocket` request's `scope` map."""
    raw = payload.get("scope")
    if isinstance(raw, dict):
        raw = {"method": "GET", **raw}
    scope = http_scope({"scope": raw})
    del scope["method"]
    scope.update(type="websocket", scheme={"https": "wss"}.get(scope["scheme"], "ws"),
                 subprotocols=list(raw.get("subprotocols") or ()) if raw else [])
    return scope


def body_chunk(payload: dict[str, Any]) -> tuple[bytes, bool]:
    body = payload.get("body", b"")
    if not isinstance(body, (bytes, bytearray)):
        raise ProtocolError("'body' must be bytes (msgpack bin)")
    return bytes(body), bool(payload.get("more_body", False))


def body_events(chunks: list[bytes], more_body: bool, limit: int) -> list[dict[str, Any]]:
    """The `body`/`more_body`/`chunk_sizes` fields of the reply events that carry `chunks` (the
    app's chunks, in order, none empty): whole chunks share an event up to `limit` bytes, and a
    chunk larger than that is cut into pieces of `limit` (docs/protocol.md, "Chunking")."""
    if sum(map(len, chunks)) <= limit:  # the usual case: what one flush holds fits in one event
        groups = [chunks]
    else:
        groups = _group(chunks, limit)
    events: list[dict[str, Any]] = []
    for group in groups:
        fields: dict[str, Any] = {"body": b"".join(group) if len(group) != 1 else group[0],
                                  "more_body": True}
        if len(group) > 1:
            fields["chunk_sizes"] = list(map(len, group))
        events.append(fields)
    events[-1]["more_body"] = more_body
    return events


def _group(chunks: list[bytes], limit: int) -> list[list[bytes]]:
    groups: list[list[bytes]] = [[]]
    size = 0
    for chunk in chunks:
        pieces = [chunk[i:i + limit] for i in range(0, len(chunk), limit)] \
            if len(chunk) > limit else (chunk,)
        for piece in pieces:
            if size + len(piece) > limit and groups[-1]:
                groups.append([])
                size = 0
            groups[-1].append(piece)
            size += len(piece)
    return groups


def body_chunks(event: dict[str, Any]) -> list[bytes]:
    """The app's chunks a `start` or `body` reply event carries: `body` cut at `chunk_sizes`."""
    body = event.get("body", b"")
    sizes = event.get("chunk_sizes")
    if not isinstance(body, bytes):
        raise ProtocolError("'body' must be bytes (msgpack bin)")
    if sizes is None:
        return [body] if body else []
    if not isinstance(sizes, list):
        raise ProtocolError("'chunk_sizes' must be an array of positive integers")
    chunks, start = [], 0
    for size in sizes:
        if type(size) is not int or size <= 0:
            raise ProtocolError("'chunk_sizes' must be an array of positive integers")
        chunks.append(body[start:start + size])
        start += size
    if start != len(body):
        raise ProtocolError(f"'chunk_sizes' add up to {start} bytes but 'body' has {len(body)}")
    return chunks


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("latin-1")
    raise TypeError(f"expected bytes or str, got {type(value).__name__}")
