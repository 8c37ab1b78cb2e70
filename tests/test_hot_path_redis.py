"""A synchronous request costs no Redis round trip (docs/performance.md): not over HTTP, not
through a handle, now that the same proxies and replicas also run jobs, priorities and
deadlines. The cluster runs on a Redis server of the test's own, so that every command it
processes is the cluster's; the commands of a window with many requests are compared with
those of an equally long window with none, so the controller's, nodes' and heartbeats' own
commands cancel out."""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from broker_serve import serve

from .conftest import free_port
from .waiting import wait_for

REQUESTS = 1000  # of each kind: a round trip in one request in ten would add 200 commands
QUIET_WINDOWS = 3  # the quiet window is this many times as long, for a steadier background


@serve.deployment(max_ongoing_requests=64)
class Noop:
    async def __call__(self, *args: object) -> str:
        return "ok"


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    """A Redis server on a free port, stopped after the cluster that uses it (a test names
    this fixture before `cluster`)."""
    port = free_port()
    with open(tmp_path / "redis.log", "ab") as log:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=5)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_for(answers, timeout=10)
        yield client
    finally:
        client.close()
        server.terminate()
        server.wait(10)


def commands(client: redis.Redis) -> Counter[str]:
    """How many commands of each name the server has processed."""
    return Counter({name.removeprefix("cmdstat_"): stats["calls"]
                    for name, stats in client.info("commandstats").items()})


def test_synchronous_requests_cost_no_redis_round_trip(own_redis, cluster, monkeypatch):
    port = own_redis.connection_pool.connection_kwargs["port"]
    monkeypatch.setenv("BROKER_SERVE_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    handle = serve.run(Noop.bind(), route_prefix="/noop")
    url = f"{cluster.url}/noop"
    with requests.Session() as session:
        for _ in range(20):  # past the first calls, which read routes and configs
            assert session.get(url, timeout=30).text == "ok"
            assert handle.remote().result(timeout_s=30) == "ok"
        before = commands(own_redis)
        started = time.monotonic()
        for _ in range(REQUESTS):
            assert session.get(url, timeout=30).text == "ok"
            assert handle.remote().result(timeout_s=30) == "ok"
        elapsed = time.monotonic() - started
    busy = commands(own_redis) - before
    before = commands(own_redis)
    time.sleep(elapsed * QUIET_WINDOWS)
    quiet = commands(own_redis) - before
    # Both windows hold the cluster's periodic commands (heartbeats, the controller's rounds,
    # route refreshes), which come in bursts: a window of a second may hold one round more
    # than another. So the background is the quiet window's rate over a longer window, and a
    # per-request command would still show as hundreds more.
    background = sum(quiet.values()) / QUIET_WINDOWS
    extra = sum(busy.values()) - background
    assert extra < REQUESTS // 10, (
        f"{2 * REQUESTS} requests in {elapsed:.1f}s: {sum(busy.values())} Redis commands, "
        f"{background:.0f} in as long without requests; by name: {dict(busy)}")
