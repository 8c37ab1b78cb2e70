"""Reading an HTTP client's request in the proxy: its body a chunk at a time, and noticing a
client that leaves while its response is pending."""

from __future__ import annotations

import asyncio
from typing import Any

from ..exceptions import BrokerServeError
from ..settings import CHUNK_BYTES

__all__ = ["ClientGone", "DisconnectWatch", "read_chunk"]


class DisconnectWatch:
    """Notices a client that leaves while its response is pending, and cancels the request.

    Most requests are answered in about a millisecond, so the watch starts only after 50 ms:
    a fast request costs a timer, not a task.
    """

    DELAY_S = 0.05

    def __init__(self, receive: Any) -> None:
        self._receive = receive
        self._request_task = asyncio.current_task()
        self._watch: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(self.DELAY_S, self._start)
        self.client_gone = False

    def _start(self) -> None:
        self._watch = asyncio.ensure_future(self._wait_for_disconnect())

    async def _wait_for_disconnect(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.client_gone = True
        if self._request_task is not None:
            self._request_task.cancel()

    def stop(self) -> None:
        self._timer.cancel()
        if self._watch is not None:
            self._watch.cancel()


class ClientGone(BrokerServeError):
    """The client disconnected before its request body was complete."""


async def read_chunk(receive: Any) -> tuple[bytes, bool]:
    """Read request body messages until a chunk's worth (or the end) has arrived."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        body = message.get("body", b"")
        if body:
            parts.append(body)
            size += len(body)
        more = message.get("more_body", False)
        if not more or size >= CHUNK_BYTES:
            return (parts[0] if len(parts) == 1 else b"".join(parts)), more
