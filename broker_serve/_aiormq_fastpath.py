"""The one place broker-serve goes below aiormq's public API: queueing pre-encoded publishes.

`aiormq.Channel.basic_publish` marshals every frame through pamqp (about 14 us for a request
message) and takes the channel's lock. broker-serve's messages always have the same shape, so
`_frames.publish` encodes them in about 3 us, byte-identical to pamqp. This module hands those
bytes to the connection's writer the way aiormq itself does: one `ChannelFrame` on the queue
its writer task drains, which writes each payload whole, in queue order.

What this relies on, and what tests/test_transport_contract.py checks against a real broker:
- a channel's `write_queue` is its connection's writer queue, and the writer writes
  `ChannelFrame.payload` verbatim, so a frame set queued whole is never interleaved;
- `ChannelFrame(payload=..., should_close=False)` is how aiormq queues a frame set;
- a channel is `is_closed` once the broker or the client has closed it, and keeps its number
  until the broker has confirmed the close, so a publish queued while it is open lands on it;
- `max_content_size` is the largest body that fits one body frame.

The versions below are the ones that contract was tested with; pyproject.toml pins them, and
the contract test fails if another version is installed.

Ordering: a publish that finds the queue full waits for room, as aiormq's own `basic_publish`
does, and a publish made meanwhile may overtake it. Each request's events are published one
after another (each waits for the one before), and a delivery is acked only after its reply is
queued, so what is overtaken is always another request's message. Like `basic_publish`, a frame
that waited is written even if its channel closed meanwhile; broker-serve's publishing channels
close only with their connection.
"""

from __future__ import annotations

import asyncio

import aiormq
from aiormq.abc import ChannelFrame

TESTED_VERSIONS = {"aio-pika": "10.2.1", "aiormq": "7.2.4", "pamqp": "4.0.1"}


def fits_one_frame(channel: aiormq.abc.AbstractChannel, body: bytes) -> bool:
    """Whether `_frames.publish` can encode this body (one body frame)."""
    return len(body) < channel.max_content_size  # type: ignore[attr-defined, no-any-return]


async def enqueue(channel: aiormq.abc.AbstractChannel, payload: bytes) -> None:
    """Queue a publish's encoded frames on the channel's connection writer.

    Raises ChannelInvalidStateError if the channel is closed."""
    if channel.is_closed:
        raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
    queue: asyncio.Queue[ChannelFrame] = channel.write_queue  # type: ignore[attr-defined]
    frame = ChannelFrame(payload=payload, should_close=False)
    try:
        queue.put_nowait(frame)
    except asyncio.QueueFull:  # the writer is behind: wait for room, as basic_publish does
        await queue.put(frame)
