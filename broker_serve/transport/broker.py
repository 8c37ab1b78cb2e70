"""One AMQP connection per process, long-lived channels, and the reply router.

aio-pika's robust connection owns every channel: it opens them, and after a lost connection it
reconnects, reopens them and re-declares their queues and exchanges. Nothing here opens or
reopens a channel behind its back, and nothing on the request path opens one at all.

The hot consumers (reply queues, a replica's request queue and inbox) consume on the aiormq
channel under a robust channel (`Subscription`), skipping aio-pika's per-message objects and
tasks; they subscribe again from the channel's public `reopen_callbacks`. Publishes and a
replica's acks are encoded by `frames.py` and written through `aiormq_adapter.py`, the one
module that goes below aiormq's public API; only confirmed publishes use aiormq's
`basic_publish`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection
from pamqp.commands import Basic
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)
from yarl import URL

from ..credentials import without_credentials
from ..exceptions import BrokerServeError, ClusterUnavailable, ProtocolError, TransportError
from ..protocol import messages as protocol
from ..tls import ClientTls
from . import addresses, aiormq_adapter, frames
from .errors import AMQP_ERROR_TYPES, map_amqp_errors, translate

log = logging.getLogger("broker_serve.broker")

ReturnHandler = Callable[[str, str], None]
DeliveryCallback = Callable[[aiormq.abc.DeliveredMessage], Coroutine[Any, Any, None]]

# Publishes return without waiting for the socket to drain: that wait is a full turn of the
# event loop per message. After this many bytes one publish waits, so a slow broker still
# pushes back and unsent data stays bounded.
UNDRAINED_LIMIT_BYTES = 256 * 1024
# aio-pika retries a lost connection this often; with several nodes, each retry that fails
# moves on to the next node.
RECONNECT_INTERVAL_S = 1.0
CONNECT_TIMEOUT_S = 10.0
CHANNEL_RESTORE_WAIT_S = 2.0
# How long a durable publish is retried across lost connections when its request has no
# deadline of its own.
DURABLE_PUBLISH_WAIT_S = 10.0


def connection_name(cluster: str, role: str, ident: str) -> str:
    """The name RabbitMQ shows (and logs) for a process's connection. tests/conftest.py
    reads RabbitMQ's log by this prefix: any channel or connection error on a connection so
    named fails the test."""
    return f"broker-serve {cluster} {role} {ident}"


class Broker:
    def __init__(self, url: str, name: str, cancel_exchange: str | None = None,
                 tls: ClientTls | None = None) -> None:
        self.addresses = addresses.parse(url)
        # The CA and client certificate of `amqps://` nodes (BROKER_SERVE_TLS_*); aio-pika keeps
        # the context for every reconnect, to whichever node.
        self._tls = tls or ClientTls()
        # Each process starts at a node of its own, so a cluster's connections spread out.
        self._address = random.randrange(len(self.addresses))
        self._failing_over: asyncio.Task[None] | None = None
        self._connection_lost = asyncio.Event()
        self.name = name
        self.connection: AbstractRobustConnection | None = None
        self._cancel_exchange = cancel_exchange
        self._publisher: AbstractRobustChannel | None = None
        self._confirming: AbstractRobustChannel | None = None
        self._raw: aiormq.Channel | None = None
        self._writer: aiormq_adapter.FrameWriter | None = None
        self._return_handlers: list[ReturnHandler] = []
        self._undrained = 0
        self._closing = False
        # Channels the broker closed while this process meant to use them: always a bug of
        # ours or a lost connection (docs/architecture.md, "The AMQP transport").
        self.channels_lost = 0
        self._lost_callbacks: list[Callable[[], None]] = []
        # This process's reply queues: after a reconnect no request goes out before they are
        # consumed again, or its replies would go to a queue not yet re-declared, and be lost.
        self._reply_subscriptions: list[Subscription] = []

    async def connect(self) -> None:
        """Connect to the first node that answers (trying each once, so the first attempt
        fails fast); later drops are retried by aio-pika, moving on from node to node."""
        for tried in range(len(self.addresses)):
            url = self.addresses[self._address]
            try:
                with map_amqp_errors(f"cannot reach RabbitMQ at {without_credentials(url)}"):
                    self.connection = await aio_pika.connect_robust(
                        url, client_properties={"connection_name": self.name},
                        ssl_context=self._tls.amqp_context(url),
                        timeout=CONNECT_TIMEOUT_S, reconnect_interval=RECONNECT_INTERVAL_S)
                break
            except ClusterUnavailable:
                if tried == len(self.addresses) - 1:
                    raise
                log.warning("cannot reach RabbitMQ at %s; trying the next node",
                            without_credentials(url))
                self._address = (self._address + 1) % len(self.addresses)
        assert self.connection is not None
        if len(self.addresses) > 1:
            self.connection.close_callbacks.add(lambda *_: self._connection_lost.set())
            self._failing_over = asyncio.create_task(self._fail_over(self.connection))
        with map_amqp_errors("cannot open the channels to RabbitMQ"):
            self._publisher = await self.channel()
            self._publisher.return_callbacks.add(self._on_return)
            if self._cancel_exchange:
                # Whoever publishes cancels declares the exchange too: a publish to a missing
                # exchange would close the publishing channel. aio-pika re-declares it after a
                # reconnect.
                await self._publisher.declare_exchange(self._cancel_exchange, "fanout",
                                                       durable=True)
            self._confirming = await self.connection.channel(publisher_confirms=True)
            self._confirming.return_callbacks.add(self._on_return)

    async def channel(self, prefetch: int = 0, global_qos: bool = False) -> AbstractRobustChannel:
        """A robust channel; aio-pika restores its QoS and queues after a reconnect."""
        assert self.connection is not None, "connect() first"
        with map_amqp_errors("cannot open a channel to RabbitMQ"):
            channel: AbstractRobustChannel = await self.connection.channel(
                publisher_confirms=False)
            if prefetch:
                await channel.set_qos(prefetch_count=prefetch, global_=global_qos)
        return channel

    async def _fail_over(self, connection: AbstractRobustConnection) -> None:
        """While the connection is down, move aio-pika's next attempt on to the next node
        after each retry interval. aio-pika reads its connection's public `url` at every
        attempt (pinned, and checked by tests/test_transport_contract.py); it restores the
        channels, queues and consumers on whichever node answers."""
        while not self._closing:
            await self._connection_lost.wait()
            self._connection_lost.clear()
            while not self._closing and not connection.connected.is_set():
                try:
                    await asyncio.wait_for(connection.connected.wait(),
                                           RECONNECT_INTERVAL_S * 1.5)
                except TimeoutError:
                    self._address = (self._address + 1) % len(self.addresses)
                    _point_at(connection, self.addresses[self._address])
                    log.warning("RabbitMQ is still unreachable; %s tries %s next", self.name,
                                without_credentials(self.addresses[self._address]))

    @property
    def is_connected(self) -> bool:
        return self.connection is not None and self.connection.connected.is_set()

    async def wait_connected(self, timeout_s: float) -> bool:
        """Whether the connection is up, or comes back within `timeout_s`."""
        if self.connection is None:
            return False
        try:
            await asyncio.wait_for(self.connection.connected.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        self._closing = True
        if self._failing_over is not None:
            self._failing_over.cancel()
        if self.connection is not None:
            with map_amqp_errors("cannot close the connection to RabbitMQ"):
                await self.connection.close()
            self.connection = None

    def watch(self, raw: aiormq.abc.AbstractChannel) -> None:
        """Count `raw` in `channels_lost` if it closes while this process still uses it."""
        raw.closing.add_done_callback(self._on_channel_closed)

    def publish_after(self, replies: Subscription) -> None:
        """Publish nothing after a reconnect until `replies` consumes again."""
        self._reply_subscriptions.append(replies)

    def stop_waiting_for(self, replies: Subscription) -> None:
        if replies in self._reply_subscriptions:
            self._reply_subscriptions.remove(replies)

    def on_channel_lost(self, callback: Callable[[], None]) -> None:
        """Call `callback()` each time a channel is counted in `channels_lost`."""
        self._lost_callbacks.append(callback)

    def _on_channel_closed(self, closing: asyncio.Future[Any]) -> None:
        if self._closing or closing.cancelled():
            return
        exc = closing.exception()
        if isinstance(exc, aiormq.exceptions.ChannelClosed) and exc.args[:1] == (None,):
            return  # closed by this process (Channel.CloseOk from the broker)
        self.channels_lost += 1
        log.warning("channel of %s lost: %r", self.name, exc)
        for callback in self._lost_callbacks:
            callback()

    def on_return(self, handler: ReturnHandler) -> None:
        """Call `handler(correlation_id, routing_key)` for a mandatory message nobody could take."""
        self._return_handlers.append(handler)

    def _on_return(self, _sender: Any, message: AbstractIncomingMessage) -> None:
        for handler in self._return_handlers:
            handler(message.correlation_id or "", message.routing_key or "")

    async def publish(
        self,
        routing_key: str,
        body: bytes,
        *,
        type: str,
        correlation_id: str,
        reply_to: str | None = None,
        headers: dict[str, Any] | None = None,
        expiration: str | None = None,
        priority: int = 0,
        mandatory: bool = False,
        exchange: str = "",
    ) -> None:
        """Publish without waiting for the socket: the frames go to the connection's writer at
        the end of this loop turn, with everything else written in it (`FrameWriter`). Every
        256 KiB one publish waits until the socket took them, so a slow broker pushes back."""
        raw = await self._channel()
        try:
            payload = frames.publish(
                raw.number, routing_key, body, content_type=protocol.CONTENT_TYPE,
                message_type=type, correlation_id=correlation_id, reply_to=reply_to,
                message_id=correlation_id if reply_to else None, headers=headers,
                expiration=expiration, priority=priority, mandatory=mandatory,
                exchange=exchange, max_body_frame=aiormq_adapter.max_body_frame(raw),
            )
            writer = self.frame_writer(raw)
            writer.write(raw, payload)
            self._undrained += len(payload)
            if self._undrained >= UNDRAINED_LIMIT_BYTES:
                self._undrained = 0
                await writer.drain()
        except AMQP_ERROR_TYPES as exc:
            self._raw = None
            raise translate(exc, "publish to RabbitMQ failed") from exc

    def frame_writer(self, raw: aiormq.abc.AbstractChannel) -> aiormq_adapter.FrameWriter:
        """The writer of the connection `raw` belongs to: one per connection, so that this
        process's frames reach the socket in the order it wrote them."""
        writer = self._writer
        if writer is None or writer.connection is not raw.connection:
            writer = self._writer = aiormq_adapter.FrameWriter(raw.connection)
        return writer

    async def publish_confirmed(self, routing_key: str, body: bytes, *, type: str,
                                correlation_id: str, reply_to: str | None = None,
                                headers: dict[str, Any] | None = None,
                                expiration: str | None = None, priority: int = 0,
                                mandatory: bool = False, persistent: bool = False,
                                message_id: str | None = None,
                                refuse_returned: bool = False) -> bool:
        """Publish and wait for the broker's confirm. False: the broker refused the message
        (a bounded queue is full), or, with `refuse_returned`, returned it (a `mandatory`
        message no queue took; it must have a `message_id`); otherwise a returned message
        reaches the `on_return` handlers, which fail its request. Only publishes to bounded
        or durable queues pay for this wait; `persistent` ones are written to disk by the
        broker before it confirms."""
        if self._confirming is None or not self.is_connected:
            # aio-pika would wait for the reconnection: callers get an answer at once instead
            raise ClusterUnavailable("RabbitMQ connection is down")
        properties = Basic.Properties(
            content_type=protocol.CONTENT_TYPE, message_type=type, correlation_id=correlation_id,
            message_id=message_id or (correlation_id if reply_to else None), reply_to=reply_to,
            headers=headers,
            expiration=expiration, delivery_mode=2 if persistent else 1,
            priority=priority or None,
        )
        if reply_to is not None:
            await self._wait_for_replies(
                asyncio.get_running_loop().time() + CHANNEL_RESTORE_WAIT_S)
        try:
            raw = await self._confirming.get_underlay_channel()
            confirmation = await raw.basic_publish(body, routing_key=routing_key,
                                                   properties=properties, mandatory=mandatory)
            # aiormq completes a returned message's confirm with the message itself (its
            # channels from aio-pika do not raise on returns): anything but an ack.
            if refuse_returned and not isinstance(confirmation, Basic.Ack):
                return False
        except aiormq.exceptions.DeliveryError:
            return False  # nacked: the queue is at its bound
        except AMQP_ERROR_TYPES as exc:
            raise translate(exc, "publish to RabbitMQ failed") from exc
        return True

    async def publish_request(self, routing_key: str, body: bytes, *, bounded: bool,
                              durable: bool, events: ReplyEvents | None,
                              deadline_ms: int | None, **properties: Any) -> bool:
        """A request to a deployment's queue, as its queue asks (docs/architecture.md, "Durable
        mode"): durable, persistent and confirmed, retried across lost connections (its
        `events` are not failed by a lost connection meanwhile); bounded, confirmed; else
        written at once. False: a bounded queue is full."""
        if durable:
            if events is not None:
                events.publishing_durably = True
            try:
                return await self.publish_durably(routing_key, body, deadline_ms=deadline_ms,
                                                  events=events, **properties)
            finally:
                if events is not None:
                    events.publishing_durably = False
        if bounded:
            return await self.publish_confirmed(routing_key, body, **properties)
        await self.publish(routing_key, body, **properties)
        return True

    async def publish_durably(self, routing_key: str, body: bytes, *, deadline_ms: int | None,
                              events: ReplyEvents | None = None, **properties: Any) -> bool:
        """A persistent, confirmed publish that survives the loss of a node: until the broker
        confirms it (True) or refuses it (False: a bounded queue is full), it is published
        again, once the connection is back on whichever node, with a backoff, until the
        deadline passes (`deadline_ms`, unix ms; None: DURABLE_PUBLISH_WAIT_S); then
        ClusterUnavailable. A publish whose confirm was lost with its node may arrive twice,
        and run twice: durable means at least once.

        With the request's reply `events`: a publish confirmed while the connection was lost
        (the confirm read just before the loss, the loss reported before this task resumed)
        is published again too. Its reply queue may have gone with that connection, and the
        lost connection did not fail it, since it was still publishing: without this, its
        caller would wait for a reply that never comes."""
        wait_s = (DURABLE_PUBLISH_WAIT_S if deadline_ms is None
                  else deadline_ms / 1000 - time.time())

        async def attempt() -> bool:
            if not await self.wait_connected(max(wait_s, 0.0)):
                raise ClusterUnavailable("RabbitMQ connection is down")
            if events is not None:
                events.reply_path_lost = False
            confirmed = await self.publish_confirmed(routing_key, body, persistent=True,
                                                     **properties)
            if events is not None and events.reply_path_lost:
                raise ClusterUnavailable("the connection was lost as RabbitMQ confirmed the "
                                         "request, and its reply queue may be lost with it")
            return confirmed

        def gave_up(state: RetryCallState) -> NoReturn:
            assert state.outcome is not None
            raise ClusterUnavailable(f"RabbitMQ did not confirm the request before its "
                                     f"deadline: {state.outcome.exception()}")

        retrying = AsyncRetrying(
            retry=retry_if_exception_type((ClusterUnavailable, TransportError)),
            wait=wait_exponential(multiplier=0.05, max=1.0), stop=stop_after_delay(wait_s),
            retry_error_callback=gave_up,
            before_sleep=lambda state: log.info("publishing %s again after a lost connection",
                                                properties.get("correlation_id")))
        return bool(await retrying(attempt))

    async def _channel(self) -> aiormq.Channel:
        """The open aiormq channel under the publishing channel."""
        raw = self._raw
        if raw is not None and not raw.is_closed:
            return raw
        if self._publisher is None or not self.is_connected:
            # aio-pika would wait for the reconnection: callers get an answer at once instead
            raise ClusterUnavailable("RabbitMQ connection is down")
        # Just reconnected, aio-pika may still be reopening this channel (it reopens them one
        # by one): wait for it a moment rather than fail a publish that can go through.
        deadline = asyncio.get_running_loop().time() + CHANNEL_RESTORE_WAIT_S
        while True:
            with map_amqp_errors("RabbitMQ connection is down"):
                raw = cast(aiormq.Channel, await self._publisher.get_underlay_channel())
            if not raw.is_closed:
                break
            if not self.is_connected or asyncio.get_running_loop().time() > deadline:
                raise ClusterUnavailable("RabbitMQ connection is down")
            await asyncio.sleep(0.02)
        await self._wait_for_replies(deadline)
        if raw is not self._raw:
            self.watch(raw)
            self._raw = raw
        return raw

    async def _wait_for_replies(self, deadline: float) -> None:
        """Until this process's reply queues are consumed again (after a reconnect)."""
        while not all(replies.consuming for replies in self._reply_subscriptions):
            if not self.is_connected or asyncio.get_running_loop().time() > deadline:
                raise ClusterUnavailable(
                    "RabbitMQ connection is down (this process's reply queue is not back yet)")
            await asyncio.sleep(0.02)


class Subscription:
    """Consumers of some queues on the aiormq channel under one robust channel.

    `on_channel(raw)` gives the delivery callback for each underlay channel: delivery tags
    belong to one channel, so a replica settles each channel's deliveries separately. When
    aio-pika reopens the channel (after a lost connection), the queues are consumed again on
    the new underlay channel, from the channel's public `reopen_callbacks`.
    """

    def __init__(self, broker: Broker, channel: AbstractRobustChannel, queues: list[str],
                 on_channel: Callable[[aiormq.abc.AbstractChannel], DeliveryCallback],
                 no_ack: bool,
                 before_reconsume: Callable[[], Coroutine[Any, Any, None]] | None = None,
                 on_queue_deleted: Callable[[str], None] | None = None) -> None:
        self.broker = broker
        # Run before consuming again on a reopened channel (a replica reloads tombstones).
        self.before_reconsume = before_reconsume
        # Called with the queue whose consumer RabbitMQ cancelled: the queue was deleted.
        self.on_queue_deleted = on_queue_deleted
        self.channel = channel
        self.queues = queues
        self.on_channel = on_channel
        self.no_ack = no_ack
        self._raw: aiormq.abc.AbstractChannel | None = None
        self._callback: DeliveryCallback | None = None  # `on_channel(self._raw)`
        self._tags: dict[str, str] = {}  # consumer tag -> queue, on `_raw`
        # `_raw` once every queue is consumed on it. Until then a consume was cut short (a
        # timeout, a channel closed meanwhile), and the next registration finishes it.
        self._consuming: aiormq.abc.AbstractChannel | None = None
        self._cancelled = False
        self._registering = asyncio.Lock()  # a reopen and `ensure` must not both consume

    async def start(self) -> Subscription:
        await self._register()
        self.channel.reopen_callbacks.add(self._on_reopen)
        return self

    @property
    def consuming(self) -> bool:
        """Whether every queue is consumed on an open channel (after a reconnect: again)."""
        return self._consuming is not None and not self._consuming.is_closed

    async def _on_reopen(self, *_: Any) -> None:
        if self._cancelled:
            return
        if self.before_reconsume is not None:
            try:
                await self.before_reconsume()
            except BrokerServeError as exc:  # consume anyway: the hook only narrows waste
                log.warning("before consuming %s again: %s", self.queues, exc)
        try:
            await self._register()
        except BrokerServeError as exc:  # closed again already: the next reopen comes back here
            log.warning("could not consume %s again: %s", self.queues, exc)

    async def ensure(self) -> None:
        """Consume again if the channel was reopened and this subscription was not (a
        reopen callback that ran too early, or not at all, would leave it idle for good).
        Cheap when nothing changed: called periodically."""
        if self._cancelled or not self.broker.is_connected:
            return
        try:
            raw = await self.channel.get_underlay_channel()
        except aiormq.exceptions.ChannelInvalidStateError:
            return  # not reopened yet: a later call, or the reopen callback, consumes
        if raw is self._consuming or raw.is_closed:
            return
        log.warning("consuming %s again on a reopened channel", ", ".join(self.queues))
        try:
            # Shielded: a caller's timeout must not cut the consume short.
            await asyncio.shield(self._register())
        except BrokerServeError as exc:
            log.warning("could not consume %s again: %s", self.queues, exc)

    async def _register(self) -> None:
        async with self._registering:
            await self._register_once()

    async def _register_once(self) -> None:
        with map_amqp_errors(f"cannot consume {', '.join(self.queues)}"):
            raw = await self.channel.get_underlay_channel()
            if raw is self._consuming:
                return
            if raw is not self._raw:
                self._raw, self._tags = raw, {}
                self._callback = self.on_channel(raw)
                self.broker.watch(raw)
                raw.on_consumer_cancel_callbacks.add(self._on_broker_cancel)
            assert self._callback is not None
            consumed = set(self._tags.values())
            for queue in self.queues:
                if queue not in consumed:
                    result = await raw.basic_consume(queue, self._callback, no_ack=self.no_ack)
                    if result.consumer_tag:
                        self._tags[result.consumer_tag] = queue
            self._consuming = raw

    def _on_broker_cancel(self, frame: Basic.Cancel) -> None:
        """RabbitMQ cancels a consumer whose queue is deleted; the channel stays open, so no
        reopen would consume again."""
        queue = self._tags.pop(frame.consumer_tag or "", None)
        if queue is not None and not self._cancelled and self.on_queue_deleted is not None:
            self.on_queue_deleted(queue)

    async def cancel(self) -> None:
        """Stop consuming. Deliveries already received are still handed to the callback."""
        self._cancelled = True
        self.channel.reopen_callbacks.discard(self._on_reopen)
        self.broker.stop_waiting_for(self)
        raw = self._raw
        if raw is not None and not raw.is_closed:
            with map_amqp_errors(f"cannot stop consuming {', '.join(self.queues)}"):
                for tag in list(self._tags):
                    await raw.basic_cancel(tag)


async def subscribe(broker: Broker, channel: AbstractRobustChannel, queue: str,
                    callback: DeliveryCallback, *, no_ack: bool) -> Subscription:
    """Consume one queue with the same callback on every underlay channel."""
    return await Subscription(broker, channel, [queue], lambda _raw: callback, no_ack).start()


Event = tuple[str, dict[str, Any]]


class ReplyEvents:
    """The reply events of one request, in order, for its one reader: a queue with no bound
    and one waiter, so each event costs a deque append and at most one future."""

    __slots__ = ("_items", "_waiter", "publishing_durably", "reply_path_lost")

    def __init__(self) -> None:
        self._items: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None
        # Set while a durable publish is retried: a lost connection leaves it to the retry,
        # and sets `reply_path_lost`, so that an attempt it cut short is made again.
        self.publishing_durably = False
        self.reply_path_lost = False

    def __len__(self) -> int:
        """The events received and not yet read."""
        return len(self._items)

    def put_nowait(self, item: Event) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Event:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class ReplyRouter:
    """Consumes this process's reply queue and hands each event to the request waiting for it."""

    def __init__(self, broker: Broker, queue_name: str,
                 on_abandoned: Callable[[list[str]], None] | None = None) -> None:
        self.broker = broker
        self.queue_name = queue_name
        # Called with the ids of the requests failed by a lost connection or channel, which
        # their callers no longer wait for: they are cancelled, so that none runs later.
        self.on_abandoned = on_abandoned
        self._waiting: dict[str, ReplyEvents] = {}
        self._queue: aio_pika.abc.AbstractRobustQueue | None = None

    async def start(self) -> None:
        channel = await self.broker.channel()
        # Held strongly: aio-pika re-declares it after a reconnect.
        with map_amqp_errors(f"cannot declare the reply queue {self.queue_name}"):
            self._queue = await channel.declare_queue(self.queue_name, exclusive=True,
                                                      auto_delete=True)
        replies = await subscribe(self.broker, channel, self.queue_name, self._on_message,
                                  no_ack=True)
        self.broker.publish_after(replies)
        self.broker.on_return(self.returned)
        assert self.broker.connection is not None
        self.broker.connection.close_callbacks.add(self._on_connection_lost)
        self.broker.on_channel_lost(self._on_channel_lost)

    def register(self, correlation_id: str) -> ReplyEvents:
        events = ReplyEvents()
        self._waiting[correlation_id] = events
        return events

    def unregister(self, correlation_id: str) -> None:
        self._waiting.pop(correlation_id, None)

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        properties = message.header.properties
        self.deliver(properties.correlation_id or "", properties.message_type or "",
                     message.body)

    def deliver(self, correlation_id: str, kind: str, body: bytes) -> None:
        """Hand one reply event to the request waiting for it (local testing mode's
        in-process broker calls this too)."""
        events = self._waiting.get(correlation_id)
        if events is None:
            return  # the caller gave up (timeout, disconnect); late events are dropped
        try:
            event = protocol.decode_map(body)
        except ProtocolError as exc:
            event = {"status": 502, "error": "MalformedMessage", "message": str(exc)}
            events.put_nowait((protocol.ERROR, event))
            return
        events.put_nowait((kind, event))

    def _on_connection_lost(self, _sender: Any, exc: BaseException | None) -> None:
        """Replies to this queue may be lost with the connection: fail the waiting requests
        now rather than let them hang. aio-pika reconnects in the background."""
        self._fail_waiting("BrokerConnectionLost", f"the connection to RabbitMQ was lost ({exc})")

    def _on_channel_lost(self) -> None:
        """A lost channel may have taken a request's publish or its replies with it (frames
        for a closed channel are dropped): fail the waiting requests rather than let them
        hang. aio-pika reopens the channel."""
        self._fail_waiting("BrokerChannelLost", "a channel to RabbitMQ was lost")

    def _fail_waiting(self, error: str, what: str) -> None:
        if not self._waiting:
            return
        failing: dict[str, ReplyEvents] = {}
        for correlation_id, events in self._waiting.items():
            if events.publishing_durably:
                events.reply_path_lost = True  # published again (Broker.publish_durably)
            else:
                failing[correlation_id] = events
        if not failing:
            return
        log.warning("%s; failing %d waiting request(s)", what, len(failing))
        event = {"status": 503, "error": error,
                 "message": f"{what}; the request may not have run"}
        for events in failing.values():
            events.put_nowait((protocol.ERROR, dict(event)))
        if self.on_abandoned is not None:
            self.on_abandoned(list(failing))

    def returned(self, correlation_id: str, routing_key: str) -> None:
        """A call's message reached no queue: its deployment does not exist."""
        events = self._waiting.get(correlation_id)
        if events is not None:
            message = f"no queue {routing_key!r}: the deployment does not exist (any more)"
            events.put_nowait((protocol.ERROR, {"status": 503, "error": "NoSuchDeployment",
                                                "message": message}))


def _point_at(connection: AbstractRobustConnection, url: str) -> None:
    """Make aio-pika's next connection attempt go to `url`. The abstract interface has no
    `url`; the one concrete class, `RobustConnection`, keeps it as a plain attribute that
    each attempt reads (aio-pika is pinned: tests/test_transport_contract.py checks it)."""
    if not isinstance(connection, aio_pika.RobustConnection):
        raise TypeError(f"cannot move a {type(connection).__name__} to another node")
    connection.url = URL(url)
