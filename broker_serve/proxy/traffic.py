"""The proxy's half of traffic policy: weighted splits and shadow copies (docs/architecture.md,
"Traffic policy").

A route with a `split` gets a `TrafficPolicy` when the route table loads: its cumulative
weights, its allowed methods and its shadows. Choosing a target is then one draw and a bisect,
in memory (`WeightedChoice`); a route without a split has no policy and costs one dict lookup.

A shadow is a copy of a request (whose body came in its first chunk) published to another
application's queue. Its reply events go to a task that drops them and unregisters at the
terminal one, or after a bound, when it cancels the copy. The client never sees any of it,
and the real request never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..exceptions import BrokerServeError
from ..observability import tracing
from ..observability.metrics import ProxyMetrics
from ..protocol import messages as protocol
from ..state.traffic import WeightedChoice
from ..transport.broker import Broker, ReplyEvents, ReplyRouter

log = logging.getLogger("broker_serve.proxy.traffic")

# How long a shadow copy may take before it is cancelled and forgotten, when the cluster sets
# no request_timeout_s.
SHADOW_TIMEOUT_S = 30.0
# Copies waiting for their replies at once; past it a request is not shadowed (counted as
# `skipped`), so a slow shadow application cannot grow the proxy's memory without bound.
MAX_SHADOWS_IN_FLIGHT = 1024


class TrafficPolicy:
    """A route's split, allowed methods and shadows, ready for choosing per request."""

    __slots__ = ("allow", "methods", "route", "shadows", "targets")

    def __init__(self, route: Mapping[str, Any]) -> None:
        self.route = route
        # The controller gave targets that are not ready a weight of 0: never chosen.
        self.targets: WeightedChoice[dict[str, Any]] = WeightedChoice(
            [(dict(target), float(target["weight"])) for target in route.get("split", ())])
        methods = route.get("methods")
        self.methods = frozenset(methods) if methods is not None else None
        # The Allow header of a 405 (RFC 9110 requires it).
        self.allow = ", ".join(methods).encode() if methods is not None else b""
        self.shadows: list[dict[str, Any]] = [dict(s) for s in route.get("shadow", ())]

    def allows(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    def choose(self) -> dict[str, Any] | None:
        """A ready target by weight, or None if none is ready. A target has the fields of
        a route entry that the publish needs (`app`, `deployment`, `queue`, `bounded`)."""
        return self.targets.choose() if self.targets else None

    def shadows_now(self) -> list[dict[str, Any]]:
        """The shadows this request is copied to, each drawn by its fraction."""
        return [shadow for shadow in self.shadows if random.random() < shadow["fraction"]]


def policies(routes: Mapping[str, Mapping[str, Any]],
             previous: Mapping[str, TrafficPolicy]) -> dict[str, TrafficPolicy]:
    """The policy of each route that has a split, by prefix; an unchanged route keeps its
    policy, and so its sequence of draws, across table loads."""
    kept = {prefix: policy for prefix, policy in previous.items()
            if routes.get(prefix) == policy.route}
    return {prefix: kept.get(prefix) or TrafficPolicy(route)
            for prefix, route in routes.items() if "split" in route}


class ShadowSender:
    """Publishes shadow copies and drains their replies, each in a task of its own."""

    def __init__(self, broker: Broker, router: ReplyRouter, metrics: ProxyMetrics,
                 cancel: Callable[[str], None], timeout_s: float | None) -> None:
        self.broker = broker
        self.router = router
        self.metrics = metrics
        self.cancel = cancel
        self.timeout_s = timeout_s or SHADOW_TIMEOUT_S
        self._tasks: set[asyncio.Task[None]] = set()

    def copy(self, policy: TrafficPolicy, scope: dict[str, Any], body: bytes,
             correlation_id: str, request_id: str | None) -> None:
        """Copy a request to the shadows drawn for it. Only a body complete in its first chunk
        is copied (a streamed one would need an upload of its own), and without flow
        control: nobody reads the copy's response, so nobody would grant credit."""
        shadows = policy.shadows_now()
        if not shadows:
            return
        payload = {"scope": scope, "body": body, "more_body": False}
        for index, shadow in enumerate(shadows):
            if len(self._tasks) >= MAX_SHADOWS_IN_FLIGHT:
                self.metrics.shadowed(shadow["app"], "skipped")
                continue
            task = asyncio.create_task(self._shadow(
                shadow, payload, f"{correlation_id}.shadow{index}", request_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """At shutdown: the copies still out are cancelled and forgotten."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _shadow(self, shadow: dict[str, Any], payload: dict[str, Any], correlation_id: str,
                      request_id: str | None) -> None:
        events = self.router.register(correlation_id)
        outcome = "unsent"
        try:
            deadline = int((time.time() + self.timeout_s) * 1000)
            headers = protocol.request_headers(deadline, published_us=protocol.now_us(),
                                               request_id=request_id)
            if tracing.traces is not None:  # a child of the request's span, as the original
                tracing.traces.inject_current(headers)
            await self.broker.publish(
                shadow["queue"], protocol.pack(payload), type=protocol.KIND_HTTP,
                correlation_id=correlation_id, reply_to=self.router.queue_name,
                headers=headers, mandatory=True)
            outcome = "timeout"
            async with asyncio.timeout(self.timeout_s):
                outcome = await _drain(events)
        except TimeoutError:
            if outcome == "timeout":
                self.cancel(correlation_id)
        except BrokerServeError as exc:  # the real request is not this one's business
            log.debug("shadow %s to %s failed: %s", correlation_id, shadow["app"], exc)
        finally:
            self.router.unregister(correlation_id)
            self.metrics.shadowed(shadow["app"], outcome)


async def _drain(events: ReplyEvents) -> str:
    """Drop a copy's reply events up to its terminal one; its outcome."""
    status = 0
    while True:
        kind, event = await events.get()
        if kind == protocol.START:
            status = int(event.get("status", 0))
            if not event.get("more_body"):
                break
        elif kind == protocol.BODY and not event.get("more_body"):
            break
        elif kind == protocol.ERROR:
            return "error"
    return "answered" if status < 500 else "error"
