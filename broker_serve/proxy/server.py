"""The proxy process: the `Proxy` ASGI app, wrapped in the user's middlewares, under uvicorn."""

from __future__ import annotations

from typing import Any

import uvicorn

from ..config import HTTPOptions
from ..http_server import HttpServer
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
    try:
        await server.serve()
    finally:
        await proxy.shutdown()
