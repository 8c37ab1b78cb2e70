"""Settling the deliveries of one consume channel: acks in batches, rejects, in order.

A replica acks a request only after its reply is published. Under load many requests finish
within a millisecond of each other, and one `basic.ack(multiple=True)` settles them all: a
frame, a write and broker work saved per request.

RabbitMQ's rules, which every settlement here keeps:
- the tag named must be unacked on the channel, or the broker closes the channel
  (`PRECONDITION_FAILED - unknown delivery tag`), which requeues everything on it;
- `multiple=True` settles every unacked delivery up to and including that tag.

`AckLedger` decides what to send. It knows every unsettled delivery of its channel, so a
multiple ack reaches only up to the lowest delivery still running, and finished deliveries
above it are acked one by one (a long stream holds a low tag; the others must not hold prefetch
slots meanwhile). Its decisions are correct for the order it makes them in, so `Settler` writes
them in exactly that order, synchronously, through the connection's `FrameWriter`: no two
writes race for the connection's write queue. A ledger belongs to one channel; a reopened
channel starts a new one, and the old channel's unsettled deliveries are the broker's to
redeliver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import NamedTuple

import aiormq

from . import frames
from .aiormq_adapter import FrameWriter
from .errors import map_amqp_errors


class Settlement(NamedTuple):
    tag: int
    multiple: bool = False
    reject: bool = False  # basic.reject without requeue: dead-lettered


class AckLedger:
    """The unsettled deliveries of one channel, and the settlements that clear them."""

    def __init__(self) -> None:
        # tag -> (finished?, correlation id); tags arrive ascending, so the dict is in tag order.
        self._open: dict[int, tuple[bool, str]] = {}
        self.finished_count = 0

    def __len__(self) -> int:
        return len(self._open)

    def delivered(self, tag: int, correlation_id: str = "") -> None:
        self._open[tag] = (False, correlation_id)

    def finished(self, tag: int) -> None:
        """The delivery's reply is published: ack it with the next flush."""
        entry = self._open.get(tag)
        if entry is not None and not entry[0]:
            self._open[tag] = (True, entry[1])
            self.finished_count += 1

    def reject(self, tag: int) -> Settlement | None:
        """Settle the delivery by rejecting it now (None: it is not unsettled here)."""
        entry = self._open.pop(tag, None)
        if entry is None:
            return None
        if entry[0]:
            self.finished_count -= 1
        return Settlement(tag, reject=True)

    def flush(self) -> list[Settlement]:
        """The acks that settle every finished delivery, and nothing else."""
        if not self.finished_count:
            return []
        below: list[int] = []  # finished, below the lowest running delivery: one ack
        above: list[int] = []  # finished, above it: an ack each
        running_seen = False
        for tag, (finished, _) in self._open.items():
            if not finished:
                running_seen = True
            else:
                (above if running_seen else below).append(tag)
        for tag in (*below, *above):
            del self._open[tag]
        self.finished_count = 0
        settlements = [Settlement(below[-1], multiple=len(below) > 1)] if below else []
        return settlements + [Settlement(tag) for tag in above]

    def unsettled(self) -> Iterator[tuple[int, bool, str]]:
        """(tag, finished, correlation id) of each delivery not settled yet."""
        for tag, (finished, correlation_id) in self._open.items():
            yield tag, finished, correlation_id


class Settler:
    """Sends one channel's settlements in the order its ledger decides them.

    Acks of finished deliveries wait at most `window_s`, or go at once when a quarter of the
    prefetch window is finished. Rejects go at once. They are written through the connection's
    `FrameWriter`, which keeps the order of everything the process writes: a delivery's ack
    reaches the socket after its reply.
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel, writer: FrameWriter, prefetch: int,
                 window_s: float = 0.001) -> None:
        self.channel = channel
        self.ledger = AckLedger()
        self._writer = writer
        self._threshold = max(1, prefetch // 4)
        self._window_s = window_s
        self._timer: asyncio.TimerHandle | None = None

    def delivered(self, tag: int, correlation_id: str) -> None:
        self.ledger.delivered(tag, correlation_id)

    def finished(self, tag: int) -> None:
        self.ledger.finished(tag)
        if self.ledger.finished_count >= self._threshold:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._window_s, self.flush)

    def rejected(self, tag: int) -> None:
        settlement = self.ledger.reject(tag)
        if settlement is not None:
            self._send([settlement])

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._send(self.ledger.flush())

    def _send(self, settlements: list[Settlement]) -> None:
        if not settlements or self.channel.is_closed:
            return  # a closed channel's deliveries are requeued by the broker
        number = self.channel.number
        self._writer.write(self.channel, b"".join(
            frames.reject(number, s.tag, requeue=False) if s.reject
            else frames.ack(number, s.tag, s.multiple) for s in settlements))

    async def drain(self) -> None:
        """Send every settlement now and wait until the socket took them: before closing, or
        finished requests would be redelivered and run twice."""
        self.flush()
        with map_amqp_errors("cannot send the last acks"):
            await self._writer.drain()
