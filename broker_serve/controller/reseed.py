"""What controllers remember of the cluster's Redis state, to write it back if Redis restarts
empty (it keeps nothing on disk).

Every controller, leader or standby, copies the durable part of the state once a second: the
desired applications with their specs (and spec index) and configs, the traffic records, the
HTTP options, the nodes, their assignments and the replica records. Not the cluster secret,
which is never in Redis (credentials.py). The leader
writes the marker key `seeded`; when it finds the marker gone, Redis has lost its state, and
it writes the copy back before it reconciles. Worker nodes stop no replica while the marker is missing, so a
Redis restart costs no running replica. See docs/architecture.md, "Control state".
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from ..protocol import messages
from ..runtime_env.cache import HostCache
from ..state.store import StateSnapshot, Store

log = logging.getLogger("broker_serve.controller.reconciler")


async def _unchecked() -> None:
    """No check before writes: for a caller that acts alone (a test, a tool)."""


class StateCopy:
    def __init__(self, cache: HostCache | None = None) -> None:
        self.snapshot = StateSnapshot()
        self.cache = cache  # this host's runtime_env cache, whose archives it can store again

    async def take(self, store: Store) -> None:
        """Copy the durable state, unless Redis has lost it (the copy is what restores it)."""
        if await store.is_seeded():
            self.snapshot = await store.snapshot(self.snapshot)

    async def restore_if_lost(self, store: Store,
                              before_write: Callable[[], Awaitable[None]] = _unchecked) -> bool:
        """Write the copy back if Redis lost the state; then mark the state as seeded.
        True if it wrote the copy back. `before_write` is awaited before each write: the
        leader's check that it still holds the lease, which raises if not."""
        if await store.is_seeded():
            return False
        restored = bool(self.snapshot)
        if restored:
            log.warning("Redis has lost the cluster's state; writing back what this controller "
                        "remembers (%d keys, %d hashes)", len(self.snapshot.strings),
                        len(self.snapshot.hashes))
            await before_write()
            await store.write_back(self.snapshot)
            await self._restore_packages(store, before_write)
            await before_write()
            await store.announce("apps")
            await store.announce("routes")
        await before_write()
        await store.mark_seeded()
        return restored

    async def _restore_packages(self, store: Store,
                                before_write: Callable[[], Awaitable[None]]) -> None:
        """Packages are not copied (they may be large): those the restored specs name are
        stored again from this host's cache where it has them. Nodes that have the others
        cached go on using them; a URL's is fetched again (docs/architecture.md, "Runtime
        environments")."""
        if self.cache is None:
            return
        prefix = store.names.key("spec") + ":"
        specs = {key: blob for key, blob in self.snapshot.strings.items()
                 if key.startswith(prefix)}
        digests = {digest for blob in specs.values()
                   for digest in messages.unpack(blob).get("packages", ())}
        kept = [digest for digest in sorted(digests) if self.cache.archive(digest).is_file()]
        for digest in kept:
            await before_write()
            await store.put_package(digest, self.cache.archive(digest).read_bytes())
        if digests:
            log.warning("stored %d of the %d runtime_env packages the restored deployments use "
                        "again from this host's cache", len(kept), len(digests))
