"""The proxy process: the `Proxy` ASGI app, wrapped in the user's middlewares, under uvicorn."""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn

from ..config import HTTPOptions
from ..http_server import HttpServer
from ..observability.history import HistoryWriter, Key
from ..settings import Settings
from .http import Proxy


def with_middlewares(app: Any, options: HTTPOptions) -> Any:
    """The proxy wrapped in the user's Starlette middlewares, the first one outermost."""
    for spec in reversed(options.middlewares):
        try:
            middleware = spec.load()
        except (ImportError, AttributeError) as exc:
            raise RuntimeError(f"cannot import middleware {spec.import_path!r}: {exc}") from exc
        app = middleware(app, *spec.args, **spec.kwargs)
    return app


def resolve_keep_alive(settings: Settings, options: HTTPOptions) -> float:
    """`BROKER_SERVE_HTTP_KEEP_ALIVE_TIMEOUT_S` wins over the config, as Ray's variable does."""
    if settings.http_keep_alive_timeout_s is not None:
        return settings.http_keep_alive_timeout_s
    return options.keep_alive_timeout_s


async def serve_proxy(settings: Settings, options: HTTPOptions) -> None:
    proxy = Proxy(settings, options)
    await proxy.startup()
    config = uvicorn.Config(
        with_middlewares(proxy, options), host=options.host, port=options.port, loop="none",
        http="httptools",
        lifespan="off", access_log=False, log_level="warning",
        log_config=None,  # uvicorn's records go through our handler and format
        timeout_keep_alive=resolve_keep_alive(settings, options),  # type: ignore[arg-type]
        timeout_graceful_shutdown=30,
    )
    server = HttpServer(config)
    # Ours, not uvicorn's: uvicorn's would kill the process before proxy.shutdown() ran.
    server.stop_on_signals()
    history = proxy_history(proxy, settings)
    served = asyncio.Event()
    writing = asyncio.create_task(history.run(served))
    try:
        await server.serve()
    finally:
        served.set()
        try:
            await writing
            await history.write()  # the requests of the last interval, drained ones included
        finally:
            await proxy.shutdown()


def proxy_history(proxy: Proxy, settings: Settings) -> HistoryWriter:
    """The proxy's rows of the metrics history: per endpoint (a traffic record's name, else
    the route prefix) and application, read from its own latency histograms."""
    def endpoint(key: Key) -> Key | None:
        application, route = key
        if not route:  # no route matched: no endpoint
            return None
        entry = proxy.table.routes.get(route) or {}
        return str(entry.get("endpoint") or route), application

    return HistoryWriter(proxy.store, settings, f"proxy-{proxy.proxy_id}", "endpoints",
                         proxy.metrics.latency_totals, endpoint)
