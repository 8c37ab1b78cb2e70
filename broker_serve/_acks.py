"""Acknowledging requests in batches.

A replica acks a request only after its reply is published. Under load many requests finish
within a millisecond of each other; acking them with one `basic.ack(multiple=True)` saves a
frame, a write and broker work per request. An unacked delivery holds a prefetch slot, so the
batch is sent after at most `window_s`, or at once when finished deliveries hold a quarter of
the slots.

`multiple=True` settles every delivery up to a tag, so a batch may only reach up to the lowest
delivery still running. Finished deliveries above it (a long stream holds a low tag) are acked
one by one, so they never hold prefetch slots.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("broker_serve.replica")


class AckBatcher:
    def __init__(self, prefetch: int, window_s: float = 0.001) -> None:
        self._threshold = max(1, prefetch // 4)
        self._window_s = window_s
        self._timer: asyncio.TimerHandle | None = None
        self._channel: Any = None
        self._running: set[int] = set()
        self._finished: list[int] = []
        self._sending: set[asyncio.Future[None]] = set()

    def started(self, channel: Any, delivery_tag: int) -> None:
        if channel is not self._channel:
            # A new channel after a reconnect: the old deliveries are being redelivered, and
            # their tags mean nothing here.
            self._channel = channel
            self._running.clear()
            self._finished.clear()
        self._running.add(delivery_tag)

    def finished(self, channel: Any, delivery_tag: int) -> None:
        if channel is not self._channel:
            return
        self._running.discard(delivery_tag)
        self._finished.append(delivery_tag)
        if len(self._finished) >= self._threshold:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._window_s, self._flush)

    def dropped(self, channel: Any, delivery_tag: int) -> None:
        """The delivery was settled another way (rejected); stop tracking it."""
        if channel is self._channel:
            self._running.discard(delivery_tag)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        finished, self._finished = self._finished, []
        floor = min(self._running, default=None)
        below = [tag for tag in finished if floor is None or tag < floor]
        above = [tag for tag in finished if floor is not None and tag > floor]
        if below:
            self._send(max(below), multiple=len(below) > 1)
        for tag in above:
            self._send(tag, multiple=False)

    def _send(self, delivery_tag: int, multiple: bool) -> None:
        future = asyncio.ensure_future(self._ack(delivery_tag, multiple))
        self._sending.add(future)
        future.add_done_callback(self._sending.discard)

    async def drain(self) -> None:
        """Send every ack now and wait for them: before closing, or finished requests would be
        redelivered and run twice."""
        self._flush()
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    async def _ack(self, delivery_tag: int, multiple: bool) -> None:
        channel = self._channel
        try:
            await channel.basic_ack(delivery_tag=delivery_tag, multiple=multiple)
        except Exception as exc:  # the channel died: RabbitMQ redelivers, nothing is lost
            log.warning("could not ack delivery %d (%s); it will be redelivered", delivery_tag,
                        exc)
