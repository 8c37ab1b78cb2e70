"""uvicorn under broker-serve's own signal handling: the one adapter below uvicorn's public API.

Every broker-serve process owns SIGTERM and SIGINT: it stops taking work, drains, then closes
its AMQP and Redis connections. uvicorn has no public switch for its signal handlers:
`Server.serve` installs them in `capture_signals` (since 0.29) and, on leaving it, raises the
captured signal again with the default handler, which kills the process before it has closed
anything. `HttpServer` makes `capture_signals` a no-op, and its owner sets the public
`should_exit` (and `force_exit` on a second signal) instead. tests/test_dependency_contracts.py
pins the behaviour this relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Callable, Iterator

import uvicorn


class HttpServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config,
                 on_started: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._on_started = on_started

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._on_started is not None:
            self._on_started()

    def stop_on_signals(self) -> None:
        """SIGTERM or SIGINT: stop accepting, let in-flight requests finish, return from
        `serve`. A second one: stop without waiting."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)

    def _on_signal(self) -> None:
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True
