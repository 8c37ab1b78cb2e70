"""The proxy process: the `Proxy` ASGI app, wrapped in the user's middlewares, under uvicorn."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from typing import TYPE_CHECKING, Any

import uvicorn

from ..config import HTTPOptions, gRPCOptions
from ..credentials import cluster_secret
from ..exceptions import BrokerServeError, ClusterSecretMissing, UntrustedPayload
from ..http_server import HttpServer
from ..observability import tracing
from ..observability.history import HistoryWriter, Key
from ..settings import Settings
from .http import ROUTE_REFRESH_S, Proxy

if TYPE_CHECKING:
    from .grpc_server import GrpcIngress

log = logging.getLogger("broker_serve.proxy.server")


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
    tracing.setup("proxy", proxy.proxy_id)
    await proxy.startup()
    config = uvicorn.Config(
        with_middlewares(proxy, options), host=options.host, port=options.port, loop="none",
        http="httptools",
        lifespan="off", access_log=False, log_level="warning",
        log_config=None,  # uvicorn's records go through our handler and format
        timeout_keep_alive=resolve_keep_alive(settings, options),  # type: ignore[arg-type]
        # A larger client message closes its session with 1009 (docs/architecture.md,
        # "Limits on untrusted input").
        ws_max_size=options.max_websocket_message_bytes,
        timeout_graceful_shutdown=30,
        # HTTPS with BROKER_SERVE_HTTPS_CERT_FILE (docs/security.md, "TLS").
        **settings.server_tls().uvicorn_options(),
    )
    server = HttpServer(config)
    # Ours, not uvicorn's: uvicorn's would kill the process before proxy.shutdown() ran.
    server.stop_on_signals()
    history = proxy_history(proxy, settings)
    served = asyncio.Event()
    writing = asyncio.create_task(history.run(served))
    grpc = GrpcSupervisor(proxy, options.host)
    watching = asyncio.create_task(grpc.run(served))
    try:
        await server.serve()
    finally:
        served.set()
        try:
            await writing
            await watching
            await history.write()  # the requests of the last interval, drained ones included
        finally:
            await proxy.shutdown()


class GrpcSupervisor:
    """Runs the proxy's gRPC server while the cluster's grpc_options enable it, and starts it
    again on other options: `serve.start` or a config file may set them after the proxy
    started. Reads them every ROUTE_REFRESH_S, off the request path."""

    def __init__(self, proxy: Proxy, host: str) -> None:
        self.proxy = proxy
        self.host = host
        self.options: tuple[gRPCOptions, list[str]] | None = None  # and their sys_path
        self.ingress: GrpcIngress | None = None
        self._secret: bytes | None = None  # read when gRPC options first appear
        self._refusal: str | None = None  # the last one logged, so it is logged once

    async def run(self, stopped: asyncio.Event) -> None:
        try:
            while not stopped.is_set():
                await self._apply()
                try:
                    await asyncio.wait_for(stopped.wait(), ROUTE_REFRESH_S)
                except TimeoutError:
                    pass
        finally:
            await self._stop()

    async def _apply(self) -> None:
        try:
            stored = await self.proxy.store.grpc_options_and_paths(self._cluster_secret())
        except (UntrustedPayload, ClusterSecretMissing) as exc:
            # Nothing of them is imported, and no port serves what someone else chose.
            await self._stop()
            self.options = None
            if str(exc) != self._refusal:
                log.error("not serving gRPC: %s", exc)
                self._refusal = str(exc)
            return
        except BrokerServeError as exc:  # keep serving with the options it has
            log.warning("could not read the gRPC options: %s", exc)
            return
        self._refusal = None
        if stored == self.options:
            return
        await self._stop()
        self.options = stored
        if stored is None or not stored[0].enabled:
            return
        options, paths = stored
        add_import_paths(paths)
        try:
            from .grpc_server import GrpcIngress
        except ImportError as exc:
            log.error("grpc_options name servicer functions but grpcio is not installed "
                      "(pip install 'broker-serve[grpc]'): %s", exc)
            return
        try:
            ingress = GrpcIngress(self.proxy, options, self.host)
            await ingress.start()
        except (ValueError, RuntimeError) as exc:  # a bad servicer function or a busy port
            log.error("not serving gRPC: %s", exc)
            return
        self.ingress = ingress

    def _cluster_secret(self) -> bytes:
        """The proxy verifies the stored options with it before it imports what they name
        (docs/architecture.md, "Trust"). Read once."""
        if self._secret is None:
            self._secret = cluster_secret(self.proxy.settings)
        return self._secret

    async def _stop(self) -> None:
        ingress, self.ingress = self.ingress, None
        if ingress is not None:
            await ingress.stop()


def add_import_paths(paths: list[str]) -> None:
    """Let the servicer functions' `*_pb2_grpc` modules import from the directories the
    replicas import the application from. Appended: the proxy's own modules still win."""
    for path in paths:
        if path not in sys.path:
            sys.path.append(path)
    importlib.invalidate_caches()  # a directory made after the last import is searched too


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
