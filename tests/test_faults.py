"""Faults injected for real: the broker connection drops under the proxy and the replicas."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from broker_serve import serve

from .faults import TcpFaultProxy


@pytest.fixture
def broker_fault(monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpFaultProxy]:
    """Route the test cluster's AMQP connections through a fault injector. Requested before
    `cluster`, it is torn down after it, so the cluster shuts down with its broker reachable."""
    with TcpFaultProxy("127.0.0.1", 5672) as fault:
        monkeypatch.setenv("BROKER_SERVE_AMQP_URL",
                           f"amqp://guest:guest@127.0.0.1:{fault.port}/")
        yield fault


@serve.deployment
class Slow:
    async def __call__(self) -> str:
        await asyncio.sleep(3)
        return "done"


def test_broker_drop_fails_fast_then_service_resumes(broker_fault, cluster):
    serve.run(Slow.bind())
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.get, cluster.url, timeout=30)
        time.sleep(1)  # the request is now running in the replica
        started = time.monotonic()
        broker_fault.cut()
        response = pending.result()
    assert response.status_code == 503
    assert "connection to RabbitMQ was lost" in response.text
    assert time.monotonic() - started < 2  # failed at once, not after a hang

    # aio-pika reconnects, re-declares the reply queue and re-consumes: serving resumes.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answer = requests.get(cluster.url, timeout=30)
        if answer.status_code == 200:
            break
        time.sleep(0.5)
    assert answer.status_code == 200 and answer.text == "done"


@serve.deployment(num_replicas=2, max_ongoing_requests=1)
class Marked:
    async def __call__(self, request) -> int:
        marker = request.query_params.get("marker")
        if marker:
            with open(marker, "w") as file:  # tell the test which process took the request
                file.write(str(os.getpid()))
        await asyncio.sleep(2)
        return os.getpid()


def test_replica_killed_mid_request_loses_nothing(cluster, tmp_path):
    serve.run(Marked.bind())
    marker = tmp_path / "pid"
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(requests.get, f"{cluster.url}?marker={marker}", timeout=60)
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = int(marker.read_text())
        os.kill(victim, signal.SIGKILL)
        response = pending.result()
    # RabbitMQ redelivered the unacked request to the other replica, which answered it.
    assert response.status_code == 200
    assert response.json() != victim
    # The dead replica is replaced.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = serve.status().applications["default"].deployments["Marked"].replica_states
        if states == {"RUNNING": 2}:
            break
        time.sleep(0.2)
    assert states == {"RUNNING": 2}
