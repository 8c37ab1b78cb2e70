"""After a reconnect, no request goes out before the process's reply queue is consumed again.

The reply queue is exclusive: it goes with the connection, and aio-pika declares and consumes it
again after reconnecting, one channel after another. A request published on the publishing
channel, restored first, could be answered into no queue at all, and its caller would wait in
vain (the once-in-ten failure of tests/test_broker_failover.py's outage test). So `Broker`
publishes a request with a `reply_to` only once every reply subscription consumes again, and
answers `ClusterUnavailable` (a 503) if that takes longer than a moment.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import aiormq
import pika
import pytest

from broker_serve.exceptions import ClusterUnavailable
from broker_serve.transport.broker import Broker, ReplyRouter, Subscription, connection_name

from .conftest import AMQP_URL
from .faults import TcpFaultProxy

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _depth(queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


async def _until_depth(queue: str, depth: int) -> None:
    for _ in range(100):
        if _depth(queue) == depth:
            return
        await asyncio.sleep(0.05)
    assert _depth(queue) == depth


async def test_requests_wait_for_the_reply_queue_after_a_reconnect() -> None:
    requests = f"bs.restore-test.{secrets.token_hex(4)}"
    with TcpFaultProxy("127.0.0.1", 5672) as broker_address:
        broker = Broker(f"amqp://guest:guest@127.0.0.1:{broker_address.port}/",
                        connection_name("restore", "test", secrets.token_hex(3)))
        await broker.connect()
        try:
            channel = await broker.channel()
            await channel.declare_queue(requests, auto_delete=False)
            router = ReplyRouter(broker, f"bs.restore-test.reply.{secrets.token_hex(4)}")
            await router.start()
            # A second reply subscription whose re-consume the test holds back, as a slow
            # restore of the reply channel would.
            released = asyncio.Event()
            released.set()
            replies_channel = await broker.channel()
            replies_queue = await replies_channel.declare_queue(
                f"bs.restore-test.reply.{secrets.token_hex(4)}", exclusive=True,
                auto_delete=True)

            async def hold() -> None:
                await released.wait()

            async def ignore(_message: aiormq.abc.DeliveredMessage) -> None:
                pass

            slow = await Subscription(broker, replies_channel, [replies_queue.name],
                                      lambda _raw: ignore, no_ack=True,
                                      before_reconsume=hold).start()
            broker.publish_after(slow)
            await broker.publish(requests, b"before", type="call", correlation_id="c-0",
                                 reply_to=router.queue_name)
            await _until_depth(requests, 1)

            released.clear()
            broker_address.cut()  # the connection drops; aio-pika reconnects a second later
            for _ in range(100):
                if not broker.is_connected:
                    break
                await asyncio.sleep(0.02)
            assert not broker.is_connected
            assert await broker.wait_connected(10)
            # While the second reply queue is held back, every request with a reply_to is
            # refused, however far aio-pika got with the other channels (it restores them
            # in no fixed order: when the publishing channel came back first, the old code
            # published here).
            refused = 0
            loop = asyncio.get_running_loop()
            until = loop.time() + 3.0
            while loop.time() < until:
                try:
                    await broker.publish(requests, b"too early", type="call",
                                         correlation_id="c-1", reply_to=router.queue_name)
                except ClusterUnavailable:
                    refused += 1
                    await asyncio.sleep(0.05)
                    continue
                pytest.fail("a request went out before its reply queue was consumed again")
            assert refused and not slow.consuming
            assert _depth(requests) == 1  # only the request from before the drop

            released.set()
            for _ in range(100):
                if slow.consuming:
                    break
                await asyncio.sleep(0.05)
            assert slow.consuming
            await broker.publish(requests, b"after", type="call", correlation_id="c-2",
                                 reply_to=router.queue_name)
            await _until_depth(requests, 2)
            await slow.cancel()
        finally:
            await broker.close()
            connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
            connection.channel().queue_delete(requests)
            connection.close()


async def test_a_durable_request_confirmed_as_its_connection_drops_is_published_again() -> None:
    """The confirm is read just before the connection drops, and the drop is reported before
    the publisher resumes: the request was still publishing, so the drop did not fail it, and
    its reply queue went with the connection. It must be published again (its reply then comes
    to the re-declared queue), or its caller waits for nothing (2 lost requests in the chaos
    suite's RabbitMQ node kill)."""
    requests = f"bs.restore-test.{secrets.token_hex(4)}"
    with TcpFaultProxy("127.0.0.1", 5672) as broker_address:
        broker = Broker(f"amqp://guest:guest@127.0.0.1:{broker_address.port}/",
                        connection_name("restore", "test", secrets.token_hex(3)))
        await broker.connect()
        try:
            channel = await broker.channel()
            await channel.declare_queue(requests, durable=True, auto_delete=False)
            router = ReplyRouter(broker, f"bs.restore-test.reply.{secrets.token_hex(4)}")
            await router.start()
            events = router.register("c-1")
            publish_confirmed = broker.publish_confirmed
            attempts = 0

            async def confirmed_then_dropped(*args: Any, **kwargs: Any) -> bool:
                nonlocal attempts
                attempts += 1
                confirmed = await publish_confirmed(*args, **kwargs)
                if attempts == 1:
                    broker_address.cut()
                    for _ in range(250):
                        if not broker.is_connected:
                            break
                        await asyncio.sleep(0.02)
                    await asyncio.sleep(0.1)  # the drop is reported to the waiting requests
                    assert not broker.is_connected
                return confirmed

            broker.publish_confirmed = confirmed_then_dropped  # type: ignore[method-assign]
            published = await broker.publish_request(
                requests, b"request", bounded=False, durable=True, events=events,
                deadline_ms=None, type="call", correlation_id="c-1",
                reply_to=router.queue_name)
            assert published and attempts == 2
            assert len(events) == 0  # not failed: its reply is still to come
            await _until_depth(requests, 2)  # at least once: the first may run too
        finally:
            await broker.close()
            connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
            connection.channel().queue_delete(requests)
            connection.close()
