"""Redis restarting empty: serving goes on, and the controller writes the state back."""

from __future__ import annotations

import os
import threading
import time

import redis
import requests

from broker_serve import serve

from .conftest import REDIS_URL


@serve.deployment(num_replicas=2)
class Steady:
    def __call__(self) -> int:
        return os.getpid()


def test_state_is_written_back_and_no_replica_restarts(cluster):
    serve.run(Steady.bind())
    pids = {requests.get(cluster.url, timeout=30).json() for _ in range(30)}
    assert len(pids) == 2
    time.sleep(1.5)  # the controllers' copy is at most a second old
    failures: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                response = session.get(cluster.url, timeout=30)
                if response.status_code != 200:
                    failures.append(response.status_code)

    client = threading.Thread(target=load)
    client.start()
    try:
        # What an empty restart does to this cluster (other namespaces share this Redis).
        plain = redis.Redis.from_url(REDIS_URL)
        keys = list(plain.scan_iter(match=f"bs:{cluster.name}:*", count=1000))
        plain.delete(*keys)
        deadline = time.monotonic() + 20
        while not plain.exists(f"bs:{cluster.name}:seeded"):
            assert time.monotonic() < deadline, "the state was not written back"
            time.sleep(0.1)
        plain.close()
        time.sleep(15)  # past the heartbeat grace: nothing was replaced meanwhile
    finally:
        stop.set()
        client.join(30)
    assert not failures, failures[:5]
    status = serve.status().applications["default"]
    assert status.status == "RUNNING"
    assert {requests.get(cluster.url, timeout=30).json() for _ in range(30)} == pids
    # The secret was never in Redis, so losing Redis loses nothing of it: a new deploy
    # signs with it and its replicas start.
    serve.run(Steady.options(num_replicas=3).bind())
    assert len({requests.get(cluster.url, timeout=30).json() for _ in range(40)}) == 3
