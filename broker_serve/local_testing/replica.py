"""One deployment's replica in local testing mode: the user's instance, built and called by the
replica process's own code (`replica/execution.py`), on the calling process's runtime loop.

It takes the same call messages a replica consumes and publishes the same reply events, only
through the in-process broker: `construct` builds the instance (and reconfigures it),
`run_call` calls its method (generators stream, `@serve.batch` and `@serve.multiplexed` work as
they do in a replica), `run_attempt` turns what escapes into the error event a handle raises
again, and `within_deadline` checks the call's deadline. `max_ongoing_requests` bounds what runs
at once; the others wait their turn, as they would in the queue.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from typing import Any

from ..client.handle import calls_of_current_request
from ..config import DeploymentConfig, user_config_hash
from ..context import ReplicaContext, _local, _request_id
from ..exceptions import ProtocolError
from ..protocol import messages as protocol
from ..replica.execution import (
    ReplyStream,
    Servable,
    construct,
    run_attempt,
    run_call,
    within_deadline,
)
from ..replica.threads import ThreadRunner

# Reply events go to the caller as bytes, decoded as the reply router decodes a message's.
Reply = Callable[[str, str, bytes], None]


class LocalReplica:
    def __init__(self, app: str, deployment: str, version: str, config: DeploymentConfig,
                 secret: bytes, reply: Reply) -> None:
        self.app = app
        self.deployment = deployment
        self.version = version
        self.replica_id = f"{app}#{deployment}#local"
        self.config = config
        self.secret = secret
        self._reply = reply
        self.servable: Servable | None = None
        self.context: ReplicaContext | None = None
        self._slots = asyncio.Semaphore(config.max_ongoing_requests)
        self._tasks: dict[str, asyncio.Task[None]] = {}  # by correlation id, queued or running
        self._cancelling: set[str] = set()

    async def start(self, definition: dict[str, Any]) -> None:
        def constructed(instance: Any) -> None:
            self.context = ReplicaContext(self.app, self.deployment, self.replica_id, instance)

        threads = ThreadRunner(max(4, self.config.max_ongoing_requests), f"local-{self.deployment}")
        # Handles made in the constructor find the app's deployments, as in a replica.
        self.servable = await construct(definition, threads, self.config.user_config,
                                        constructed)

    async def reconfigure(self, config: DeploymentConfig) -> None:
        """Take on changed live options; a changed user_config goes to `reconfigure()`, as a
        replica process does when its app record changes."""
        changed = (user_config_hash(config.model_dump(mode="json")["user_config"])
                   != user_config_hash(self.config.model_dump(mode="json")["user_config"]))
        self.config = config
        if changed and self.servable is not None:
            await self.servable.call_lifecycle("reconfigure", config.user_config)

    @property
    def queued(self) -> int:
        """The calls taken and not yet running (what a replica's queue would hold)."""
        return max(0, len(self._tasks) - self.config.max_ongoing_requests)

    def take(self, kind: str, body: bytes, correlation_id: str,
             headers: dict[str, Any]) -> None:
        """A call message: run it in a task of its own, as a replica runs each delivery."""
        # In a fresh context, as a delivery's task in a replica: nothing of the caller's.
        self._tasks[correlation_id] = asyncio.get_running_loop().create_task(
            self._serve(kind, body, correlation_id, headers), context=contextvars.Context())

    def cancel(self, correlation_id: str) -> None:
        task = self._tasks.get(correlation_id)
        if task is not None:
            self._cancelling.add(correlation_id)
            task.cancel()

    async def _serve(self, kind: str, body: bytes, correlation_id: str,
                     headers: dict[str, Any]) -> None:
        async def publish(event: str, fields: dict[str, Any]) -> None:
            fields["replica"] = self.replica_id
            self._reply(correlation_id, event, protocol.pack(fields))

        stream = ReplyStream(publish)
        try:
            async with self._slots:
                await self._run(kind, body, correlation_id, headers, stream)
        except asyncio.CancelledError:
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
            if correlation_id in self._cancelling:
                await stream.error(499, "Cancelled", "the request was cancelled before it ran")
            else:  # stopping: no other replica takes it, so its caller hears now
                await stream.error(503, "ReplicaStopped", "the deployment stopped (serve.delete "
                                   "or serve.shutdown in local testing mode)")
        finally:
            self._tasks.pop(correlation_id, None)
            self._cancelling.discard(correlation_id)

    async def _run(self, kind: str, body: bytes, correlation_id: str, headers: dict[str, Any],
                   stream: ReplyStream) -> None:
        calls_of_current_request.set([])  # this task's own context: the calls it makes
        request_id = headers.get(protocol.HEADER_REQUEST_ID)
        _request_id.set(request_id if isinstance(request_id, str) and request_id
                        else correlation_id)
        _local.set(self.context)  # serve.get_replica_context() and handles' default app
        await run_attempt(self._dispatch(kind, body, headers, stream), stream, kind=kind,
                          secret=self.secret, correlation_id=correlation_id,
                          cancelled_by_caller=lambda: correlation_id in self._cancelling,
                          restartable=True)

    async def _dispatch(self, kind: str, body: bytes, headers: dict[str, Any],
                        stream: ReplyStream) -> None:
        protocol.check_version(headers)
        if not await within_deadline(headers, stream):
            return
        if kind != protocol.KIND_CALL:  # only handles publish here
            raise ProtocolError(f"unknown request kind {kind!r}")
        assert self.servable is not None
        await run_call(self.servable, stream, protocol.decode_map(body), self.secret)

    async def stop(self) -> None:
        """Stop as a replica does: cancel what still runs, then the user's shutdown (its
        `__del__`, its multiplexed models) within graceful_shutdown_timeout_s."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.servable is not None:
            await self.servable.stop(self.config.graceful_shutdown_timeout_s)
            self.servable.threads.shutdown()
