"""Model affinity: send a request for a multiplexed model to a replica that already holds it.

Replicas of a multiplexed deployment say in the first reply event of each request which models
they hold (`models`) and how many requests they run at once (`capacity`). A sender remembers that
per deployment queue and, for a request that names a model, picks a holder with room from its own
point of view. The request then goes to that replica's affinity queue, which RabbitMQ drains into
the shared queue after `WAIT_MS`, so a wrong guess costs latency, never the request.
See docs/architecture.md, "Model affinity".
"""

from __future__ import annotations

import time
from typing import Any

# How long a request may wait in a replica's affinity queue before it moves to the shared queue.
WAIT_MS = 500
# A replica's affinity queue outlives its consumer this long, so late requests still move on.
QUEUE_EXPIRES_MS = 600_000
# What a sender learned from a replica counts this long after it last heard from it.
FRESH_S = 120.0


def queue_arguments(shared_queue: str) -> dict[str, Any]:
    """Arguments of a replica's affinity queue: waits end in the deployment's shared queue."""
    return {
        "x-message-ttl": WAIT_MS,
        "x-expires": QUEUE_EXPIRES_MS,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": shared_queue,
    }


class _Holder:
    __slots__ = ("capacity", "heard", "in_flight", "models")

    def __init__(self) -> None:
        self.models: frozenset[str] = frozenset()
        self.capacity = 1
        self.in_flight = 0
        self.heard = 0.0


class AffinityTable:
    """What one sender knows of which replica holds which model, per deployment queue."""

    def __init__(self) -> None:
        self._holders: dict[str, dict[str, _Holder]] = {}

    def knows(self, queue: str) -> bool:
        """Whether any replica of this deployment said it holds models: a dict lookup, so
        deployments without multiplexing pay nothing more."""
        return queue in self._holders

    def pick(self, queue: str, model_id: str) -> str | None:
        """The replica to send a request for `model_id` to, counted as in flight there; None
        for the shared queue."""
        now = time.monotonic()
        chosen_id, chosen = None, None
        for replica_id, holder in self._holders.get(queue, {}).items():
            if (model_id in holder.models and holder.in_flight < holder.capacity
                    and now - holder.heard < FRESH_S
                    and (chosen is None or holder.in_flight < chosen.in_flight)):
                chosen_id, chosen = replica_id, holder
        if chosen is not None:
            chosen.in_flight += 1
        return chosen_id

    def done(self, queue: str, replica_id: str) -> None:
        """A request sent to `replica_id` by `pick` finished."""
        holder = self._holders.get(queue, {}).get(replica_id)
        if holder is not None and holder.in_flight > 0:
            holder.in_flight -= 1

    def observe(self, queue: str, chosen: str | None, event: dict[str, Any]) -> None:
        """Learn from the first reply event of a request sent to `chosen` (None: shared queue)."""
        replica_id = event.get("replica")
        if chosen is not None and replica_id != chosen:
            # The chosen replica did not take it in time (busy, stopping or dead).
            self._holders.get(queue, {}).pop(chosen, None)
        models = event.get("models")
        if not isinstance(replica_id, str) or not isinstance(models, list):
            return
        holder = self._holders.setdefault(queue, {}).setdefault(replica_id, _Holder())
        holder.models = frozenset(m for m in models if isinstance(m, str))
        capacity = event.get("capacity")
        holder.capacity = capacity if isinstance(capacity, int) and capacity > 0 else 1
        holder.heard = time.monotonic()
