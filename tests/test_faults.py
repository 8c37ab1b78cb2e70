"""Faults injected for real: the broker connection drops under the proxy and the replicas."""

from __future__ import annotations

import asyncio
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
