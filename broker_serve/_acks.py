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
slots meanwhile). Its decisions are correct for the order it makes them in, so `Settler` sends
them in exactly that order: one sender per channel, never two writes racing for the
connection's write queue. A ledger belongs to one channel; a reopened channel starts a new one,
and the old channel's unsettled deliveries are the broker's to redeliver.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

import aiormq

log = logging.getLogger("broker_serve.replica")


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
        settlements: list[Settlement] = []
        prefix: list[int] = []  # finished tags below the lowest running delivery
        running_seen = False
        for tag, (finished, _) in self._open.items():
            if not finished:
                running_seen = True
            elif running_seen:
                settlements.append(Settlement(tag))
            else:
                prefix.append(tag)
        if prefix:
            settlements.insert(0, Settlement(prefix[-1], multiple=len(prefix) > 1))
        for tag in prefix:
            del self._open[tag]
        for settlement in settlements[1 if prefix else 0:]:
            del self._open[settlement.tag]
        self.finished_count = 0
        return settlements

    def unsettled(self) -> Iterator[tuple[int, bool, str]]:
        """(tag, finished, correlation id) of each delivery not settled yet."""
        for tag, (finished, correlation_id) in self._open.items():
            yield tag, finished, correlation_id


class Settler:
    """Sends one channel's settlements in the order its ledger decides them.

    Acks of finished deliveries wait at most `window_s`, or go at once when a quarter of the
    prefetch window is finished. Rejects go at once, behind what is already queued.
    """

    def __init__(self, channel: aiormq.abc.AbstractChannel, prefetch: int,
                 window_s: float = 0.001) -> None:
        self.channel = channel
        self.ledger = AckLedger()
        self._threshold = max(1, prefetch // 4)
        self._window_s = window_s
        self._timer: asyncio.TimerHandle | None = None
        self._outbox: deque[Settlement] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._draining = False

    @property
    def closed(self) -> bool:
        return self.channel.is_closed

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
        self._outbox.extend(settlements)
        if self._sender is None:
            self._sender = asyncio.ensure_future(self._send_all())

    async def _send_all(self) -> None:
        try:
            while self._outbox:
                settlement = self._outbox.popleft()
                # Draining, the last one waits until the socket took it, and with it every
                # frame queued before it: closing the connection drops unwritten frames.
                wait = self._draining and not self._outbox
                if settlement.reject:
                    await self.channel.basic_reject(settlement.tag, requeue=False, wait=wait)
                else:
                    await self.channel.basic_ack(settlement.tag, multiple=settlement.multiple,
                                                 wait=wait)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            # The channel closed under us: RabbitMQ redelivers what it had not settled.
            log.warning("channel closed with %d settlement(s) unsent (%s); RabbitMQ "
                        "redelivers them", len(self._outbox) + 1, exc)
            self._outbox.clear()
        finally:
            self._sender = None

    async def drain(self) -> None:
        """Send every settlement now and wait until they are written: before closing, or
        finished requests would be redelivered and run twice."""
        self._draining = True
        self.flush()
        sender = self._sender
        if sender is not None:
            await asyncio.gather(sender, return_exceptions=True)
