"""Which requests died with their replicas: the delivery journal of poison requests.

A request whose replicas died with it MAX_DELIVERIES - 1 times is not run again (the replica
answers 502 and dead-letters it). Only deaths count: a live replica that gives requests back
to RabbitMQ unfinished (a lost channel, a stop mid-request) writes them down as released, and
their redeliveries are not counted against them. The counts live in Redis for
DELIVERY_COUNT_TTL_S, and only redeliveries and releases pay a round trip.
"""

from __future__ import annotations

import asyncio
import logging

from ..exceptions import BrokerServeError
from ..state.store import Store

log = logging.getLogger("broker_serve.replica.replica")

# A request delivered this often died with its replica every time: it is not tried again.
MAX_DELIVERIES = 4
DELIVERY_COUNT_TTL_S = 3600


class DeliveryJournal:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._writing: set[asyncio.Task[None]] = set()  # strong references until written

    async def delivered_too_often(self, correlation_id: str) -> bool:
        """Count a redelivery, and tell whether the request's replicas died with it
        MAX_DELIVERIES - 1 times."""
        try:
            redelivered, released = await self.store.count_redelivery(correlation_id,
                                                                      DELIVERY_COUNT_TTL_S)
        except BrokerServeError as exc:  # Redis away: serving goes on without the bound
            log.warning("could not count the deliveries of %s: %s", correlation_id, exc)
            return False
        deaths = redelivered - released
        if deaths + 1 >= MAX_DELIVERIES:
            log.error("request %s was delivered %d times, %d of them to replicas that died; "
                      "dead-lettering it", correlation_id, int(redelivered) + 1, deaths)
            return True
        return False

    async def released(self, correlation_ids: list[str]) -> None:
        """Write down requests this live replica gives back to RabbitMQ unfinished, so that
        their redeliveries do not count as deaths."""
        if not correlation_ids:
            return
        try:
            await self.store.count_released(correlation_ids, DELIVERY_COUNT_TTL_S)
        except BrokerServeError as exc:
            log.warning("could not write down %d released request(s): %s",
                        len(correlation_ids), exc)

    def release_soon(self, correlation_ids: list[str]) -> None:
        """`released`, from a callback that cannot await it."""
        task = asyncio.ensure_future(self.released(correlation_ids))
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)
