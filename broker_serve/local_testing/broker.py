"""Local testing mode's broker: the cluster's `Broker` with publishing done in the process.

A handle publishes a call message exactly as it does to RabbitMQ (the same body, headers and
correlation id); here the message goes straight to the local replica of its queue, and the
replica's reply events straight to the caller's reply router. A message for a queue nobody
serves is returned, as a `mandatory` publish is by RabbitMQ. Nothing connects anywhere, in
the way FastStream's TestBroker stands in for a real broker.
"""

from __future__ import annotations

from typing import Any

from ..transport.broker import Broker, ReplyEvents
from .replica import LocalReplica


class LocalBroker(Broker):
    def __init__(self, name: str) -> None:
        # An address is parsed, never dialled: connect() is never called.
        super().__init__("amqp://local-testing-mode/", name)
        self.queues: dict[str, LocalReplica] = {}  # by request queue name

    async def connect(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to close."""

    async def wait_connected(self, timeout_s: float) -> bool:
        return True

    async def publish(self, routing_key: str, body: bytes, *, type: str, correlation_id: str,
                      reply_to: str | None = None, headers: dict[str, Any] | None = None,
                      expiration: str | None = None, priority: int = 0,
                      mandatory: bool = False, exchange: str = "") -> None:
        replica = self.queues.get(routing_key)
        if replica is None:
            if mandatory:
                for handler in self._return_handlers:
                    handler(correlation_id, routing_key)
            return
        replica.take(type, body, correlation_id, headers or {})

    async def publish_request(self, routing_key: str, body: bytes, *, bounded: bool,
                              durable: bool, events: ReplyEvents | None,
                              deadline_ms: int | None, **properties: Any) -> bool:
        """A bounded deployment refuses a call once max_queued_requests wait, as its queue
        does; in one process there is nothing to make durable."""
        replica = self.queues.get(routing_key)
        if bounded and replica is not None:
            bound = replica.config.max_queued_requests
            if replica.queued >= bound:
                return False
        await self.publish(routing_key, body, **properties)
        return True

    def cancel(self, ids: list[str]) -> None:
        """A cancel broadcast: every local replica cancels the ids it holds."""
        for replica in self.queues.values():
            for request_id in ids:
                replica.cancel(request_id)

