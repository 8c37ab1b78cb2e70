"""A small TCP balancer for chaos tests: what HAProxy with health checks would be.

It accepts on a free port of 127.0.0.1 and connects each client to the next backend in round
robin, skipping any backend that refuses the connection, then pipes bytes both ways until either
side closes, and closes both. It runs an asyncio loop on a thread of its own, so tests of any
kind (sync or async) can start and stop it.

    with TcpBalancer([("127.0.0.1", 8001), ("127.0.0.1", 8002)]) as balancer:
        httpx.get(f"http://127.0.0.1:{balancer.port}/")
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Self

from .conftest import free_port

CHUNK = 65536


class NoLiveBackend(ConnectionError):
    """Every backend refused the connection."""


class TcpBalancer:
    def __init__(self, backends: Sequence[tuple[str, int]], port: int | None = None,
                 connect_timeout: float = 2) -> None:
        self.backends = list(backends)
        self.port = port if port is not None else free_port()
        self.connect_timeout = connect_timeout
        # Which backend each accepted client went to, in order: tests read how traffic spread.
        self.routed: list[tuple[str, int]] = []
        self._turn = itertools.cycle(range(len(self.backends)))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-balancer",
                                        daemon=True)
        self._thread.start()
        self._call(self._listen()).result(timeout=10)

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._call(self._close()).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = None

    def _call(self, coroutine: Coroutine[None, None, None]) -> Future[None]:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        # Since Python 3.12 wait_closed() also waits for open connections: end them first.
        for connection in list(self._pipes):
            connection.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader,
                      client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            backend_reader, backend_writer = await self._connect_next()
        except NoLiveBackend:
            client_writer.close()
            self._pipes.discard(task)
            return
        try:
            # Either direction ending (EOF, reset, cancel) ends the other: both sides close.
            forward = asyncio.create_task(pipe(client_reader, backend_writer))
            backward = asyncio.create_task(pipe(backend_reader, client_writer))
            try:
                await asyncio.wait({forward, backward}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                forward.cancel()
                backward.cancel()
                await asyncio.gather(forward, backward, return_exceptions=True)
        finally:
            for writer in (client_writer, backend_writer):
                writer.close()
            self._pipes.discard(task)

    async def _connect_next(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        for _ in self.backends:
            backend = self.backends[next(self._turn)]
            try:
                connection = await asyncio.wait_for(asyncio.open_connection(*backend),
                                                    self.connect_timeout)
            except (TimeoutError, OSError):
                continue
            self.routed.append(backend)
            return connection
        raise NoLiveBackend(f"no backend of {self.backends} accepted a connection")


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
