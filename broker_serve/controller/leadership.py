"""Whether this controller may act as the leader: the Redis lease, and how long ago this
process last confirmed it.

The lease (`controller:lease`, LEASE_MS) is taken or extended by one Lua script that extends
only its own holder's lease (`Store.take_lease`). A leader checks before every write it makes
(`Leadership.check`) that it confirmed the lease less than LEASE_MS - SAFETY_MARGIN_S ago, by
this process's monotonic clock read before the Redis call that confirmed it; past that it
renews the lease if it is still its own, or stops acting. So a leader that stalled (a long
AMQP call, a paused process) never writes after a standby may have taken over. See
docs/architecture.md, "Controller".
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from ..state.store import Store

LEASE_MS = 4_000  # a standby takes over within about this long
# Time left on the lease, by our clock, below which the leader renews it before a write: it
# covers the write's way to Redis and a difference between our clock's rate and Redis's.
SAFETY_MARGIN_S = 1.0


class LeadershipLost(Exception):
    """This controller may no longer act: its lease ran out, or another controller holds
    it. Raised before a write, it ends the reconcile round; it never leaves the controller."""


class Leadership:
    def __init__(self, store: Store, controller_id: str, *, lease_ms: int = LEASE_MS,
                 margin_s: float = SAFETY_MARGIN_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.controller_id = controller_id
        self.lease_ms = lease_ms
        self.margin_s = margin_s
        self.clock = clock
        self.confirmed_at: float | None = None  # None: not held

    async def hold(self) -> bool:
        """Take the lease, or extend it if this controller holds it; whether it does now. A
        holder that provably died gives the lease up (`Store.lease_holder`): take it at once."""
        held = await self._confirm(self.store.take_lease)
        if not held and await self.store.lease_holder() is None:
            held = await self._confirm(self.store.take_lease)
        return held

    def may_act(self) -> bool:
        """Whether the lease confirmed last is, by this process's clock, still ours for more
        than the safety margin."""
        if self.confirmed_at is None:
            return False
        return self.confirmed_at + self.lease_ms / 1000 - self.margin_s > self.clock()

    async def check(self) -> None:
        """Call before each write made as the leader: returns if this controller may act,
        after renewing the lease if little of it is left; raises LeadershipLost if not."""
        if self.may_act():
            return
        if self.confirmed_at is not None:
            # Only our own lease is extended: one that expired, or another took, stays lost.
            await self._confirm(self.store.extend_lease)
            if self.may_act():
                return
        self.confirmed_at = None
        raise LeadershipLost(f"controller {self.controller_id} lost the lease")

    async def _confirm(self, call: Callable[[str, int], Awaitable[bool]]) -> bool:
        """Run a lease call (take or extend) and note when it confirmed the lease: the time
        read before the call, since Redis may have set the expiry any time after it."""
        asked_at = self.clock()
        held = await call(self.controller_id, self.lease_ms)
        self.confirmed_at = asked_at if held else None
        return held
