"""One AMQP connection per process, long-lived channels, and the reply router.

Publishing goes straight to the aiormq channel under aio-pika's robust channel: building
aio-pika `Message` objects costs more than the publish itself, and nothing on the request path
opens a channel.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import ChannelFrame
from pamqp.commands import Basic

from . import _frames, protocol
from .exceptions import ClusterUnavailable

log = logging.getLogger("broker_serve.broker")

ReturnHandler = Callable[[str, str], None]

# Publishes return once queued to the connection's writer, without waiting for the socket to
# drain: that wait is a full turn of the event loop per message. After this many bytes one
# publish waits, so a slow broker still pushes back and unsent data stays bounded.
UNDRAINED_LIMIT_BYTES = 256 * 1024
RawCallback = Callable[[aiormq.abc.DeliveredMessage], Awaitable[None]]


class Broker:
    def __init__(self, url: str, name: str) -> None:
        self.url = url
        self.name = name
        self.connection: AbstractRobustConnection | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._confirming: AbstractRobustChannel | None = None
        self._raw: aiormq.abc.AbstractChannel | None = None
        self._return_handlers: list[ReturnHandler] = []
        self._undrained = 0

    async def connect(self) -> None:
        """Connect once; the first attempt fails fast, later drops are retried by aio-pika."""
        try:
            self.connection = await aio_pika.connect_robust(
                self.url, client_properties={"connection_name": self.name}, timeout=10
            )
        except (OSError, aiormq.exceptions.AMQPError, asyncio.TimeoutError) as exc:
            raise ClusterUnavailable(f"cannot reach RabbitMQ at {_safe(self.url)}: {exc}") from exc
        self._publisher = await self.channel()
        self._publisher.return_callbacks.add(self._on_return)
        assert self.connection is not None
        self._confirming = await self.connection.channel(publisher_confirms=True)
        self._confirming.return_callbacks.add(self._on_return)

    async def channel(self, prefetch: int = 0) -> AbstractRobustChannel:
        assert self.connection is not None, "connect() first"
        channel: AbstractRobustChannel = await self.connection.channel(publisher_confirms=False)
        if prefetch:
            await channel.set_qos(prefetch_count=prefetch)
        return channel

    async def close(self) -> None:
        if self.connection is not None:
            await self.connection.close()
            self.connection = None

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
        mandatory: bool = False,
        exchange: str = "",
    ) -> None:
        raw = await self._channel()
        message_id = correlation_id if reply_to else None
        self._undrained += len(body) + 256
        wait = self._undrained >= UNDRAINED_LIMIT_BYTES
        try:
            if not wait and len(body) < raw.max_content_size:
                # The common case: one frame set, queued whole to the connection's writer, so
                # it cannot interleave with another publish and needs no channel lock.
                payload = _frames.publish(
                    raw.number, routing_key, body, content_type=protocol.CONTENT_TYPE,
                    message_type=type, correlation_id=correlation_id, reply_to=reply_to,
                    message_id=message_id, headers=headers, expiration=expiration,
                    mandatory=mandatory, exchange=exchange,
                )
                frame = ChannelFrame(payload=payload, should_close=False)
                try:
                    raw.write_queue.put_nowait(frame)
                except asyncio.QueueFull:
                    await raw.write_queue.put(frame)
                return
            self._undrained = 0
            properties = Basic.Properties(
                content_type=protocol.CONTENT_TYPE, message_type=type,
                correlation_id=correlation_id, message_id=message_id, reply_to=reply_to,
                headers=headers, expiration=expiration, delivery_mode=1,
            )
            await raw.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                    properties=properties, mandatory=mandatory, wait=True)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            self._raw = None
            raise ClusterUnavailable(f"publish to RabbitMQ failed: {exc}") from exc

    async def publish_confirmed(self, routing_key: str, body: bytes, *, type: str,
                                correlation_id: str, reply_to: str | None = None,
                                headers: dict[str, Any] | None = None,
                                expiration: str | None = None, mandatory: bool = False) -> bool:
        """Publish and wait for the broker's confirm. False: the broker refused the message
        (a bounded queue is full). Only publishes to bounded queues pay for this wait."""
        if self._confirming is None:
            raise ClusterUnavailable("not connected to RabbitMQ")
        properties = Basic.Properties(
            content_type=protocol.CONTENT_TYPE, message_type=type, correlation_id=correlation_id,
            message_id=correlation_id if reply_to else None, reply_to=reply_to, headers=headers,
            expiration=expiration, delivery_mode=1,
        )
        try:
            raw = await self._confirming.get_underlay_channel()
            await raw.basic_publish(body, routing_key=routing_key, properties=properties,
                                    mandatory=mandatory)
        except aiormq.exceptions.DeliveryError:
            return False  # nacked: the queue is at its bound
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            raise ClusterUnavailable(f"publish to RabbitMQ failed: {exc}") from exc
        return True

    async def _channel(self) -> aiormq.abc.AbstractChannel:
        """The open aiormq channel under the publishing channel."""
        raw = self._raw
        if raw is not None and not raw.is_closed:
            return raw
        if self._publisher is None:
            raise ClusterUnavailable("not connected to RabbitMQ")
        try:
            raw = self._raw = await self._publisher.get_underlay_channel()
        except aiormq.exceptions.AMQPError as exc:
            raise ClusterUnavailable(f"RabbitMQ connection is down: {exc}") from exc
        if raw.is_closed:
            raise ClusterUnavailable("RabbitMQ connection is down")
        return raw


class RawConsumer:
    """A consumer on the aiormq channel under a robust aio-pika channel.

    The hot consumers skip aio-pika's per-message `IncomingMessage` objects. aio-pika re-declares
    the channel's queues after a reconnect; this re-registers the consumer right after.
    """

    def __init__(self, channel: AbstractRobustChannel, queue: str, callback: RawCallback,
                 no_ack: bool) -> None:
        self.channel = channel
        self.queue = queue
        self.callback = callback
        self.no_ack = no_ack
        self.tag: str | None = None
        self._raw: aiormq.abc.AbstractChannel | None = None

    async def start(self) -> RawConsumer:
        await self._register()
        self.channel.reopen_callbacks.add(self._on_reopen)
        return self

    async def _on_reopen(self, *_: Any) -> None:
        await self._register()

    async def _register(self) -> None:
        self._raw = await self.channel.get_underlay_channel()
        result = await self._raw.basic_consume(self.queue, self.callback, no_ack=self.no_ack)
        self.tag = result.consumer_tag

    async def cancel(self) -> None:
        self.channel.reopen_callbacks.discard(self._on_reopen)
        if self._raw is not None and self.tag is not None and not self._raw.is_closed:
            await self._raw.basic_cancel(self.tag)


async def consume_raw(channel: AbstractRobustChannel, queue: str, callback: RawCallback, *,
                      no_ack: bool) -> RawConsumer:
    return await RawConsumer(channel, queue, callback, no_ack).start()


Event = tuple[str, dict[str, Any]]


class Mailbox:
    """The reply events of one request, in order, for its one reader.

    Unlike an asyncio.Queue it lets the reader see what has already arrived, so the proxy can
    pass several waiting body chunks to the client in one write.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None

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

    def peek(self) -> Event | None:
        return self._items[0] if self._items else None

    def get_nowait(self) -> Event:
        return self._items.popleft()


class ReplyRouter:
    """Consumes this process's reply queue and hands each event to the request waiting for it."""

    def __init__(self, broker: Broker, queue_name: str) -> None:
        self.broker = broker
        self.queue_name = queue_name
        self._waiting: dict[str, Mailbox] = {}
        self._queue: aio_pika.abc.AbstractRobustQueue | None = None

    async def start(self) -> None:
        channel = await self.broker.channel()
        # Held strongly: aio-pika re-declares and re-consumes it after a reconnect.
        self._queue = await channel.declare_queue(self.queue_name, exclusive=True, auto_delete=True)
        await consume_raw(channel, self.queue_name, self._on_message, no_ack=True)
        self.broker.on_return(self._on_return)
        assert self.broker.connection is not None
        self.broker.connection.close_callbacks.add(self._on_connection_lost)

    def register(self, correlation_id: str) -> Mailbox:
        queue = Mailbox()
        self._waiting[correlation_id] = queue
        return queue

    def unregister(self, correlation_id: str) -> None:
        self._waiting.pop(correlation_id, None)

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        properties = message.header.properties
        queue = self._waiting.get(properties.correlation_id or "")
        if queue is None:
            return  # the caller gave up (timeout, disconnect); late events are dropped
        try:
            event = protocol.decode_map(message.body)
        except protocol.ProtocolError as exc:
            event = {"status": 502, "error": "MalformedMessage", "message": str(exc)}
            queue.put_nowait((protocol.ERROR, event))
            return
        queue.put_nowait((properties.message_type or "", event))

    def _on_connection_lost(self, _sender: Any, exc: BaseException | None) -> None:
        """Replies to this queue may be lost with the connection: fail the waiting requests
        now rather than let them hang. aio-pika reconnects in the background."""
        if not self._waiting:
            return
        log.warning("RabbitMQ connection lost (%s); failing %d waiting request(s)", exc,
                    len(self._waiting))
        event = {"status": 503, "error": "BrokerConnectionLost",
                 "message": "the connection to RabbitMQ was lost; the request may not have run"}
        for queue in self._waiting.values():
            queue.put_nowait((protocol.ERROR, dict(event)))

    def _on_return(self, correlation_id: str, routing_key: str) -> None:
        queue = self._waiting.get(correlation_id)
        if queue is not None:
            message = f"no queue {routing_key!r}: the deployment does not exist (any more)"
            queue.put_nowait((protocol.ERROR, {"status": 503, "error": "NoSuchDeployment",
                                               "message": message}))


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1) if "://" in url else ("", url)
    return f"{scheme}://{rest.split('@', 1)[1]}"
