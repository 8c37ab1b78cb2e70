"""The per-process client side of a cluster: one Redis client, one AMQP connection and one reply
queue, shared by every handle and by the serve API in this process.

In a driver script the runtime runs its own event loop in a daemon thread, so sync code
(`serve.run`, `response.result()`) can use it. Inside a replica it shares the replica's loop and
broker connection.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..settings import Settings
from ..state.store import Store
from ..transport.affinity import AffinityTable
from ..transport.broker import Broker, ReplyRouter, connection_name

T = TypeVar("T")

BOUNDED_REFRESH_S = 10.0

_lock = threading.Lock()
_runtime: Runtime | None = None


class Runtime:
    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop,
                 broker: Broker | None = None) -> None:
        self.settings = settings
        self.loop = loop
        self.process_id = f"{socket.gethostname()}-{os.getpid()}-{id(self) % 10000}"
        self.store = Store(settings.redis_url, settings.cluster)
        self.names = self.store.names
        self.broker = broker or Broker(
            settings.amqp_url, connection_name(settings.cluster, "client", self.process_id),
            cancel_exchange=self.names.cancel_exchange)
        self._owns_broker = broker is None
        self.router = ReplyRouter(self.broker, self.names.reply_queue(f"client-{self.process_id}"))
        self.secret = b""
        self.affinity = AffinityTable()  # which replicas hold which multiplexed models
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._bounded: dict[tuple[str, str], tuple[float, bool]] = {}

    async def start(self) -> None:
        await self.store.ping()
        self.secret = await self.store.secret()
        if self._owns_broker:
            await self.broker.connect()
        await self.router.start()

    async def stop(self) -> None:
        try:
            if self._owns_broker:
                await asyncio.wait_for(self.broker.close(), 5)
        except Exception:
            pass  # the broker is away: the process is leaving anyway
        finally:
            await self.store.close()

    async def is_bounded(self, app: str, deployment: str) -> bool:
        """Whether the deployment has max_queued_requests, read from its app record at most
        every 10 s per deployment, so calls pay for publisher confirms only where needed."""
        key = (app, deployment)
        cached = self._bounded.get(key)
        now = self.loop.time()
        if cached is not None and now - cached[0] < BOUNDED_REFRESH_S:
            return cached[1]
        record = await self.store.get_one(self.names.apps, app) or {}
        config = record.get("deployments", {}).get(deployment, {}).get("config", {})
        bounded = int(config.get("max_queued_requests", -1)) > 0
        self._bounded[key] = (now, bounded)
        return bounded

    async def ingress_of(self, app: str) -> str:
        record = await self.store.get_one(self.names.apps, app)
        if record is None:
            raise ValueError(f"no application named {app!r}")
        return str(record["ingress"])

    def next_request_id(self) -> str:
        return f"{self.process_id}-{next(self._ids)}"

    def in_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the runtime's loop from another thread and wait for it."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError(
                "This is a blocking call and cannot run inside the event loop; use `await`."
            )
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def get_runtime(settings: Settings | None = None) -> Runtime:
    """The runtime of this process, started on first use."""
    global _runtime
    with _lock:
        if _runtime is not None:
            return _runtime
        settings = settings or Settings.from_env()
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="broker-serve-client", daemon=True)
        thread.start()
        runtime = Runtime(settings, loop)
        try:
            asyncio.run_coroutine_threadsafe(runtime.start(), loop).result(30)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            raise
        runtime._thread = thread
        _runtime = runtime
        return runtime


async def install_replica_runtime(settings: Settings, broker: Broker) -> Runtime:
    """Inside a replica: share its loop and connection."""
    global _runtime
    runtime = Runtime(settings, asyncio.get_running_loop(), broker)
    await runtime.start()
    _runtime = runtime
    return runtime


def current_runtime() -> Runtime | None:
    return _runtime


def reset_runtime() -> None:
    """Stop and forget this process's runtime (serve.shutdown, tests)."""
    global _runtime
    with _lock:
        runtime, _runtime = _runtime, None
    if runtime is None or runtime._thread is None:
        return
    try:
        asyncio.run_coroutine_threadsafe(runtime.stop(), runtime.loop).result(10)
    finally:
        runtime.loop.call_soon_threadsafe(runtime.loop.stop)
        runtime._thread.join(5)
