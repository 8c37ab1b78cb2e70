"""A TCP proxy for tests, in front of one backend or several: what clients see of a broker
that restarts or hangs, or of a load balancer in front of proxies that die.

- `cut()` closes every open connection (a broker restart); `down()` also refuses new ones
  until `up()` (a broker that stops, a node that dies).
- `pause()` holds the bytes of every connection in both directions until `resume()` (a route
  that hangs); `parked` is set when a client sends anything but an AMQP heartbeat while paused:
  it is waiting for an answer.
- With several backends, each new connection goes to the next one in turn that accepts it, as
  HAProxy with health checks does; `routed` lists where each went.

It runs an asyncio loop on a thread of its own, so sync and async tests alike can use it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Sequence
from typing import Self

from .conftest import free_port

_AMQP_HEARTBEAT_FRAME = 8  # the first byte of an AMQP heartbeat frame
_CHUNK = 65536


class TcpFaultProxy:
    def __init__(self, target_host: str, target_port: int, *,
                 more: Sequence[tuple[str, int]] = (), connect_timeout_s: float = 2.0) -> None:
        self.targets = [(target_host, target_port), *more]
        self.port = free_port()
        self.connect_timeout_s = connect_timeout_s
        self.routed: list[tuple[str, int]] = []
        self.parked = threading.Event()
        self._turn = itertools.cycle(range(len(self.targets)))
        self._loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._refusing = False

    @classmethod
    def balancing(cls, backends: Sequence[tuple[str, int]]) -> TcpFaultProxy:
        """A balancer in front of `backends`."""
        (host, port), *more = backends
        return cls(host, port, more=more)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"

    def stop(self) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def cut(self) -> None:
        """Close every open connection in both directions; new ones are still accepted."""
        async def close_all() -> None:
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(5)

    def down(self) -> None:
        """A broker that stops (`rabbitmqctl stop_app`, or a node that dies): every open
        connection is cut, and new ones are refused until `up()`."""
        self._refusing = True
        self.cut()

    def up(self) -> None:
        self._refusing = False

    def pause(self) -> None:
        self.parked.clear()
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.set)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._flowing.set()
        server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = None if self._refusing else await self._connect_next()
        if upstream is None:
            writer.transport.abort()
            return
        up_reader, up_writer = upstream
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer, from_client=True),
                             self._pipe(up_reader, writer, from_client=False),
                             return_exceptions=True)

    async def _connect_next(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for _ in self.targets:
            target = self.targets[next(self._turn)]
            try:
                connection = await asyncio.wait_for(asyncio.open_connection(*target),
                                                    self.connect_timeout_s)
            except (TimeoutError, OSError):
                continue
            self.routed.append(target)
            return connection
        return None

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                    from_client: bool) -> None:
        """Either direction ending (EOF, reset) aborts its writer, which ends the other."""
        try:
            while data := await reader.read(_CHUNK):
                if from_client and not self._flowing.is_set() \
                        and data[0] != _AMQP_HEARTBEAT_FRAME:
                    self.parked.set()
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()
            self._writers.discard(writer)
