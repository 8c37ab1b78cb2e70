"""Removing every Redis key and RabbitMQ queue of a cluster namespace (as tests/conftest.py's
`cleanup_namespace` does, without its test-only dependency on pika)."""

from __future__ import annotations

import asyncio
import os

import aio_pika
import orjson
import redis


def amqp_url() -> str:
    return os.environ.get("BROKER_SERVE_AMQP_URL", "amqp://guest:guest@localhost:5672/")


def _redis_url() -> str:
    return os.environ.get("BROKER_SERVE_REDIS_URL", "redis://localhost:6379/0")


def namespace_queues(cluster: str) -> set[str]:
    """The request queues Redis knows of for `cluster`, plus its dead-letter queue."""
    client = redis.Redis.from_url(_redis_url())
    try:
        queues = {f"bs.{cluster}.dead"}
        for key in (f"bs:{cluster}:apps", f"bs:{cluster}:app_status"):
            for app, record in client.hgetall(key).items():
                for dep in orjson.loads(record).get("deployments", {}):
                    queues.add(f"bs.{cluster}.{app.decode()}.{dep}")
        return queues
    finally:
        client.close()


def cleanup_namespace(cluster: str, extra_queues: set[str] | None = None) -> None:
    if not cluster.startswith("bench"):
        raise ValueError(f"refusing to clean up {cluster!r}: not a benchmark namespace")
    queues = namespace_queues(cluster) | (extra_queues or set())
    client = redis.Redis.from_url(_redis_url())
    try:
        keys = list(client.scan_iter(match=f"bs:{cluster}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
    asyncio.run(_delete_amqp(queues, f"bs.{cluster}.cancel"))


async def _delete_amqp(queues: set[str], exchange: str) -> None:
    connection = await aio_pika.connect(amqp_url(), timeout=10)
    async with connection:
        for queue in sorted(queues):
            channel = await connection.channel()
            try:
                await channel.queue_delete(queue)
            except aio_pika.exceptions.AMQPError:
                pass
            finally:
                if not channel.is_closed:
                    await channel.close()
        channel = await connection.channel()
        try:
            await channel.exchange_delete(exchange)
        except aio_pika.exceptions.AMQPError:
            pass
