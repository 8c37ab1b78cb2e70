"""The Store: redis's errors come out as ours, and a record's two writers keep each other's
fields."""

from __future__ import annotations

import asyncio
import secrets

import pytest
import redis

from broker_serve.exceptions import ClusterUnavailable, StateError
from broker_serve.state.store import Store

from .conftest import REDIS_URL


def _cluster() -> str:
    return f"store-{secrets.token_hex(4)}"


def _cleanup(cluster: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(f"bs:{cluster}:*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def test_an_unreachable_redis_raises_cluster_unavailable():
    async def scenario() -> None:
        store = Store("redis://127.0.0.1:1/0", "unreachable")  # nothing listens on port 1
        try:
            await store.apps()
        finally:
            await store.close()

    with pytest.raises(ClusterUnavailable, match="cannot reach Redis") as caught:
        asyncio.run(scenario())
    assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)


def test_a_refused_command_raises_state_error():
    cluster = _cluster()

    async def scenario() -> None:
        store = Store(REDIS_URL, cluster)
        try:
            # A string where a hash belongs: Redis answers WRONGTYPE.
            client = redis.asyncio.Redis.from_url(REDIS_URL)
            await client.set(store.names.apps, "not a hash")
            await client.aclose()
            await store.apps()
        finally:
            await store.close()

    try:
        with pytest.raises(StateError, match="WRONGTYPE") as caught:
            asyncio.run(scenario())
        assert isinstance(caught.value.__cause__, redis.exceptions.ResponseError)
    finally:
        _cleanup(cluster)


def test_two_writers_of_a_replica_record_keep_each_others_fields():
    """The replica and its worker node write the same record at once: neither loses the
    other's fields."""
    cluster = _cluster()

    async def scenario() -> dict[str, object]:
        replica, node = Store(REDIS_URL, cluster), Store(REDIS_URL, cluster)
        try:
            await replica.put_replica({"replica_id": "r", "app": "a", "deployment": "d"})
            writes = []
            for i in range(20):
                # A field of its own per write: a lost update shows as a missing field.
                writes.append(replica.update_replica("r", **{f"replica{i}": i}))
                writes.append(node.update_replica("r", **{f"node{i}": i}))
            await asyncio.gather(*writes)
            await node.update_replica("r", state="DEAD")
            record = await replica.replica("r")
            assert record is not None
            return dict(record)
        finally:
            await replica.close()
            await node.close()

    try:
        record = asyncio.run(scenario())
    finally:
        _cleanup(cluster)
    assert record == {"replica_id": "r", "app": "a", "deployment": "d", "state": "DEAD",
                      **{f"replica{i}": i for i in range(20)},
                      **{f"node{i}": i for i in range(20)}}
