"""The cluster's control state in Redis: one place that knows the key layout and record shapes.

Writers are split so that no record has two owners:
- the driver (serve.run / REST) writes desired applications (`apps`, `spec:*`);
- the controller writes statuses, the route table and node assignments;
- a replica writes its own record and heartbeat; its worker node marks it DEAD when it exits;
- a proxy writes its own record and heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ._names import Names
from .exceptions import ClusterUnavailable

log = logging.getLogger("broker_serve.store")

HEARTBEAT_TTL_S = 10.0


def now() -> float:
    return time.time()


class Store:
    def __init__(self, redis_url: str, cluster: str) -> None:
        self.names = Names(cluster)
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            redis_url, socket_connect_timeout=5, socket_timeout=10, health_check_interval=30
        )

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
        """Say this process lives; `value` (default: the pid) is for whoever reads it."""
        await self.redis.set(key, value or str(os.getpid()), px=int(ttl_s * 1000))

    async def alive(self, keys: list[str]) -> list[bool]:
        return [value is not None for value in await self.heartbeats(keys)]

    async def heartbeats(self, keys: list[str]) -> list[bytes | None]:
        """The value of each heartbeat key, None where it expired."""
        return list(await self.redis.mget(keys)) if keys else []

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
