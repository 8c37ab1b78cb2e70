"""What preparing a runtime_env is doing, written where its user looks: a config build's
DEPLOYING message, a replica's record (docs/architecture.md, "Runtime environments")."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from ..exceptions import BrokerServeError


class ProgressReporter:
    """A `Progress` callable for any thread, writing with `write` on the event loop that made
    it. Writes are coalesced to the latest message, one at a time, and none follows `close`."""

    def __init__(self, write: Callable[[str], Awaitable[None]]) -> None:
        self.write = write
        self.loop = asyncio.get_running_loop()
        self.latest: str | None = None
        self.writer: asyncio.Task[None] | None = None
        self.closed = False

    def __call__(self, message: str) -> None:
        self.loop.call_soon_threadsafe(self._set, message)

    def _set(self, message: str) -> None:
        if self.closed:
            return
        self.latest = message
        if self.writer is None or self.writer.done():
            self.writer = asyncio.create_task(self._drain())

    async def _drain(self) -> None:
        while self.latest is not None:
            message, self.latest = self.latest, None
            with contextlib.suppress(BrokerServeError):  # progress only: the work goes on
                await self.write(message)

    async def close(self) -> None:
        await asyncio.sleep(0)  # let messages scheduled from threads arrive
        self.closed = True
        self.latest = None
        if self.writer is not None:
            await self.writer
