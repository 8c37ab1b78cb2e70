"""The cluster's control state in Redis: one place that knows the key layout and record shapes.

Writers are split so that no record has two owners:
- the driver (serve.run / REST) writes desired applications (`apps`, `spec:*`, `specs:*`);
- the controller writes statuses, the route table and node assignments;
- a replica writes its own record and heartbeat; its worker node marks it DEAD when it exits;
- a proxy writes its own record and heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..exceptions import ClusterUnavailable
from ..protocol.names import Names
from .liveness import is_gone, stamp

log = logging.getLogger("broker_serve.store")

HEARTBEAT_TTL_S = 10.0

# Deletes the lease only if it still names the holder that was found dead.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Deletes an application's specs, except those its current record names: decided and done in
# one step, so a spec written (with its record, atomically) by a deploy that comes back a
# moment later is never lost. KEYS: the `apps` hash, the app's spec index. ARGV: the app's
# name, the prefix of its spec keys. The spec keys come from the index, not from KEYS, which
# is fine on a single Redis (not on Redis Cluster).
_DELETE_UNNAMED_SPECS = """
local keep = {}
local record = redis.call('HGET', KEYS[1], ARGV[1])
if record then
  for deployment, dep in pairs(cjson.decode(record)['deployments'] or {}) do
    keep[ARGV[2] .. deployment .. ':' .. dep['version']] = true
  end
end
local deleted = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not keep[key] then
    redis.call('DEL', key)
    redis.call('SREM', KEYS[2], key)
    deleted = deleted + 1
  end
end
return deleted
"""


def now() -> float:
    return time.time()


class Store:
    def __init__(self, redis_url: str, cluster: str) -> None:
        self.names = Names(cluster)
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            redis_url, socket_connect_timeout=5, socket_timeout=10, health_check_interval=30
        )
        self._release_lease = self.redis.register_script(_RELEASE_LEASE)
        self._delete_unnamed_specs = self.redis.register_script(_DELETE_UNNAMED_SPECS)

    async def close(self) -> None:
        await self.redis.aclose()

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            raise ClusterUnavailable(f"cannot reach Redis: {exc}") from exc

    # secret ---------------------------------------------------------------------------------
    async def secret(self) -> bytes:
        """The cluster secret that signs pickles; created by whoever asks first."""
        key = self.names.secret
        await self.redis.set(key, secrets.token_hex(32), nx=True)
        value = await self.redis.get(key)
        assert value is not None
        return bytes(value)

    # hashes of JSON records -----------------------------------------------------------------
    async def get_all(self, key: str) -> dict[str, dict[str, Any]]:
        raw = await self.redis.hgetall(key)
        return {k.decode(): orjson.loads(v) for k, v in raw.items()}

    async def get_one(self, key: str, field: str) -> dict[str, Any] | None:
        raw = await self.redis.hget(key, field)
        return orjson.loads(raw) if raw else None

    async def put(self, key: str, field: str, record: dict[str, Any]) -> None:
        await self.redis.hset(key, field, orjson.dumps(record))

    async def update(self, key: str, field: str, **changes: Any) -> None:
        record = await self.get_one(key, field) or {}
        record.update(changes)
        await self.put(key, field, record)

    async def delete_field(self, key: str, *fields: str) -> None:
        if fields:
            await self.redis.hdel(key, *fields)

    # applications -----------------------------------------------------------------------------
    async def apps(self) -> dict[str, dict[str, Any]]:
        return await self.get_all(self.names.apps)

    async def app_statuses(self) -> dict[str, dict[str, Any]]:
        return await self.get_all(self.names.key("app_status"))

    async def put_app(self, record: dict[str, Any], specs: dict[str, bytes]) -> None:
        """Write an application's specs and its record in one transaction: a controller sees
        both or neither, so it never takes the specs for a deleted app's leftovers."""
        names, name = self.names, record["name"]
        async with self.redis.pipeline(transaction=True) as pipe:
            for key, blob in specs.items():
                pipe.set(key, blob)
            if specs:
                pipe.sadd(names.spec_index(name), *specs)
            pipe.hset(names.apps, name, orjson.dumps(record))
            pipe.hdel(names.app_builds, name)  # a failed config build is superseded
            await pipe.execute()

    async def delete_unnamed_specs(self, app: str) -> int:
        """Delete the app's specs that its record (if it has one again) does not name."""
        names = self.names
        deleted = await self._delete_unnamed_specs(
            keys=[names.apps, names.spec_index(app)], args=[app, names.key("spec", app) + ":"])
        return int(deleted)

    async def put_app_status(self, name: str, status: dict[str, Any]) -> None:
        await self.put(self.names.key("app_status"), name, status)

    async def spec(self, app: str, deployment: str, version: str) -> bytes | None:
        value = await self.redis.get(self.names.spec(app, deployment, version))
        return bytes(value) if value is not None else None

    # routes -----------------------------------------------------------------------------------
    async def routes(self) -> dict[str, Any]:
        raw = await self.redis.get(self.names.routes)
        return orjson.loads(raw) if raw else {"version": 0, "routes": {}}

    # liveness ---------------------------------------------------------------------------------
    async def heartbeat(self, key: str, value: str | None = None,
                        ttl_s: float = HEARTBEAT_TTL_S) -> None:
        """Say this process lives; `value` (default: the process's stamp, which lets a reader
        on the same machine see at once that it died, `_liveness.py`) is for whoever reads it."""
        await self.redis.set(key, value or stamp(), px=int(ttl_s * 1000))

    async def alive(self, keys: list[str]) -> list[bool]:
        """Whether each heartbeat is current and its writer not provably gone."""
        return [value is not None and not is_gone(value) for value in await self.heartbeats(keys)]

    async def heartbeats(self, keys: list[str]) -> list[bytes | None]:
        """The value of each heartbeat key, None where it expired."""
        return list(await self.redis.mget(keys)) if keys else []

    async def lease_holder(self) -> str | None:
        """The id of the controller holding the lease, or None.

        A holder that provably died (a controller of this machine that was killed) gives the
        lease up at once, so that nobody waits up to the lease's TTL for a dead controller.
        """
        key = self.names.controller_lease
        holder = await self.redis.get(key)
        if holder is None:
            return None
        holder_id = holder.decode() if isinstance(holder, bytes) else str(holder)
        if is_gone(await self.redis.get(self.names.controller_alive(holder_id))):
            if await self._release_lease(keys=[key], args=[holder]):
                log.info("controller %s is gone; its lease is released", holder_id)
            return None
        return holder_id

    # change notification --------------------------------------------------------------------
    async def announce(self, event: str) -> None:
        await self.redis.publish(self.names.events, event)

    async def watch_events(self, on_event: Any, period_s: float, stopping: Any) -> None:
        """Call `await on_event(name)` for each announced change and `on_event(None)` every
        `period_s`, until `stopping` (an asyncio.Event) is set.

        Pub/sub loses messages while disconnected, so the periodic call is what makes readers
        correct; the events only make them quick.
        """
        backoff = 0.5
        while not stopping.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.names.events)
                await on_event(None)
                backoff = 0.5
                last = asyncio.get_running_loop().time()
                while not stopping.is_set():
                    message = await pubsub.get_message(timeout=min(period_s, 1.0))
                    if message is not None:
                        await on_event(message["data"].decode())
                    elif asyncio.get_running_loop().time() - last >= period_s:
                        last = asyncio.get_running_loop().time()
                        await on_event(None)
            except (RedisError, OSError) as exc:
                log.warning("lost Redis (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass
