"""What controllers remember of the cluster's Redis state, to write it back if Redis restarts
empty (it keeps nothing on disk).

Every controller, leader or standby, copies the durable part of the state once a second: the
secret, the desired applications with their specs (and spec index) and configs, the HTTP
options, the nodes, their assignments and the replica records. The leader writes the marker
key `seeded`; when it finds the marker gone, Redis has lost its state, and it writes the copy
back before it reconciles. Worker nodes stop no replica while the marker is missing, so a
Redis restart costs no running replica. See docs/architecture.md, "Control state".
"""

from __future__ import annotations

import logging

from ..state.store import Store

log = logging.getLogger("broker_serve.controller.reconciler")


class StateCopy:
    def __init__(self) -> None:
        self.strings: dict[str, bytes] = {}
        self.hashes: dict[str, dict[bytes, bytes]] = {}
        self.sets: dict[str, set[bytes]] = {}

    async def take(self, store: Store) -> None:
        """Copy the durable state, unless Redis has lost it (the copy is what restores it)."""
        names, redis = store.names, store.redis
        if not await redis.exists(names.seeded):
            return
        strings: dict[str, bytes] = {}
        for key in (names.secret, names.http_options, names.routes):
            value = await redis.get(key)
            if value is not None:
                strings[key] = value
        hashes: dict[str, dict[bytes, bytes]] = {}
        hash_keys = [names.apps, names.app_builds, names.nodes, names.replicas,
                     names.queue_arguments]
        hash_keys += [names.node_assignments(node.decode())
                      for node in await redis.hkeys(names.nodes)]
        for key in hash_keys:
            hashes[key] = await redis.hgetall(key)
        sets: dict[str, set[bytes]] = {}
        for app, record in (await store.apps()).items():
            members = await redis.smembers(names.spec_index(app))
            sets[names.spec_index(app)] = {m for m in members if isinstance(m, bytes)}
            for dep_name, dep in record.get("deployments", {}).items():
                key = names.spec(app, dep_name, dep["version"])
                spec = self.strings.get(key) or await redis.get(key)
                if spec is not None:
                    strings[key] = spec
        self.strings, self.hashes, self.sets = strings, hashes, sets

    async def restore_if_lost(self, store: Store) -> bool:
        """Write the copy back if Redis lost the state; then mark the state as seeded.
        True if it wrote the copy back."""
        names, redis = store.names, store.redis
        if await redis.exists(names.seeded):
            return False
        restored = bool(self.strings or self.hashes)
        if restored:
            log.warning("Redis has lost the cluster's state; writing back what this controller "
                        "remembers (%d keys, %d hashes)", len(self.strings), len(self.hashes))
            async with redis.pipeline(transaction=True) as pipe:
                for key, value in self.strings.items():
                    pipe.set(key, value)
                for key, fields in self.hashes.items():
                    if fields:
                        pipe.hset(key, mapping=fields)
                for key, members in self.sets.items():
                    if members:
                        pipe.sadd(key, *members)
                await pipe.execute()
            await store.announce("apps")
            await store.announce("routes")
        await redis.set(names.seeded, "1")
        return restored
