"""Cancelling requests by id (docs/protocol.md, "Cancellation").

A caller broadcasts the ids on the cancel fanout exchange and writes tombstones to Redis. Every
replica keeps the ids in a local set, so checking a request at pickup is a dict lookup, not a
Redis round trip. A replica that starts later loads the live tombstones.
"""

from __future__ import annotations

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
