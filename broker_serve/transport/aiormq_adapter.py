"""The one place broker-serve goes below aiormq's public API: writing pre-encoded frames.

`aiormq.Channel.basic_publish` marshals every frame through pamqp (about 14 us for a request
message) and takes the channel's lock, and each publish or ack becomes its own write to the
socket. broker-serve's frames always have the same shapes, so `_frames.py` encodes them in
about 3 us, byte-identical to pamqp, and a `FrameWriter` joins the frame sets one process
writes in one turn of the event loop into one `ChannelFrame` on the connection's writer queue:
one socket write, and one read for RabbitMQ, instead of one per message.

What this relies on, and what tests/test_transport_contract.py checks against a real broker:
- a channel's `write_queue` is its connection's writer queue, and the writer writes each
  `ChannelFrame.payload` verbatim and whole, in queue order, and sets `drain_future` once the
  socket has taken it;
- `ChannelFrame(payload=..., should_close=False, drain_future=...)` is how aiormq queues frames;
- a channel is `is_closed` once the broker or the client has closed it, and keeps its number
  until the broker has confirmed the close, so frames for a channel that is open when they are
  handed to the writer land on it;
- a connection's `closing` future is done once it is closed, and its writer then takes nothing;
- a body frame carries at most `frame_max` - 8 bytes (`connection_tune`).

The versions below are the ones that contract was tested with; pyproject.toml pins them, and
the contract test fails if another version is installed.

Ordering: every frame set a process writes through its connection's `FrameWriter` reaches the
socket in the order it was written, across channels: a request's events in order, and a
delivery's ack after its reply. Frames are handed to the writer only when its queue (10 frame
sets) has room, in the same step that checks their channel is open; frames of a channel that
closed before are dropped, since the broker requeues what such a channel had not settled.
(aiormq's own `basic_publish` waits for room holding its frames, so they can reach the socket
after their channel closed, and land on a channel that reuses the number.)
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import aiormq
from aiormq.abc import ChannelFrame

TESTED_VERSIONS = {"aio-pika": "10.2.1", "aiormq": "7.2.4", "pamqp": "4.0.1"}
# Waiting for room in a full writer queue: this many loop turns, then a poll this often.
ROOM_TURNS = 10
ROOM_POLL_S = 0.001
_FRAME_OVERHEAD = 8  # a frame's type, channel and size before its payload, and its end octet


def max_body_frame(channel: aiormq.abc.AbstractChannel) -> int:
    """The largest body one frame carries on this channel's connection (0: no limit)."""
    frame_max = int(channel.connection.connection_tune.frame_max or 0)
    return frame_max - _FRAME_OVERHEAD if frame_max else 0


class FrameWriter:
    """The frame sets this process writes on one aiormq connection, in order."""

    def __init__(self, connection: aiormq.abc.AbstractConnection) -> None:
        self.connection = connection
        self._queue: asyncio.Queue[ChannelFrame] = connection.write_queue
        self._pending: list[tuple[aiormq.abc.AbstractChannel, bytes]] = []
        self._drains: list[asyncio.Future[Any]] = []  # ride on the next frame set handed over
        self._scheduled = False
        self._waiting: asyncio.Task[None] | None = None  # a hand-over waiting for room
        connection.closing.add_done_callback(self._on_closed)

    def write(self, channel: aiormq.abc.AbstractChannel, frames: bytes) -> None:
        """Queue encoded frames for `channel`; they go to the connection's writer at the end
        of this loop turn. Raises ChannelInvalidStateError if the channel is closed."""
        if channel.is_closed:
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        self._pending.append((channel, frames))
        if not self._scheduled and self._waiting is None:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    async def drain(self) -> None:
        """Hand everything written so far to the connection's writer at once, and wait until
        the socket has taken it: a slow broker pushes back, and closing loses nothing. Raises
        ChannelInvalidStateError if the connection closes first."""
        closing = self.connection.closing
        if closing.done():
            raise aiormq.exceptions.ChannelInvalidStateError("the connection is closed")
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._drains.append(done)
        if self._waiting is None:
            self._hand_over()
        await asyncio.wait([done, closing], return_when=asyncio.FIRST_COMPLETED)
        if not done.done():
            raise aiormq.exceptions.ChannelInvalidStateError("the connection closed")

    def _flush(self) -> None:
        self._scheduled = False
        if self._waiting is None:
            self._hand_over()

    def _hand_over(self) -> None:
        if not self._pending and not self._drains:
            return
        if self._queue.full():  # the writer is behind: wait for room, then take what is open
            self._waiting = asyncio.ensure_future(self._hand_over_when_room())
            return
        frame = self._take()
        if frame is not None:
            self._queue.put_nowait(frame)

    async def _hand_over_when_room(self) -> None:
        """Frames are taken only once they can be handed over at once: a frame set never
        waits with frames of a channel that might close meanwhile. The writer frees a slot
        each loop turn unless the socket is full, so a few turns usually do; then it polls."""
        try:
            for turn in itertools.count():
                await asyncio.sleep(0 if turn < ROOM_TURNS else ROOM_POLL_S)
                if not self._queue.full():
                    if (frame := self._take()) is not None:
                        self._queue.put_nowait(frame)
                    return
        finally:
            self._waiting = None

    def _take(self) -> ChannelFrame | None:
        """What was written, as one frame set; frames of channels closed since are dropped."""
        payload = b"".join(frames for channel, frames in self._pending if not channel.is_closed)
        drains, self._drains = self._drains, []
        self._pending.clear()
        if not payload and not drains:
            return None
        return ChannelFrame(payload=payload, should_close=False, drain_future=_one(drains))

    def _on_closed(self, _: asyncio.Future[Any]) -> None:
        self._pending.clear()  # nothing reads the queue any more; drain() sees the close
        self._drains.clear()
        if self._waiting is not None:
            self._waiting.cancel()


def _one(drains: list[asyncio.Future[Any]]) -> asyncio.Future[Any] | None:
    """One drain future that settles all of `drains`."""
    if len(drains) <= 1:
        return drains[0] if drains else None
    first = drains[0]

    def settle_the_others(_: asyncio.Future[Any]) -> None:
        for other in drains[1:]:
            if not other.done():
                other.set_result(None)

    first.add_done_callback(settle_the_others)
    return first
