"""The per-process client side of a cluster: one Redis client, one AMQP connection and one reply
queue, shared by every handle and by the serve API in this process.

In a driver script the runtime runs its own event loop in the thread of an anyio blocking
portal, so sync code (`serve.run`, `response.result()`) can use it. Inside a replica it shares
the replica's loop and broker connection, with a portal on that loop for sync methods, which run
in worker threads. A forked child does not inherit it: it starts its own on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, NamedTuple, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from ..config import is_bounded, is_durable, is_ordered
from ..credentials import cluster_secret
from ..exceptions import BrokerServeError, ClusterUnavailable
from ..observability import tracing
from ..settings import Settings
from ..state.store import Store
from ..transport.affinity import AffinityTable
from ..transport.broker import Broker, ReplyRouter, connection_name
from ..transport.cancellation import AbandonedRequests, cancel
from .job_defaults import JobDefaults

T = TypeVar("T")

DELIVERY_REFRESH_S = 10.0
START_TIMEOUT_S = 30.0

_lock = threading.Lock()
_runtime: Runtime | None = None
_portal_hosts: set[asyncio.Future[None]] = set()  # the loop keeps only weak references to tasks
_background: set[asyncio.Future[None]] = set()


class Delivery(NamedTuple):
    """How calls to one deployment are published (`Runtime.delivery`)."""

    bounded: bool  # max_queued_requests: confirmed, and refused when full
    durable: bool  # a quorum queue: persistent, confirmed, retried on another node
    ordered: bool  # order_by_deadline: a deadline gives a call without a priority its own


class Runtime:
    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop, portal: BlockingPortal,
                 broker: Broker | None = None) -> None:
        self.settings = settings
        self.loop = loop
        self.portal = portal  # runs coroutines on `loop` for other threads
        self.pid = os.getpid()
        self.process_id = f"{socket.gethostname()}-{os.getpid()}-{id(self) % 10000}"
        self.store = Store(settings.redis_url, settings.cluster, settings.client_tls())
        self.names = self.store.names
        self.broker = broker or Broker(
            settings.amqp_url, connection_name(settings.cluster, "client", self.process_id),
            cancel_exchange=self.names.cancel_exchange, tls=settings.client_tls())
        self._owns_broker = broker is None
        self.router = ReplyRouter(self.broker, self.names.reply_queue(f"client-{self.process_id}"),
                                  on_abandoned=AbandonedRequests(self.broker, self.store))
        # The operator's (credentials.py); b"" if none: then this process cannot sign.
        self.secret = b""
        self.affinity = AffinityTable()  # which replicas hold which multiplexed models
        self._ids = itertools.count()
        # The driver's portal thread, closed by reset_runtime; None inside a replica.
        self._portal_thread: contextlib.ExitStack | None = None
        self._delivery: dict[tuple[str, str], tuple[float, Delivery]] = {}
        self.job_defaults = JobDefaults(self.store)

    async def start(self) -> None:
        self.secret = cluster_secret(self.settings)
        await self.store.ping()
        if self._owns_broker:
            await self.broker.connect()
        await self.router.start()

    async def stop(self) -> None:
        try:
            if self._owns_broker:
                await asyncio.wait_for(self.broker.close(), 5)
        except (BrokerServeError, TimeoutError):
            pass  # the broker is away: the process is leaving anyway
        finally:
            await self.store.close()

    async def delivery(self, app: str, deployment: str) -> Delivery:
        """How calls to the deployment are published, read from its app record at most every
        10 s per deployment, so calls pay for publisher confirms only where needed."""
        key = (app, deployment)
        cached = self._delivery.get(key)
        now = self.loop.time()
        if cached is not None and now - cached[0] < DELIVERY_REFRESH_S:
            return cached[1]
        record = await self.store.app(app)
        entry = record["deployments"].get(deployment) if record else None
        config = entry["config"] if entry else {}
        delivery = Delivery(is_bounded(config), is_durable(config), is_ordered(config))
        self._delivery[key] = (now, delivery)
        return delivery

    def forget_delivery(self, app: str) -> None:
        """Drop what `delivery` read of an app's deployments: this process deployed it again,
        and its own calls must follow the new config at once."""
        for key in [key for key in self._delivery if key[0] == app]:
            del self._delivery[key]

    async def ingress_of(self, app: str) -> str:
        record = await self.store.app(app)
        if record is None:
            raise ValueError(f"no application named {app!r}")
        return str(record["ingress"])

    def cancel_requests(self, ids: list[str]) -> None:
        """Cancel calls wherever their callees run or wait, in the background."""
        task = asyncio.ensure_future(cancel(self.broker, self.store, ids))
        _background.add(task)
        task.add_done_callback(_background.discard)

    def refuse_unsupported(self, what: str) -> None:
        """Raise if this runtime cannot do `what`; the cluster's runtime does everything
        (local testing mode's does not)."""

    def next_request_id(self) -> str:
        return f"{self.process_id}-{next(self._ids)}"

    def in_loop_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the runtime's loop from another thread and wait for it. After
        `timeout` seconds it raises TimeoutError, and `coro` goes on running."""
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError(
                "This is a blocking call and cannot run inside the event loop; use `await`."
            )
        done: Future[T] = self.portal.start_task_soon(_awaited, coro)
        return done.result(timeout)


async def _awaited(coro: Coroutine[Any, Any, T]) -> T:
    return await coro


RuntimeFactory = Callable[[Settings, asyncio.AbstractEventLoop, BlockingPortal], Runtime]


def get_runtime(settings: Settings | None = None, make: RuntimeFactory = Runtime) -> Runtime:
    """The runtime of this process, started on first use (made by `make`, with its own loop
    in a portal's thread)."""
    global _runtime
    with _lock:
        runtime = current_runtime()
        if runtime is not None:
            return runtime
        tracing.setup("driver")  # a driver's handle calls are traced too, if OTEL_* say so
        settings = settings or Settings.from_env()
        portal_thread = contextlib.ExitStack()
        portal = portal_thread.enter_context(start_blocking_portal())
        try:
            runtime = make(settings, portal.call(asyncio.get_running_loop), portal)
            portal.start_task_soon(runtime.start).result(START_TIMEOUT_S)
        except TimeoutError:
            _close_portal(portal, portal_thread)
            raise ClusterUnavailable(
                f"RabbitMQ or Redis did not answer within {START_TIMEOUT_S:.0f}s (see "
                "BROKER_SERVE_AMQP_URL and BROKER_SERVE_REDIS_URL)") from None
        except BaseException:
            _close_portal(portal, portal_thread)
            raise
        runtime._portal_thread = portal_thread
        _runtime = runtime
        return runtime


async def install_replica_runtime(settings: Settings, broker: Broker) -> Runtime:
    """Inside a replica: share its loop and connection."""
    global _runtime
    runtime = Runtime(settings, asyncio.get_running_loop(), await _portal_on_this_loop(), broker)
    await runtime.start()
    _runtime = runtime
    return runtime


async def _portal_on_this_loop() -> BlockingPortal:
    """A portal into the running loop, hosted by a task of its own that lasts as long as the
    loop does (a portal's task group must be left by the task that entered it)."""
    opened: asyncio.Future[BlockingPortal] = asyncio.get_running_loop().create_future()

    async def host() -> None:
        async with BlockingPortal() as portal:
            opened.set_result(portal)
            await portal.sleep_until_stopped()

    _portal_hosts.add(asyncio.ensure_future(host()))
    return await opened


def current_runtime() -> Runtime | None:
    """This process's runtime; one a forked child inherited does not count."""
    runtime = _runtime
    return runtime if runtime is not None and runtime.pid == os.getpid() else None


def reset_runtime() -> None:
    """Stop and forget this process's runtime (serve.shutdown, tests)."""
    global _runtime
    with _lock:
        runtime, _runtime = current_runtime(), None
    if runtime is None or runtime._portal_thread is None:
        return
    try:
        runtime.portal.start_task_soon(runtime.stop).result(10)
    finally:
        _close_portal(runtime.portal, runtime._portal_thread)


def _close_portal(portal: BlockingPortal, portal_thread: contextlib.ExitStack) -> None:
    """Stop the portal's loop, cancelling what still runs there (a call whose result() timed
    out, say), and join its thread."""
    try:
        portal.call(portal.stop, True)
    finally:
        portal_thread.close()
