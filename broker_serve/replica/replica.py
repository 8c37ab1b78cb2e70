"""A replica: one OS process that runs one deployment instance and consumes its queue.

Lifecycle: `startup` loads the signed definition from Redis, constructs the user's object and
runs its ingress app's startup hooks, then consumes the deployment's queue with prefetch =
max_ongoing_requests. `main_loop` keeps the heartbeat. `shutdown` (on SIGTERM) stops consuming,
lets in-flight requests finish, runs the shutdown hooks and `__del__` (all within
`graceful_shutdown_timeout_s`), and closes the connection, so RabbitMQ requeues whatever is left.

Message policy: a request is acked once its terminal event is published. A message without
`reply_to` cannot be answered and is rejected without requeue, which dead-letters it. Acks and
rejects of one channel go out in order through its `Settler` (`_acks.py`).

Poison requests: a request whose replicas died with it three times is answered 502 on its 4th
delivery and dead-lettered. Only deaths count. A live replica that loses a channel, or stops
before finishing a request, writes down the requests it released, and their redeliveries are
not counted against them (`deliveries.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

import aiormq
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from tenacity import AsyncRetrying, retry_if_result, stop_after_delay, wait_fixed

from ..client.handle import calls_of_current_request
from ..client.runtime import install_replica_runtime
from ..config import LIVE_OPTIONS, DeploymentConfig, user_config_hash
from ..context import ReplicaContext, _request_id, _set_replica_context
from ..credentials import HOW_TO_SET, cluster_secret
from ..exceptions import BrokerServeError, ClusterSecretMissing, ProtocolError, UntrustedPayload
from ..lifecycle import die_with_parent_if_asked, heartbeat_loop, sleep_or_stop, stop_on_signals
from ..observability import metrics, tracing
from ..observability.entry_point import run_entry_point
from ..observability.history import HistoryWriter
from ..observability.logging import AccessLog, setup_logging
from ..protocol import jobs
from ..protocol import messages as protocol
from ..protocol.call_values import loads_signed
from ..schema import ReplicaState
from ..settings import Settings
from ..state.records import ReplicaEndState, ReplicaRecordState
from ..state.store import Store, now
from ..transport import affinity
from ..transport.acks import Settler
from ..transport.broker import Broker, DeliveryCallback, Subscription, connection_name, subscribe
from ..transport.cancellation import CancelledSet
from ..transport.errors import map_amqp_errors
from . import ingress, multiplex
from .deliveries import MAX_DELIVERIES, DeliveryJournal
from .execution import (
    CallerMessages,
    FlowWindow,
    ReplyStream,
    Servable,
    construct,
    run_attempt,
    run_call,
    run_http,
    run_websocket,
    within_deadline,
)
from .grpc_call import GrpcResolver, run_grpc
from .jobs import JobRunner
from .threads import ThreadRunner

if TYPE_CHECKING:
    from ..observability.otel import Traces

log = logging.getLogger("broker_serve.replica.replica")

HEARTBEAT_INTERVAL_S = 2.0
CONFIG_REFRESH_S = 5.0
# Shutdown hooks and __del__ get this long even when requests used the whole grace period; the
# node's SIGKILL comes 5 s after it.
MIN_USER_SHUTDOWN_S = 1.0


class Replica:
    def __init__(self, settings: Settings, app: str, deployment: str, replica_id: str,
                 version: str) -> None:
        self.settings = settings
        self.app = app
        self.deployment = deployment
        self.replica_id = replica_id
        self.version = version
        self.store = Store(settings.redis_url, settings.cluster, settings.client_tls())
        self.names = self.store.names
        self.broker = Broker(settings.amqp_url,
                             connection_name(settings.cluster, "replica", replica_id),
                             cancel_exchange=self.names.cancel_exchange,
                             tls=settings.client_tls())
        self.inbox_name = self.names.inbox(replica_id)
        self.max_message_bytes = settings.max_message_bytes
        self._request_queue = self.names.request_queue(app, deployment)
        self.servable: Servable | None = None
        self.config = DeploymentConfig()
        self.user_config_hash = ""
        self._reconfiguring = asyncio.Lock()
        self.secret = b""
        self._caller_messages: dict[str, CallerMessages] = {}  # by correlation id
        self._tasks: set[asyncio.Task[None]] = set()
        self._tasks_aside: set[asyncio.Future[None]] = set()  # not requests: not waited for
        self._settler: Settler | None = None  # of the request channel now open
        self.deliveries = DeliveryJournal(self.store)
        self._cancelled = CancelledSet()
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._cancelling: set[str] = set()
        self._cancel_queue: Any = None
        self._windows: dict[str, FlowWindow] = {}
        self._stopping = asyncio.Event()
        self._consumers: list[Subscription] = []
        self._inbox: Any = None
        self._affinity_queue: Any = None
        # For a multiplexed class: adds what the replica holds to a request's first reply event.
        self._advertise_models: Any = None
        self.grpc = GrpcResolver()  # filled at startup, imported on the first gRPC request
        self.jobs = JobRunner(
            self.store.jobs, self.broker, replica_id, self.names.request_queue(app, deployment),
            self.names.dead_letters, settings.max_body_bytes, self._run_attempt,
            self._cancelled.__contains__, self._cancellable)
        self.metrics = metrics.ReplicaMetrics(app, deployment, replica_id)
        self.history = HistoryWriter(self.store, settings, replica_id, "backends",
                                     self.metrics.processing_totals)
        self.access = AccessLog(functools.partial(_access_text, f"{app}/{deployment}"),
                                functools.partial(_access_fields, app, deployment, replica_id))

    # lifecycle ---------------------------------------------------------------------------------
    async def run(self) -> int:
        stop_on_signals(self._stopping)
        try:
            await self.startup()
        except Exception as exc:  # noqa: BLE001 - user constructors may raise anything
            log.error("replica %s failed to start:\n%s", self.replica_id, traceback.format_exc())
            await self._report_failure(exc)
            return 1
        try:
            await self.main_loop()
        finally:
            await self.shutdown()
        return 0

    async def _load_grpc_options(self) -> None:
        """The cluster's servicer functions, if their record verifies: it names modules this
        replica would import (docs/architecture.md, "Trust")."""
        try:
            stored = await self.store.grpc_options_and_paths(self.secret)
        except UntrustedPayload as exc:
            log.error("replica %s serves no gRPC: %s", self.replica_id, exc)
            self.grpc.refused = str(exc)
            return
        if stored is not None:
            self.grpc.servicer_functions = list(stored[0].grpc_servicer_functions)

    async def startup(self) -> None:
        await self.store.ping()
        await self._write_record(ReplicaState.STARTING)
        self.secret = cluster_secret(self.settings)
        if not self.secret:
            raise ClusterSecretMissing("this replica has no cluster secret to verify its "
                                       f"deployment's definition with: {HOW_TO_SET}")
        await self._load_grpc_options()
        spec_blob = await self.store.spec(self.app, self.deployment, self.version)
        if spec_blob is None:
            raise RuntimeError(f"no definition stored for {self.app}/{self.deployment} "
                               f"version {self.version}")
        spec = protocol.unpack(spec_blob)
        for path in reversed(spec.get("sys_path", [])):
            if path not in sys.path:
                sys.path.insert(0, path)
        definition = loads_signed(spec["pickled"], spec["sig"], self.secret,
                                  "the deployment's definition")
        # The live options come from the app record: they change without a new version.
        self.config = DeploymentConfig.model_validate(
            {**definition["config"], **await self._live_options()})
        self.user_config_hash = user_config_hash(self.config.model_dump(mode="json")["user_config"])
        metrics.set_replica_metrics(self.metrics)  # for @serve.batch and @serve.multiplexed
        threads = max(4, self.config.max_ongoing_requests)
        # Requests' sync code runs in the ThreadRunner; lifecycle calls (reconfigure,
        # check_health) and the user's own asyncio.to_thread in the default executor.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=threads, thread_name_prefix="user-lifecycle"))
        self.broker.on_channel_lost(self.metrics.channels_lost.inc)
        await self.broker.connect()
        # Before the constructor: handles passed to it, or made in it, must work.
        await install_replica_runtime(self.settings, self.broker)
        self.servable = await self._construct(definition, ThreadRunner(threads))

        inbox_channel = await self.broker.channel()
        with map_amqp_errors(f"cannot declare {self.inbox_name}"):
            # Held strongly: aio-pika re-declares it after a reconnect.
            self._inbox = await inbox_channel.declare_queue(self.inbox_name, exclusive=True,
                                                            auto_delete=True)
        await subscribe(self.broker, inbox_channel, self.inbox_name, self._on_inbox,
                        no_ack=True)
        # Cancellations: the live tombstones first, then the broadcast, before any request.
        await self._cancelled.load(self.store)
        cancel_queue = self.names.cancel_queue(self.replica_id)
        with map_amqp_errors(f"cannot declare {cancel_queue}"):
            self._cancel_queue = await inbox_channel.declare_queue(
                cancel_queue, exclusive=True, auto_delete=True)
            await self._cancel_queue.bind(self.names.cancel_exchange)
        await subscribe(self.broker, inbox_channel, cancel_queue, self._on_cancel, no_ack=True)
        await self._consume_requests()
        await self._write_record(ReplicaState.RUNNING)
        await self.store.announce("replicas")
        log.info("replica %s of %s/%s is running (pid %d)", self.replica_id, self.app,
                 self.deployment, os.getpid())

    async def _consume_requests(self) -> None:
        """Consume the deployment's queue with prefetch = max_ongoing_requests.

        Model affinity (docs/architecture.md): a multiplexed replica also consumes its own
        queue, on the same channel and within one channel-wide prefetch, so it still runs at
        most max_ongoing_requests."""
        assert self.servable is not None
        capacity = self.config.max_ongoing_requests
        queue = self.names.request_queue(self.app, self.deployment)
        if not await self._live_options():
            raise RuntimeError(f"application {self.app!r} was deleted while this replica "
                               "started")
        # A durable deployment has no affinity queue (docs/architecture.md, "Durable mode"):
        # it would live on one RabbitMQ node, which a quorum queue is there not to depend on.
        affine = (not self.servable.is_function and self.config.queue_type != "quorum"
                  and multiplex.is_multiplexed(type(self.servable.target)))
        channel = await self.broker.channel(prefetch=capacity, global_qos=affine)
        with map_amqp_errors(f"cannot consume {queue}"):
            await channel.declare_queue(queue, passive=True)  # a clear error if it is missing
        queues = [queue]
        if affine:
            name = self.names.affinity_queue(self.replica_id)
            with map_amqp_errors(f"cannot declare {name}"):
                # Held strongly: aio-pika re-declares it after a reconnect.
                self._affinity_queue = await channel.declare_queue(
                    name, durable=True, arguments=affinity.queue_arguments(queue))
            queues.insert(0, name)

            def advertise(fields: dict[str, Any]) -> None:
                fields["models"] = multiplex.loaded_model_ids()
                fields["capacity"] = capacity

            self._advertise_models = advertise
        # Requests abandoned while the connection was down come back redelivered: their
        # callers' tombstones are loaded before consuming again, so they are dropped at pickup.
        self._consumers.append(await Subscription(
            self.broker, channel, queues, self._on_request_channel, no_ack=False,
            before_reconsume=lambda: self._cancelled.load(self.store),
            on_queue_deleted=self._queue_deleted).start())

    def _queue_deleted(self, queue: str) -> None:
        """The controller re-created the queue with new arguments (once it was drained), or
        is deleting the application: this replica is replaced by one that consumes the new
        queue."""
        if self._stopping.is_set():
            return
        task = asyncio.ensure_future(self._unhealthy(
            f"its queue {queue} was deleted; a new replica consumes it again"))
        self._tasks_aside.add(task)
        task.add_done_callback(self._tasks_aside.discard)

    def _on_request_channel(self, raw: aiormq.abc.AbstractChannel) -> DeliveryCallback:
        """A (re)opened request channel: its deliveries are settled by a settler of its own."""
        settler = Settler(raw, self.broker.frame_writer(raw),
                          prefetch=self.config.max_ongoing_requests)
        self._settler = settler
        raw.closing.add_done_callback(lambda _: self._channel_closed(settler))
        return functools.partial(self._on_request, settler)

    def _channel_closed(self, settler: Settler) -> None:
        """RabbitMQ requeues what this channel had not settled; this replica is alive, so
        those redeliveries are not deaths. (Stopping, `shutdown` writes them down itself.)"""
        released = [cid for _, _, cid in settler.ledger.unsettled()]
        if released and not self._stopping.is_set():
            self.deliveries.release_soon(released)

    async def _construct(self, definition: dict[str, Any], threads: ThreadRunner) -> Servable:
        def constructed(instance: Any) -> None:
            ingress.set_servable(instance)
            _set_replica_context(ReplicaContext(self.app, self.deployment, self.replica_id,
                                                instance))

        return await construct(definition, threads, self.config.user_config, constructed)

    async def main_loop(self) -> None:
        async def beat() -> None:
            self._cancelled.prune()
            # Its value is the number of requests running: the autoscaler's ongoing load.
            try:
                await self.store.heartbeat(self.names.replica_alive(self.replica_id),
                                           str(len(self._tasks)))
            finally:
                # After the heartbeat, which must not wait on RabbitMQ.
                for consumer in self._consumers:
                    await asyncio.wait_for(consumer.ensure(), 5)

        watchers = [
            asyncio.create_task(self.store.watch_events(self._on_event, CONFIG_REFRESH_S,
                                                        self._stopping)),
            asyncio.create_task(self._health_loop()),
            asyncio.create_task(self.metrics.flush_loop(lambda: len(self._tasks),
                                                        self._stopping)),
            asyncio.create_task(self.history.run(self._stopping)),
        ]
        try:
            auto = self.config.autoscaling_config
            interval = min(HEARTBEAT_INTERVAL_S, auto.metrics_interval_s if auto else 1e9)
            await heartbeat_loop(beat, interval, self._stopping)
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

    # live options and health -------------------------------------------------------------------
    async def _live_options(self) -> dict[str, Any]:
        record = await self.store.app(self.app)
        deployment = record["deployments"].get(self.deployment) if record else None
        config = deployment["config"] if deployment else {}
        return {k: v for k, v in config.items() if k in LIVE_OPTIONS}

    async def _on_event(self, event: str | None) -> None:
        """Take on changed live options; a new user_config goes to `reconfigure()`."""
        if event not in (None, "apps"):
            return
        live = await self._live_options()
        if not live:
            return  # the app is being deleted: the controller stops this replica
        async with self._reconfiguring:
            config = DeploymentConfig.model_validate(
                {**self.config.model_dump(exclude=set(LIVE_OPTIONS)), **live})
            wanted = user_config_hash(config.model_dump(mode="json")["user_config"])
            self.config = config
            if wanted == self.user_config_hash:
                return
            try:
                await self._call_user("reconfigure", config.user_config)
            except Exception as exc:  # noqa: BLE001 - user code: reported as unhealthy
                log.error("reconfigure() failed:\n%s", traceback.format_exc())
                await self._unhealthy(f"reconfigure() failed: {type(exc).__name__}: {exc}")
                return
            self.user_config_hash = wanted
            log.info("replica %s took the new user_config", self.replica_id)
            await self._write_record(ReplicaState.RUNNING)
            await self.store.announce("replicas")

    async def _call_user(self, method: str, *args: Any) -> Any:
        """Call a lifecycle method of the user's class, if it has it; sync ones off the loop."""
        assert self.servable is not None
        return await self.servable.call_lifecycle(method, *args)

    async def _health_loop(self) -> None:
        """Call `check_health()` every health_check_period_s; a failure or a timeout gets this
        replica replaced."""
        assert self.servable is not None
        if self.servable.is_function or not hasattr(self.servable.target, "check_health"):
            return
        while not self._stopping.is_set():
            await sleep_or_stop(self._stopping, self.config.health_check_period_s)
            if self._stopping.is_set():
                return
            timeout = self.config.health_check_timeout_s
            try:
                await asyncio.wait_for(self._call_user("check_health"), timeout)
            except TimeoutError:
                await self._unhealthy(f"check_health() did not return within {timeout}s")
                return
            except Exception as exc:  # noqa: BLE001 - user code: reported as unhealthy
                await self._unhealthy(f"check_health() failed: {type(exc).__name__}: {exc}")
                return

    async def _unhealthy(self, message: str) -> None:
        """Ask to be replaced: the controller starts another replica and stops this one."""
        log.error("replica %s is unhealthy: %s", self.replica_id, message)
        await self._safe_record(ReplicaEndState.UNHEALTHY, message[:500])
        try:
            await self.store.announce("replicas")
        except BrokerServeError as exc:  # the controller's periodic pass sees the record
            log.warning("could not announce that replica %s is unhealthy: %s",
                        self.replica_id, exc)

    async def _until_requests_done(self, timeout: float) -> None:
        """Give running requests `timeout` seconds to finish, looking every
        graceful_shutdown_wait_loop_s (at most 50 ms)."""
        async def done() -> bool:
            return not self._tasks

        await AsyncRetrying(
            stop=stop_after_delay(timeout),
            wait=wait_fixed(min(0.05, self.config.graceful_shutdown_wait_loop_s)),
            retry=retry_if_result(lambda finished: not finished),
            retry_error_callback=lambda state: None)(done)

    async def shutdown(self) -> None:
        log.info("replica %s stopping", self.replica_id)
        loop = asyncio.get_running_loop()
        # Requests, then shutdown hooks and __del__, share the grace period, as in Ray.
        deadline = loop.time() + self.config.graceful_shutdown_timeout_s
        await self._safe_record(ReplicaState.STOPPING)
        for consumer in self._consumers:
            try:
                await asyncio.wait_for(consumer.cancel(), 5)
            except (BrokerServeError, TimeoutError) as exc:  # broker away: closing the
                # connection below stops it too
                log.warning("could not cancel consumer: %s", exc or type(exc).__name__)
        await self._until_requests_done(deadline - loop.time())
        stragglers = list(self._tasks)
        for task in stragglers:
            task.cancel()
        if stragglers:
            log.warning("cancelled %d unfinished request(s); RabbitMQ requeues them",
                        len(stragglers))
            await asyncio.gather(*stragglers, return_exceptions=True)
        settler = self._settler
        if settler is not None:
            try:
                await asyncio.wait_for(settler.drain(), 5)
            except (BrokerServeError, TimeoutError) as exc:
                log.warning("could not send the last acks: %s", exc)
            await self.deliveries.released([cid for _, _, cid in settler.ledger.unsettled()])
        if self.servable is not None:
            # While the connection is still open: hooks and __del__ may call handles.
            await self.servable.stop(max(deadline - loop.time(), MIN_USER_SHUTDOWN_S))
        try:
            await asyncio.wait_for(self.broker.close(), 5)
        except (BrokerServeError, TimeoutError) as exc:
            log.warning("could not close the RabbitMQ connection cleanly: %s", exc)
        try:
            await self.store.drop_heartbeat(self.names.replica_alive(self.replica_id))
        except BrokerServeError as exc:  # the key expires on its own
            log.warning("could not remove the liveness key of %s: %s", self.replica_id, exc)
        if self.servable is not None:
            self.servable.threads.shutdown()
        self.metrics.flush(0)
        await self.history.write()  # the last interval, drained requests included
        self.access.flush()
        await self.store.close()

    # records -----------------------------------------------------------------------------------
    async def _write_record(self, state: ReplicaRecordState, message: str = "") -> None:
        await self.store.update_replica(
            self.replica_id, replica_id=self.replica_id, app=self.app,
            deployment=self.deployment, version=self.version, state=state, message=message,
            pid=os.getpid(), updated=now(), user_config_hash=self.user_config_hash,
        )

    async def _safe_record(self, state: ReplicaRecordState, message: str = "") -> None:
        try:
            await self._write_record(state, message)
        except BrokerServeError as exc:
            log.warning("could not record state %s: %s", state.value, exc)

    async def _report_failure(self, exc: BaseException) -> None:
        await self._safe_record(ReplicaEndState.FAILED, f"{type(exc).__name__}: {exc}"[:500])
        try:
            await self.store.announce("replicas")
        except BrokerServeError as err:  # the controller's periodic pass sees the record
            log.warning("could not announce that replica %s failed: %s", self.replica_id, err)
        await self.broker.close()
        await self.store.close()

    # messages ----------------------------------------------------------------------------------
    async def _on_request(self, settler: Settler, message: DeliveredMessage) -> None:
        """Runs in the task aiormq starts for each delivery; aiormq cancels it if the channel
        closes, and then RabbitMQ gives the request to a replica that has one."""
        delivery = cast(Basic.Deliver, message.delivery)  # a consumer gets only deliveries
        tag = cast(int, delivery.delivery_tag)
        settler.delivered(tag, message.header.properties.correlation_id or "")
        task = cast("asyncio.Task[None]", asyncio.current_task())
        self._tasks.add(task)
        try:
            await self._handle(message, tag, bool(delivery.redelivered), settler)
        finally:
            self._tasks.discard(task)

    async def _on_inbox(self, message: DeliveredMessage) -> None:
        try:
            self._take_from_inbox(message)
        except Exception:  # a consumer callback's boundary: one bad message, not the consumer
            log.exception("could not take inbox message %s of request %s",
                          message.header.properties.message_type,
                          message.header.properties.correlation_id)

    def _take_from_inbox(self, message: DeliveredMessage) -> None:
        properties = message.header.properties
        correlation_id = properties.correlation_id or ""
        try:
            fields = protocol.decode_map(message.body)
        except ProtocolError:
            fields = {}
        if properties.message_type == protocol.CREDIT:
            window = self._windows.get(correlation_id)
            if window is not None and isinstance(fields.get("bytes"), int):
                window.grant(fields["bytes"])
            return
        from_caller = self._caller_messages.get(correlation_id)
        if from_caller is None:
            return
        from_caller.put_nowait((properties.message_type or "", fields))

    async def _on_cancel(self, message: DeliveredMessage) -> None:
        try:
            fields = protocol.decode_map(message.body)
            ids = self._cancelled.add(list(fields.get("ids") or ()), int(fields["expires"]))
        except (ProtocolError, KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring a malformed cancel message: %s", exc)
            return
        for request_id in ids:
            task = self._running.get(request_id)
            if task is not None:
                self._cancelling.add(request_id)
                task.cancel()

    async def _handle(self, message: DeliveredMessage, tag: int, redelivered: bool,
                      settler: Settler) -> None:
        properties = message.header.properties
        reply_to, correlation_id = properties.reply_to, properties.correlation_id or ""
        calls_of_current_request.set([])  # this task's own context: the calls it makes
        headers = properties.headers or {}
        request_id = headers.get(protocol.HEADER_REQUEST_ID)
        if request_id.__class__ is not str or len(request_id) > protocol.MAX_ID_LENGTH:
            request_id = correlation_id
        _request_id.set(request_id)  # the handle calls it makes carry it on
        published = headers.get(protocol.HEADER_PUBLISHED)
        if redelivered:
            self.metrics.redeliveries.inc()
        elif published.__class__ is int:
            self.metrics.waited(max(0.0, time.time() - published / 1e6))
        started = time.perf_counter()
        traces = tracing.traces
        try:
            if traces is None:
                stream = await self._handle_running(message, tag, redelivered, reply_to,
                                                    correlation_id, settler)
            else:
                stream = await self._handle_traced(
                    traces, message, tag, redelivered, reply_to, correlation_id, settler,
                    request_id, None if redelivered or published.__class__ is not int
                    else published)
        finally:
            self._cancelling.discard(correlation_id)
        if stream is not None:
            self._finished(stream, time.perf_counter() - started, request_id)

    async def _handle_traced(self, traces: Traces, message: DeliveredMessage, tag: int,
                             redelivered: bool, reply_to: str | None, correlation_id: str,
                             settler: Settler, request_id: str, published_us: int | None
                             ) -> ReplyStream | None:
        """`_handle_running` within the request's spans (docs/architecture.md, "Tracing"):
        its queue wait, and its processing, current while it runs, so that the handle calls
        it makes are its children."""
        properties = message.header.properties
        headers = properties.headers or {}
        span = traces.replica_request(
            headers, kind=properties.message_type or "", queue=self._request_queue,
            app=self.app, deployment=self.deployment, replica=self.replica_id,
            correlation_id=correlation_id, request_id=request_id, published_us=published_us,
            job=not reply_to and jobs.is_job(headers))
        if redelivered:
            span.set("broker_serve.redelivered", True)
        try:
            stream = await self._handle_running(message, tag, redelivered, reply_to,
                                                correlation_id, settler)
        except BaseException as exc:  # the replica stops: RabbitMQ gives it to another one
            span.end(error=type(exc).__name__)
            raise
        if stream is None:
            span.end(error="DeadLettered")
            return None
        span.rename(f"process {self.app}/{self.deployment}.{stream.method}")
        span.end(stream.status, attributes={"broker_serve.method": stream.method} if not
                 stream.http else {"broker_serve.method": stream.method,
                                   "http.response.status_code": stream.status})
        return stream

    def _finished(self, stream: ReplyStream, seconds: float, request_id: str) -> None:
        """One request's metrics and log line."""
        self.metrics.finished(stream.method, seconds, stream.status,
                              stream.failed or stream.status >= 500)
        if self.access.enabled:
            self.access.add((stream.method, stream.http, stream.status, seconds, request_id))

    async def _handle_running(self, message: DeliveredMessage, tag: int, redelivered: bool,
                              reply_to: str | None, correlation_id: str,
                              settler: Settler) -> ReplyStream | None:
        """Run the request; returns its stream once it is settled (None: no reply_to)."""
        properties = message.header.properties
        too_large = None
        if len(message.body) > self.max_message_bytes:  # read no further
            too_large = self._too_large(message)
        if not reply_to:
            if jobs.is_job(properties.headers or {}):
                try:
                    stream = await self.jobs.run(message, correlation_id,
                                                 self.config.job_config, self.app,
                                                 self.deployment, refused=too_large)
                except BrokerServeError as exc:  # Redis failed for another reason than
                    # being away: dead-lettered by RabbitMQ, to be replayed
                    log.error("job %s could not be run: %s; dead-lettering it",
                              correlation_id, exc)
                    settler.rejected(tag)
                    return None
                settler.finished(tag)
                return stream
            log.error("request %r has no reply_to; dead-lettering it", properties.message_id)
            settler.rejected(tag)
            return None

        advertise = self._advertise_models

        async def publish(event: str, fields: dict[str, Any]) -> None:
            nonlocal advertise
            fields["replica"] = self.replica_id
            if advertise is not None:  # the first event of a multiplexed replica's reply
                advertise(fields)
                advertise = None
            await self.broker.publish(reply_to, protocol.pack(fields), type=event,
                                      correlation_id=correlation_id)

        stream = ReplyStream(publish)
        stream.method = _METHOD_OF_KIND.get(properties.message_type or "", "unknown")
        if too_large is not None:  # as a malformed message: its caller is told, it is acked
            await stream.error(413, "MessageTooLarge", too_large)
            settler.finished(tag)
            return stream
        if redelivered and await self.deliveries.delivered_too_often(correlation_id):
            await stream.error(502, "RequestKilledReplicas",
                               f"the request ran {MAX_DELIVERIES - 1} times and its replica "
                               "died each time; it was dead-lettered, not retried")
            settler.rejected(tag)
            return stream
        if correlation_id in self._cancelled:
            await stream.error(499, "Cancelled", "the request was cancelled before it ran")
        else:
            await self._run_attempt(message, stream, correlation_id, restartable=False)
        if stream.finished:
            settler.finished(tag)
        else:  # nothing was sent: dead-lettered to `bs.<cluster>.dead`
            settler.rejected(tag)
        return stream

    def _too_large(self, message: DeliveredMessage) -> str:
        """Count a message over BROKER_SERVE_MAX_MESSAGE_BYTES; what its caller is told."""
        self.metrics.refused("message_too_large")
        text = (f"the message is {len(message.body)} bytes, over this replica's limit of "
                f"{self.max_message_bytes} (BROKER_SERVE_MAX_MESSAGE_BYTES); it was "
                "not run")
        log.warning("refusing %s %s: %s", message.header.properties.message_type or "message",
                    message.header.properties.correlation_id, text)
        return text

    async def _run_attempt(self, message: DeliveredMessage, stream: ReplyStream,
                           correlation_id: str, *, restartable: bool = True) -> None:
        """Run the request into `stream`, which ends with its terminal event, unless the
        replica stops: then CancelledError, and RabbitMQ gives it to another replica; a
        response already started (not `restartable`) ends with 503 instead."""
        try:
            with self._cancellable(correlation_id):
                await run_attempt(self._dispatch(message, stream, correlation_id), stream,
                                  kind=message.header.properties.message_type,
                                  secret=self.secret, correlation_id=correlation_id,
                                  cancelled_by_caller=lambda: correlation_id in self._cancelling,
                                  restartable=restartable)
        finally:
            self._caller_messages.pop(correlation_id, None)

    @contextlib.contextmanager
    def _cancellable(self, correlation_id: str) -> Iterator[None]:
        """Within it, a cancel message for `correlation_id` cancels this task: `run_attempt`
        answers 499, or a job's wait to retry ends. Outside it, while a delivery is picked up
        (the Redis round trips of its redelivery count and job record), a cancel only adds to
        the cancelled ids, which the pickup checks next: cancelling the task there would end
        it before its delivery is settled, and an unsettled delivery holds a prefetch slot for
        good (a replica whose slots all held such deliveries, after a broker outage, took no
        request again)."""
        self._running[correlation_id] = asyncio.current_task()  # type: ignore[assignment]
        try:
            yield
        finally:
            self._running.pop(correlation_id, None)

    async def _dispatch(self, message: DeliveredMessage, stream: ReplyStream,
                        correlation_id: str) -> None:
        properties = message.header.properties
        headers = properties.headers or {}
        protocol.check_version(headers)
        if not await within_deadline(headers, stream):
            return
        if len(correlation_id) > protocol.MAX_ID_LENGTH:
            raise ProtocolError(f"correlation_id is longer than {protocol.MAX_ID_LENGTH}")
        payload = protocol.decode_map(message.body)
        assert self.servable is not None
        kind = properties.message_type
        traces = tracing.traces
        if traces is not None and isinstance(payload.get("scope"), dict):
            traces.reparent_scope(payload["scope"])
        if kind == protocol.KIND_HTTP:
            from_caller: CallerMessages | None = None
            if payload.get("more_body"):  # the rest of the body will come to the inbox
                if not properties.reply_to:
                    raise ProtocolError("a job carries its whole body: more_body must be false")
                from_caller = self._caller_messages[correlation_id] = asyncio.Queue()
            window = None
            # A job has no caller to grant credit: its response is collected, not streamed.
            if (isinstance(payload.get("window"), int) and payload["window"] > 0
                    and properties.reply_to):
                window = self._windows[correlation_id] = FlowWindow(payload["window"])
            try:
                await run_http(self.servable, stream, payload, from_caller, self.inbox_name,
                               self.settings.max_body_bytes, window)
            finally:
                self._windows.pop(correlation_id, None)
        elif kind == protocol.KIND_CALL:
            await run_call(self.servable, stream, payload, self.secret)
        elif kind == protocol.KIND_WEBSOCKET:
            frames = self._caller_messages[correlation_id] = asyncio.Queue()
            await run_websocket(self.servable, stream, payload, frames, self.inbox_name)
        elif kind == protocol.KIND_GRPC:
            await run_grpc(self.servable, stream, payload, self.grpc)
        else:
            raise ProtocolError(f"unknown request kind {kind!r}")


# The metrics' `method` label of a request until its method is known (a call that fails
# before its method is resolved says "unknown").
_METHOD_OF_KIND = {protocol.KIND_HTTP: "__call__", protocol.KIND_WEBSOCKET: "websocket"}


def _access_text(name: str, line: tuple[Any, ...]) -> str:
    method, http, status, seconds, request_id = line
    what = f"{http[0]} {http[1]}" if http else f"call {method}"
    return f"{name} {what} {status} {seconds * 1000:.2f}ms request_id={request_id}"


def _access_fields(app: str, deployment: str, replica_id: str,
                   line: tuple[Any, ...]) -> dict[str, Any]:
    method, http, status, seconds, request_id = line
    fields = {"application": app, "deployment": deployment, "replica": replica_id,
              "method": method, "status": status, "duration_ms": round(seconds * 1000, 3),
              "request_id": request_id}
    if http:
        fields["http_method"], fields["path"] = http
    return fields


def main(argv: list[str] | None = None) -> None:
    die_with_parent_if_asked()
    parser = argparse.ArgumentParser(prog="python -m broker_serve.replica")
    parser.add_argument("--app", required=True)
    parser.add_argument("--deployment", required=True)
    parser.add_argument("--replica-id", required=True)
    parser.add_argument("--version", required=True)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    setup_logging(settings.log_level, f"replica {args.replica_id}")
    tracing.setup("replica", args.replica_id)
    _use_uvloop()
    replica = Replica(settings, args.app, args.deployment, args.replica_id, args.version)
    run_entry_point(replica.run(), f"replica {args.replica_id}")


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

