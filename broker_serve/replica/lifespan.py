"""The ASGI lifespan of a replica's ingress app: its startup hooks run before the replica takes
requests, its shutdown hooks after the last one (docs/architecture.md, "Worker node and replica
lifecycle").

It speaks the ASGI lifespan protocol, which FastAPI and Starlette implement, so `on_event`
handlers, `lifespan=` context managers and plain Starlette apps all run. An app that does not
support lifespan is treated as uvicorn's `lifespan="auto"` treats it: if it raises before
answering `lifespan.startup`, or returns without answering, the replica starts without it.

A lifespan that yields state fills the lifespan scope's `state` dict. Each request's scope gets a
shallow copy of it, as uvicorn gives, so `request.state` sees it and a request's own additions
stay its own.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Scope

log = logging.getLogger("broker_serve.replica.lifespan")


class Lifespan:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.state: dict[str, Any] = {}
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()
        self._started = asyncio.Event()  # startup answered, or the app ended
        self._stopped = asyncio.Event()  # shutdown answered, or the app ended
        self._running = False  # startup completed: the app waits for lifespan.shutdown
        self._startup_failure: str | None = None
        self._shutdown_failure: str | None = None
        self._error: Exception | None = None
        self._task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        """Run the startup hooks. If they fail, raise a RuntimeError naming their error."""
        self._task = asyncio.create_task(self._main(), name="asgi-lifespan")
        self._to_app.put_nowait({"type": "lifespan.startup"})
        await self._started.wait()
        if self._startup_failure is None:
            return
        if not self._task.done():  # it answered that it failed: nothing of it runs on
            self._task.cancel()
        raise RuntimeError(f"ASGI lifespan startup failed: {self._failure()}") from self._error

    async def shutdown(self, timeout: float) -> None:
        """Run the shutdown hooks, for at most `timeout` seconds; a failure is logged."""
        if not self._running or self._task is None or self._task.done():
            return
        self._to_app.put_nowait({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self._stopped.wait(), max(timeout, 0))
        except TimeoutError:
            log.warning("the ASGI app's shutdown hooks did not finish within %.1fs; cancelled",
                        timeout)
            self._task.cancel()
            return
        if self._shutdown_failure is not None:
            log.error("the ASGI app's shutdown hooks failed:\n%s", self._shutdown_failure)

    def _failure(self) -> str:
        if self._error is not None:
            return f"{type(self._error).__name__}: {self._error}"
        # Starlette's message is the traceback: its last line names the error.
        lines = (self._startup_failure or "").strip().splitlines()
        return lines[-1] if lines else "the app gave no reason"

    async def _main(self) -> None:
        scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                         "state": self.state}
        try:
            await self.app(scope, self._receive, self._send)
        except Exception as exc:  # user code; what it means depends on when it came
            self._error = exc
            if not self._started.is_set():
                log.info("the ASGI app raised %s on the lifespan scope: lifespan looks "
                         "unsupported, so the replica starts without it", type(exc).__name__)
            elif self._startup_failure is None and self._shutdown_failure is None:
                log.error("the ASGI app's lifespan ended with an error", exc_info=exc)
        finally:
            self._started.set()
            self._stopped.set()

    async def _receive(self) -> Message:
        return await self._to_app.get()

    async def _send(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "lifespan.startup.complete":
            self._running = True
            self._started.set()
        elif kind == "lifespan.startup.failed":
            self._startup_failure = str(message.get("message") or "")
            self._started.set()
        elif kind == "lifespan.shutdown.complete":
            self._stopped.set()
        elif kind == "lifespan.shutdown.failed":
            self._shutdown_failure = str(message.get("message") or "")
            self._stopped.set()
        else:
            raise RuntimeError(f"unexpected ASGI lifespan message {kind!r}")
