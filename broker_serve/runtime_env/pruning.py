"""Pruning what runtime_envs leave behind (docs/architecture.md, "Runtime environments"): the
packages in Redis that no spec names any more, and a host's unused cache entries."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ..settings import Settings
from ..state.store import Store
from .cache import HostCache

log = logging.getLogger("broker_serve.runtime_env")

PERIOD_S = 600.0
# A package is stored before the record that names it is written: one this young may be a
# deploy's that has not written its record yet.
STORED_GRACE_S = 3600.0


async def _unchecked() -> None:
    """No check before deleting: for a caller that acts alone (a test, a tool)."""


async def prune_stored_packages(store: Store, grace_s: float = STORED_GRACE_S,
                                before_delete: Callable[[], Awaitable[None]] = _unchecked
                                ) -> list[str]:
    """Delete the packages stored more than `grace_s` ago that no spec names. `before_delete`
    is awaited first: the controller's check that it still leads, which raises if not."""
    candidates = await store.packages_stored_before(time.time() - grace_s)
    if not candidates:
        return []
    named = await store.packages_in_specs()
    unused = [digest for digest in candidates if digest not in named]
    await before_delete()
    await store.delete_packages(unused)
    if unused:
        log.info("deleted %d runtime_env package(s) that no deployment uses", len(unused))
    return unused


class PeriodicPruning:
    """Prunes at most every PERIOD_S: the host cache, and (`leader`) the stored packages."""

    def __init__(self, settings: Settings) -> None:
        self.cache = HostCache(settings.runtime_env_cache())
        self.ttl_s = settings.runtime_env_cache_ttl_s
        self.last = -PERIOD_S

    async def maybe_prune(self, store: Store, *, leader: bool,
                          before_delete: Callable[[], Awaitable[None]] = _unchecked) -> None:
        if time.monotonic() - self.last < PERIOD_S:
            return
        self.last = time.monotonic()
        await asyncio.to_thread(self.cache.prune, self.ttl_s)
        if leader:
            await prune_stored_packages(store, before_delete=before_delete)
