"""The proxy's limits on what a client sends (docs/architecture.md, "Limits on untrusted
input"): headers per request and their bytes, and requests in flight. Each refusal is counted
by its reason in `broker_serve_proxy_refused_requests_total`.

The checks on the request path are in `Proxy._forward`, a few integer comparisons; what is
here runs only to refuse, or for the paths off the request path.
"""

from __future__ import annotations

from typing import Any

from ..config import HTTPOptions
from ..observability.metrics import ProxyMetrics

__all__ = ["Limits", "Refusal", "refuse_websocket"]

# An answer given at once: status, text, extra headers.
Refusal = tuple[int, str, list[tuple[bytes, bytes]]]
RETRY_AFTER = [(b"retry-after", b"1")]


class Limits:
    def __init__(self, options: HTTPOptions, metrics: ProxyMetrics) -> None:
        self.header_count = options.max_header_count
        self.header_bytes = options.max_header_bytes
        self.inflight = options.max_inflight_requests
        self.metrics = metrics

    def of_headers(self, headers: list[tuple[bytes, bytes]]) -> Refusal | None:
        """431 if the request has more headers, or more bytes of them, than the limits."""
        if len(headers) > self.header_count:
            return self.too_many_headers(len(headers))
        size = sum(len(name) + len(value) for name, value in headers)
        return self.headers_too_large(size) if size > self.header_bytes else None

    def too_many_headers(self, count: int) -> Refusal:
        self.metrics.refused("too_many_headers")
        return 431, (f"Request Header Fields Too Large: {count} headers, over the limit of "
                     f"{self.header_count} (max_header_count)."), []

    def headers_too_large(self, size: int) -> Refusal:
        self.metrics.refused("headers_too_large")
        return 431, (f"Request Header Fields Too Large: {size} bytes of headers, over the "
                     f"limit of {self.header_bytes} (max_header_bytes)."), []

    def too_many_inflight(self) -> Refusal:
        self.metrics.refused("too_many_inflight")
        return 503, (f"Service Unavailable: this proxy has its limit of {self.inflight} "
                     "requests in flight (max_inflight_requests); retry later."), RETRY_AFTER


async def refuse_websocket(scope: dict[str, Any], send: Any, refusal: Refusal) -> None:
    """Refuse a WebSocket handshake with an HTTP response where the server can send one
    (ASGI's `websocket.http.response` extension, which uvicorn has); else close it (403)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    status, text, headers = refusal
    body = text.encode()
    await send({"type": "websocket.http.response.start", "status": status, "headers": [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "websocket.http.response.body", "body": body})
