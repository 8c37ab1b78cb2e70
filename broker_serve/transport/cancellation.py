"""Cancelling requests by id (docs/protocol.md, "Cancellation").

A caller broadcasts the ids on the cancel fanout exchange and writes tombstones to Redis. Every
replica keeps the ids in a local set, so checking a request at pickup is a dict lookup, not a
Redis round trip. A replica that starts later loads the live tombstones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..exceptions import BrokerServeError
from ..protocol import messages
from ..state.store import Store
from .broker import Broker

log = logging.getLogger("broker_serve.cancellation")

# How long replicas remember a cancelled id: longer than any request waits in a queue.
TOMBSTONE_TTL_S = 600.0


def _now_ms() -> int:
    return int(time.time() * 1000)


async def cancel(broker: Broker, store: Store, ids: list[str],
                 ttl_s: float = TOMBSTONE_TTL_S) -> None:
    """Cancel requests wherever they are: queued, or running on any replica."""
    expires = _now_ms() + int(ttl_s * 1000)
    try:
        await broker.publish("", messages.pack({"ids": ids, "expires": expires}),
                             type=messages.CANCEL, correlation_id=ids[0],
                             headers=messages.request_headers(),
                             exchange=store.names.cancel_exchange)
    except BrokerServeError as exc:  # the tombstone below still reaches replicas that start later
        log.warning("could not broadcast the cancellation of %s: %s", ids, exc)
    try:
        await store.add_tombstones(ids, expires)
    except BrokerServeError as exc:  # the broadcast above reached the replicas running now
        log.warning("could not write tombstones for %s: %s", ids, exc)


# How long a caller waits for its connection to come back to broadcast what it abandoned.
ABANDONED_BROADCAST_WAIT_S = 60.0


async def cancel_abandoned(broker: Broker, store: Store, ids: list[str]) -> None:
    """Cancel the requests a lost connection failed (their callers got a 503): the
    tombstones at once, for replicas that reconnect and reload them before consuming again;
    the broadcast once this process's connection is back, for the others."""
    expires = _now_ms() + int(TOMBSTONE_TTL_S * 1000)
    try:
        await store.add_tombstones(ids, expires)
    except BrokerServeError as exc:
        log.warning("could not write tombstones for %d abandoned request(s): %s", len(ids), exc)
    if await broker.wait_connected(ABANDONED_BROADCAST_WAIT_S):
        await cancel(broker, store, ids)


class AbandonedRequests:
    """A ReplyRouter's `on_abandoned`: cancels them in the background, holding the tasks."""

    def __init__(self, broker: Broker, store: Store) -> None:
        self.broker, self.store = broker, store
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, ids: list[str]) -> None:
        if ids:
            task = asyncio.ensure_future(cancel_abandoned(self.broker, self.store, ids))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


class CancelledSet:
    """The ids a replica must not run, with their expiry."""

    def __init__(self) -> None:
        self._expiry: dict[str, int] = {}

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._expiry

    def __len__(self) -> int:
        return len(self._expiry)

    def add(self, ids: list[Any], expires: int) -> list[str]:
        added = [i for i in ids if isinstance(i, str)]
        for request_id in added:
            self._expiry[request_id] = max(expires, self._expiry.get(request_id, 0))
        return added

    async def load(self, store: Store) -> None:
        """The tombstones that are still live, for a replica that just started."""
        self._expiry.update(await store.live_tombstones(_now_ms()))

    def prune(self) -> None:
        now = _now_ms()
        for request_id in [i for i, expires in self._expiry.items() if expires < now]:
            del self._expiry[request_id]
