"""The FrameWriter: what a process writes in one loop turn goes as one frame set, in order, and
frames are handed to aiormq's writer queue only while their channel is open."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from broker_serve.transport import frames
from broker_serve.transport.aiormq_adapter import FrameWriter

from .test_acks_model import BrokerChannel, FakeChannel, Wire


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    loop.close()
    asyncio.set_event_loop(None)


def _channel(wire: Wire, number: int, deliveries: int) -> FakeChannel:
    channel = wire.channels[number] = FakeChannel(number, BrokerChannel())
    for _ in range(deliveries):
        channel.broker.deliver()
    return channel


def test_one_loop_turn_is_one_frame_set_in_the_order_written(
        loop: asyncio.AbstractEventLoop) -> None:
    wire = Wire(maxsize=10, stalls=[0])
    first, second = _channel(wire, 1, 3), _channel(wire, 2, 3)
    writer = FrameWriter(wire)  # type: ignore[arg-type]

    async def scenario() -> list[Any]:
        for tag in (1, 2, 3):
            writer.write(first, frames.ack(1, tag, multiple=False))
            writer.write(second, frames.ack(2, tag, multiple=False))
        await asyncio.sleep(0)  # the end of the turn
        return [wire.queue.get_nowait() for _ in range(wire.queue.qsize())]

    [(frame, _)] = loop.run_until_complete(scenario())
    assert frame.payload == b"".join(
        frames.ack(n, tag, multiple=False) for tag in (1, 2, 3) for n in (1, 2))


def test_frames_wait_for_room_in_order_and_those_of_a_channel_closed_meanwhile_are_dropped(
        loop: asyncio.AbstractEventLoop) -> None:
    wire = Wire(maxsize=1, stalls=[0])
    kept, closing = _channel(wire, 1, 4), _channel(wire, 2, 4)
    writer = FrameWriter(wire)  # type: ignore[arg-type]

    async def scenario() -> None:
        wire.queue.put_nowait(_Filler())  # the writer is behind: no room
        writer.write(kept, frames.ack(1, 1, multiple=False))
        writer.write(closing, frames.ack(2, 1, multiple=False))
        await asyncio.sleep(0)
        writer.write(kept, frames.ack(1, 2, multiple=False))
        closing.is_closed = True  # the broker closed it while its frames waited
        reader = asyncio.ensure_future(wire.run())
        await asyncio.wait_for(writer.drain(), 5)
        reader.cancel()

    loop.run_until_complete(scenario())
    assert not wire.errors, "a frame of a closed channel was handed over"
    assert kept.broker.acked == {1, 2} and not kept.broker.errors
    assert closing.broker.acked == set()


def test_drain_fails_once_the_connection_closes(loop: asyncio.AbstractEventLoop) -> None:
    wire = Wire(maxsize=1, stalls=[0])
    channel = _channel(wire, 1, 1)
    writer = FrameWriter(wire)  # type: ignore[arg-type]

    async def scenario() -> None:
        wire.queue.put_nowait(_Filler())  # nobody will take it: the connection is gone
        writer.write(channel, frames.ack(1, 1, multiple=False))
        draining = asyncio.ensure_future(writer.drain())
        await asyncio.sleep(0.01)
        wire.closing.set_result(None)
        with pytest.raises(Exception, match="closed"):
            await asyncio.wait_for(draining, 1)

    loop.run_until_complete(scenario())


class _Filler:
    payload = b""

    def drain(self) -> None:
        pass
