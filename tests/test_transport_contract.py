"""What broker-serve's transport relies on in aio-pika, aiormq and pamqp, checked against the
real broker.

`broker_serve/_aiormq_fastpath.py` queues pre-encoded publishes on aiormq's writer queue, below
its public API. These tests break if the libraries change how they write frames or track
channels, or if other versions than the tested ones are installed. The settler's acks and
rejects are driven in random orders against a real channel: RabbitMQ closes the channel on any
ack it does not accept, and the suite fails on any such error in RabbitMQ's log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import random
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import aiormq
import anyio
import pika
import pytest
from aiormq.abc import ChannelFrame

from broker_serve.transport import aiormq_adapter, frames
from broker_serve.transport.acks import Settler
from broker_serve.transport.broker import Broker, ReplyRouter, Subscription, connection_name

from .conftest import AMQP_URL

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_installed_versions_are_the_tested_ones() -> None:
    installed = {name: importlib.metadata.version(name) for name in aiormq_adapter.TESTED_VERSIONS}
    assert installed == aiormq_adapter.TESTED_VERSIONS, (
        "re-run tests/test_transport_contract.py against the new versions, then update "
        "TESTED_VERSIONS and the pins in pyproject.toml")


async def test_a_queued_frame_set_is_aiormqs_own_shape() -> None:
    fields = [(f.name, f.default) for f in dataclasses.fields(ChannelFrame)]
    assert fields == [("payload", dataclasses.MISSING), ("should_close", dataclasses.MISSING),
                      ("drain_future", None)]


async def test_a_closed_connection_is_seen_by_its_writer(broker: Broker) -> None:
    raw = await broker._channel()
    connection = raw.connection
    writer = broker.frame_writer(raw)
    assert not connection.closing.done()
    await broker.close()
    assert connection.closing.done() and raw.is_closed
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        await writer.drain()


@pytest.fixture
def queue_name() -> Iterator[str]:
    name = f"bs.contract.{secrets.token_hex(4)}"
    yield name
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.queue_delete(name)
    channel.queue_delete(f"{name}.dead")
    connection.close()


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    broker = Broker(AMQP_URL, connection_name("contract", "test", secrets.token_hex(3)))
    await broker.connect()
    try:
        yield broker
    finally:
        await broker.close()


def _get(queue: str) -> tuple[Any, bytes] | None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        method, properties, body = connection.channel().basic_get(queue, auto_ack=True)
        return (properties, body) if method is not None else None
    finally:
        connection.close()


async def _arrived(queue: str) -> tuple[Any, bytes]:
    """The next message in `queue`, read by another client (pika, in a thread), within 10 s."""
    with anyio.fail_after(10):
        while (got := await anyio.to_thread.run_sync(_get, queue)) is None:
            await anyio.sleep(0.02)
    return got


async def test_frame_sets_go_through_the_connections_writer_and_arrive_verbatim(
        broker: Broker, queue_name: str) -> None:
    channel = await broker.channel()
    await channel.declare_queue(queue_name)
    raw = await broker._channel()
    assert raw.write_queue is raw.connection.write_queue  # type: ignore[attr-defined]
    frame_max = raw.connection.connection_tune.frame_max
    assert aiormq_adapter.max_body_frame(raw) == frame_max - 8
    assert frame_max - 8 == raw.max_content_size  # what aiormq cuts bodies by
    writer = broker.frame_writer(raw)
    headers = {"bs-version": 1, "bs-published-us": 1_795_000_000_123_456}
    small, large = bytes(range(256)) * 40, bytes(range(256)) * (3 * frame_max // 256 + 7)
    for body in (small, large):  # one body frame, and several
        writer.write(raw, frames.publish(
            raw.number, queue_name, body, content_type="application/msgpack",
            message_type="http", correlation_id="c-1", reply_to="r-1", message_id="c-1",
            headers=headers, expiration="60000",
            max_body_frame=aiormq_adapter.max_body_frame(raw)))
    await writer.drain()
    properties, received = await _arrived(queue_name)
    assert received == small
    assert (properties.content_type, properties.type, properties.correlation_id,
            properties.reply_to, properties.message_id, properties.expiration,
            properties.delivery_mode) == ("application/msgpack", "http", "c-1", "r-1", "c-1",
                                          "60000", 1)
    assert properties.headers == headers
    assert (await _arrived(queue_name))[1] == large


async def test_a_closed_channel_takes_no_frame_and_its_reopened_successor_serves(
        broker: Broker, queue_name: str) -> None:
    """Closing the publisher's aiormq channel: it refuses frames from then on, aio-pika opens
    a new one (which may reuse the number once the broker confirmed the close), and publishes
    go there. A frame written for the old number would be a connection error in RabbitMQ's
    log, which fails this test."""
    channel = await broker.channel()
    await channel.declare_queue(queue_name)
    old = await broker._channel()
    await old.close()
    assert old.is_closed
    with pytest.raises(aiormq.exceptions.ChannelInvalidStateError):
        broker.frame_writer(old).write(old, b"")
    assert broker._publisher is not None
    new = await asyncio.wait_for(_reopened(broker._publisher, old), 10)
    assert not new.is_closed and new.connection.channels.get(new.number) is new
    await broker.publish(queue_name, b"after", type="call", correlation_id="c-2")
    assert (await _arrived(queue_name))[1] == b"after"


async def _reopened(channel: aio_pika.abc.AbstractRobustChannel,
                    old: aiormq.abc.AbstractChannel) -> aiormq.abc.AbstractChannel:
    while True:
        try:
            raw = await channel.get_underlay_channel()
        except aiormq.exceptions.ChannelInvalidStateError:
            raw = None
        if raw is not None and raw is not old and not raw.is_closed:
            return raw
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("seed", range(3))
async def test_settled_in_random_orders_on_a_real_channel(broker: Broker, queue_name: str,
                                                         seed: int) -> None:
    """300 deliveries, prefetch 32, finished in random order after random work, one in ten
    rejected: the channel stays open, every ack is accepted, the rejected ones (and only
    they) are dead-lettered, and nothing is left."""
    rng = random.Random(seed)
    total, prefetch = 300, 32
    channel = await broker.channel(prefetch=prefetch)
    await channel.declare_queue(f"{queue_name}.dead")
    await channel.declare_queue(queue_name, arguments={
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue_name}.dead"})
    for i in range(total):
        await broker.publish(queue_name, str(i).encode(), type="call", correlation_id=str(i))
    raw = await channel.get_underlay_channel()
    settler = Settler(raw, broker.frame_writer(raw), prefetch)
    done, rejected = asyncio.Event(), set()
    seen: list[int] = []
    tasks: set[asyncio.Task[None]] = set()

    async def work(tag: int, number: int) -> None:
        await asyncio.sleep(rng.choice([0, 0, 0, 0.0005, 0.002, 0.02]))
        if rng.random() < 0.1:
            rejected.add(number)
            settler.rejected(tag)
        else:
            settler.finished(tag)
        if len(seen) == total and all(t.done() or t is asyncio.current_task() for t in tasks):
            done.set()

    async def on_message(message: aiormq.abc.DeliveredMessage) -> None:
        tag = message.delivery.delivery_tag  # type: ignore[union-attr]
        settler.delivered(tag, message.header.properties.correlation_id or "")
        seen.append(int(message.body))
        task = asyncio.ensure_future(work(tag, int(message.body)))
        tasks.add(task)

    await raw.basic_consume(queue_name, on_message, no_ack=False)
    await asyncio.wait_for(done.wait(), 30)
    await settler.drain()
    assert sorted(seen) == list(range(total)), "a delivery came twice or not at all"
    assert not raw.is_closed, "RabbitMQ closed the channel: it refused a settlement"
    assert len(settler.ledger) == 0
    await channel.close()  # anything unacked would now go back to the queue
    counts = await _message_counts(broker, [queue_name, f"{queue_name}.dead"])
    assert counts == [0, len(rejected)]


async def _message_counts(broker: Broker, queues: list[str]) -> list[int]:
    channel = await broker.channel()
    try:
        counts = []
        for name in queues:
            declared = await channel.declare_queue(name, passive=True)
            counts.append(int(declared.declaration_result.message_count or 0))
        return counts
    finally:
        await channel.close()


async def test_requests_waiting_when_a_channel_is_lost_fail_instead_of_hanging(
        broker: Broker) -> None:
    """Frames for a channel that closed are dropped, so a request published just before may
    never have left: every waiting request is answered 503."""
    router = ReplyRouter(broker, f"bs.contract.reply.{secrets.token_hex(4)}")
    await router.start()
    events = router.register("c-1")
    lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    lost.set_exception(aiormq.exceptions.ChannelPreconditionFailed("as RabbitMQ closes it"))
    broker._on_channel_closed(lost)  # what a watched channel's `closing` does
    kind, event = await asyncio.wait_for(events.get(), 1)
    assert (kind, event["status"], event["error"]) == ("error", 503, "BrokerChannelLost")
    assert broker.channels_lost == 1


async def test_a_robust_connection_makes_its_next_attempt_to_the_url_it_is_given() -> None:
    """The transport moves a lost connection to the next node by setting aio-pika's `url`
    (broker.py, `_point_at`): each reconnection attempt must read it."""
    from .faults import TcpFaultProxy

    with TcpFaultProxy("127.0.0.1", 5672) as first, TcpFaultProxy("127.0.0.1", 5672) as second:
        broker = Broker(f"amqp://guest:guest@127.0.0.1:{first.port},127.0.0.1:{second.port}/",
                        connection_name("contract", "test", secrets.token_hex(3)))
        await broker.connect()
        connection = broker.connection
        assert isinstance(connection, aio_pika.RobustConnection)
        try:
            port = connection.url.port
            dying = first if port == first.port else second
            dying.down()
            with anyio.fail_after(10):
                while not broker.is_connected or connection.url.port == port:
                    await asyncio.sleep(0.05)
            assert connection.transport is not None
            assert connection.url.port != port
            await broker.publish("no-such-queue", b"", type="call", correlation_id="x")
        finally:
            await broker.close()


async def test_a_returned_confirmed_publish_is_told_from_an_acked_one(broker: Broker,
                                                                      queue_name: str) -> None:
    """aiormq completes the confirm of a `mandatory` message that no queue took with the
    returned message, not an ack (aio-pika's channels do not raise on returns):
    `refuse_returned` turns that into False, as jobs need to refuse a job for a missing queue."""
    channel = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel.channel().queue_declare(queue_name)
    channel.close()
    common: dict[str, Any] = {"type": "call", "correlation_id": "c", "message_id": "m",
                              "mandatory": True, "refuse_returned": True}
    assert await broker.publish_confirmed(queue_name, b"x", **common) is True
    assert await broker.publish_confirmed(f"{queue_name}.missing", b"x", **common) is False
    assert _get(queue_name) is not None


async def test_a_consume_cut_short_is_finished_by_the_next_check(
        broker: Broker, queue_name: str) -> None:
    """A registration cancelled between its consumes (a caller's timeout) must not leave the
    subscription idle: `ensure` consumes what is missing, and nothing is consumed twice."""
    second_queue = f"{queue_name}.second"
    channel = await broker.channel(prefetch=10)
    for name in (queue_name, second_queue):
        await channel.declare_queue(name, auto_delete=True)
    received: list[bytes] = []
    arrived = asyncio.Event()

    async def on_delivery(message: aiormq.abc.DeliveredMessage) -> None:
        received.append(message.body)
        await message.channel.basic_ack(message.delivery.delivery_tag)
        arrived.set()

    subscription = Subscription(broker, channel, [queue_name, second_queue],
                                lambda _raw: on_delivery, no_ack=False)
    registering = asyncio.create_task(subscription._register())
    await asyncio.sleep(0)  # it is inside its first consume now
    registering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await registering
    await subscription.ensure()
    try:
        raw = await broker._channel()
        for name in (queue_name, second_queue):
            await raw.basic_publish(name.encode(), routing_key=name)
        with anyio.fail_after(10):
            while len(received) < 2:
                arrived.clear()
                await arrived.wait()
        assert sorted(received) == sorted([queue_name.encode(), second_queue.encode()])
    finally:
        await subscription.cancel()
