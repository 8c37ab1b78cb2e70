"""Redis under Sentinel: the Store follows a failover, and a cluster keeps serving through one
and takes deploys again after it (docs/architecture.md, "Control state (Redis)")."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import orjson
import pika
import pytest
import redis
import requests

from broker_serve.config import HTTPOptions
from broker_serve.exceptions import ClusterUnavailable
from broker_serve.state import connection
from broker_serve.state.store import Store

from .conftest import AMQP_URL, Cluster
from .redis_sentinel import RedisSentinel, redis_sentinel_fixture  # noqa: F401
from .waiting import wait_for

BROKER_SERVE = [sys.executable, "-m", "broker_serve"]
RECOVERY_S = 30.0  # a failover takes a few seconds; callers' backoff is at most 5 s on top

_Result = TypeVar("_Result")


# the URL -------------------------------------------------------------------------------------
def test_a_sentinel_url_names_the_sentinels_the_service_and_both_passwords():
    address = connection.parse_sentinel_url(
        "rediss+sentinel://app:s%40cret@10.0.0.1:26380,sentinel-b,[::1]:26381/cache/3"
        "?sentinel_password=watch&socket_timeout=2.5")
    assert address.sentinels == [("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 26381)]
    assert (address.service_name, address.db, address.tls) == ("cache", 3, True)
    assert (address.username, address.password) == ("app", "s@cret")
    nodes = address.node_options()
    assert (nodes["password"], nodes["socket_timeout"], nodes["ssl"]) == ("s@cret", 2.5, True)
    # The sentinels get their own password and the timeouts, never the nodes' credentials.
    assert address.sentinel_options() == {"socket_connect_timeout": 5, "socket_timeout": 2.5,
                                          "password": "watch"}
    plain = connection.parse_sentinel_url("redis+sentinel://localhost/cache")
    assert (plain.sentinels, plain.db, plain.tls, plain.password) == (
        [("localhost", 26379)], 0, False, None)
    assert "password" not in plain.sentinel_options()


@pytest.mark.parametrize("url", [
    "redis+sentinel://localhost",  # no service
    "redis+sentinel://localhost/cache/zero",
    "redis+sentinel://localhost/cache/0/extra",
    "redis+sentinel://localhost:port/cache",
    "redis+sentinel:///cache",
])
def test_a_malformed_sentinel_url_is_refused(url):
    with pytest.raises(ValueError):
        connection.parse_sentinel_url(url)


# the Store -----------------------------------------------------------------------------------
def test_the_store_fails_over_to_the_promoted_replica(redis_sentinel):
    run(store_follows_failover(redis_sentinel), timeout=90)


async def store_follows_failover(sentinel: RedisSentinel) -> None:
    store = Store(sentinel.url, f"t{secrets.token_hex(5)}")
    events: asyncio.Queue[str] = asyncio.Queue()
    stopping = asyncio.Event()

    async def on_event(name: str | None) -> None:
        if name is not None:
            events.put_nowait(name)

    watching = asyncio.create_task(store.watch_events(on_event, 0.5, stopping))
    try:
        await store.put_http_options(HTTPOptions(host="127.0.0.1", port=1234))
        assert (await store.http_options()).port == 1234
        await until_received(store, events, "before")
        # The write reached the replica, so the promoted one has it.
        replica = redis.Redis.from_url(sentinel.node_url(sentinel.replica_ports()[0]))
        await asyncio.to_thread(wait_for, lambda: replica.exists(store.names.http_options))
        replica.close()

        old_primary = sentinel.kill_primary()
        # No primary now (the sentinels still name the dead one): ours, never redis-py's.
        with pytest.raises(ClusterUnavailable):
            await store.http_options()
        with pytest.raises(ClusterUnavailable):
            await store.put_http_options(HTTPOptions(host="127.0.0.1", port=4321))
        promoted = await asyncio.to_thread(sentinel.wait_failover, old_primary)

        options = await eventually(store.http_options)
        assert options.port == 1234  # the promoted replica's copy
        await store.put_http_options(HTTPOptions(host="127.0.0.1", port=4321))
        plain = redis.Redis.from_url(sentinel.node_url(promoted))
        assert plain.exists(store.names.http_options)  # written to the new primary itself
        plain.close()
        # The watcher subscribed again, on the new primary: an announce made there arrives.
        await until_received(store, events, "after")
    finally:
        stopping.set()
        await asyncio.wait_for(watching, 10)
        await store.close()


def test_a_write_to_a_replica_is_cluster_unavailable(redis_sentinel):
    """A plain URL still pointing at a demoted primary: the caller's retries apply."""

    async def write_to_replica() -> None:
        store = Store(redis_sentinel.node_url(redis_sentinel.replica_ports()[0]), "t-readonly")
        try:
            with pytest.raises(ClusterUnavailable, match="read-only replica"):
                await store.mark_seeded()
        finally:
            await store.close()

    run(write_to_replica(), timeout=30)


def test_a_revived_node_rejoins_and_takes_over_at_the_next_failover(redis_sentinel):
    first = redis_sentinel.fail_over()
    killed = next(port for port in redis_sentinel.nodes if port != first)
    redis_sentinel.revive(killed)
    client = connection.sync_client(redis_sentinel.url)
    try:
        client.set("bs:t-revive:marker", "1")
        wait_for(lambda: redis.Redis.from_url(redis_sentinel.node_url(killed)).get(
            "bs:t-revive:marker"))
        assert redis_sentinel.fail_over() == killed
        assert wait_for(lambda: retried(lambda: client.get("bs:t-revive:marker")),
                        timeout=RECOVERY_S) == b"1"
    finally:
        client.close()


def retried(call: Callable[[], _Result]) -> _Result | None:
    try:
        return call()
    except redis.ConnectionError:
        return None


async def eventually(call: Callable[[], Awaitable[_Result]]) -> _Result:
    """`call()`, retried while the cluster is unavailable, as Store's callers do."""
    deadline = asyncio.get_running_loop().time() + RECOVERY_S
    while True:
        try:
            return await call()
        except ClusterUnavailable:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def until_received(store: Store, events: asyncio.Queue[str], event: str) -> None:
    """Announce `event` until the watcher delivers it: until it has subscribed, pub/sub drops
    what is published."""
    deadline = asyncio.get_running_loop().time() + RECOVERY_S
    while asyncio.get_running_loop().time() < deadline:
        await eventually(lambda: store.announce(event))
        try:
            while await asyncio.wait_for(events.get(), 0.5) != event:
                pass
            return
        except TimeoutError:
            continue
    raise AssertionError(f"{event!r} was announced but never delivered")


def run(test: Awaitable[None], timeout: float) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(test, timeout)

    asyncio.run(bounded())


# a cluster, end to end ----------------------------------------------------------------------
APP = '''
import os

from broker_serve import serve


@serve.deployment(num_replicas={replicas})
class {name}:
    def __call__(self) -> dict:
        return {{"app": "{name}", "pid": os.getpid()}}


serve.run({name}.bind(), name="{name}", route_prefix="/{name}")
'''


@pytest.fixture
def sentinel_cluster(cluster: Cluster, redis_sentinel: RedisSentinel,
                     monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """A detached cluster (`broker-serve start`) whose control state is the Sentinel's."""
    cluster.env["BROKER_SERVE_REDIS_URL"] = redis_sentinel.url
    monkeypatch.setenv("BROKER_SERVE_REDIS_URL", redis_sentinel.url)
    cli(cluster, "start", "--http-port", str(cluster.port))
    try:
        yield cluster
    finally:
        cli(cluster, "stop", check=False)
        delete_queues(cluster.name, redis_sentinel.url)


def test_a_cluster_serves_through_a_failover_and_deploys_after_it(sentinel_cluster,
                                                                  redis_sentinel):
    cluster = sentinel_cluster
    deploy(cluster, "first", replicas=2)
    assert answer(f"{cluster.url}/first")["app"] == "first"

    answers: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    response = session.get(f"{cluster.url}/first", timeout=10)
                except requests.RequestException as exc:
                    failures.append(repr(exc))
                    continue
                if response.status_code == 200:
                    answers.append(response.json()["pid"])
                else:
                    failures.append(f"{response.status_code}: {response.text[:200]}")

    client = threading.Thread(target=load)
    client.start()
    try:
        wait_for(lambda: len(answers) >= 20, timeout=10)
        served_before = len(answers)
        redis_sentinel.fail_over()
        wait_for(lambda: len(answers) >= served_before + 20, timeout=10)
        time.sleep(3)  # and on, while every process finds the new primary
    finally:
        stop.set()
        client.join(30)
    assert not failures, failures[:5]

    # The control plane resumed: a new application deploys, the first one still serves.
    deploy(cluster, "second", replicas=1)
    assert answer(f"{cluster.url}/second")["app"] == "second"
    assert answer(f"{cluster.url}/first")["app"] == "first"


def deploy(cluster: Cluster, name: str, replicas: int) -> None:
    done = cluster.run_script(APP.format(name=name, replicas=replicas), timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr


def answer(url: str) -> dict[str, Any]:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def cli(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*BROKER_SERVE, *args], env=cluster.env, capture_output=True,
                          text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def delete_queues(cluster_name: str, redis_url: str) -> None:
    """The namespace's request queues: the `cluster` fixture finds those of the shared Redis."""
    client = connection.sync_client(redis_url)
    try:
        apps = client.hgetall(f"bs:{cluster_name}:apps")
    except redis.RedisError:
        apps = {}
    finally:
        client.close()
    queues = [f"bs.{cluster_name}.{app.decode()}.{deployment}"
              for app, record in apps.items() for deployment in orjson.loads(record)["deployments"]]
    amqp = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = amqp.channel()
    for queue in queues:
        channel.queue_delete(queue)
    amqp.close()
