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
from .waiting import wait_for


@pytest.fixture
def broker_fault(monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpFaultProxy]:
    """Route the test cluster's AMQP connections through a fault injector. Requested before
    `cluster`, it is torn down after it, so the cluster shuts down with its broker reachable."""
    with TcpFaultProxy("127.0.0.1", 5672) as fault:
        monkeypatch.setenv("BROKER_SERVE_AMQP_URL",
                           f"amqp://guest:guest@127.0.0.1:{fault.port}/?reconnect_interval=1")
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


@serve.deployment
class Tally:
    """Each run appends a line, then takes a while: the test cuts the broker meanwhile."""

    def __init__(self, runs: str) -> None:
        self.runs = runs

    async def __call__(self, key: str) -> int:
        with open(self.runs, "a") as file:
            file.write(f"{key}\n")
        await asyncio.sleep(1.0)
        with open(self.runs) as file:
            return file.read().count(f"{key}\n")


def test_redeliveries_after_lost_connections_do_not_count_as_deaths(
        broker_fault, cluster, tmp_path):
    """The replica lives while its connection is cut under a running request, three times:
    each redelivery is a live replica's release, not a death, so the fourth delivery runs
    and answers instead of being dead-lettered with 502 RequestKilledReplicas."""
    from .test_protocol_foreign import ForeignClient, request_queue

    runs = tmp_path / "runs"
    serve.run(Tally.bind(str(runs)), route_prefix=None)
    client = ForeignClient("amqp://guest:guest@127.0.0.1:5672/")  # around the fault injector
    try:
        queue = request_queue(cluster.name, "default", "Tally")
        request_id = client.publish(queue, "call", pack_call("__call__", "k"))
        for run in range(1, 4):
            wait_for(lambda run=run: _count(runs, "k") >= run, timeout=60)
            broker_fault.cut()
        [event] = client.wait_for(request_id, timeout=60)
    finally:
        client.close()
    assert (event.type, event.body.get("value")) == ("result", 4), event.body


@serve.deployment
class Poison:
    """Kills its replica with every request it gets."""

    def __init__(self, runs: str) -> None:
        self.runs = runs

    def __call__(self, key: str) -> None:
        with open(self.runs, "a") as file:
            file.write(f"{key}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_request_that_kills_its_replicas_is_dead_lettered_on_its_fourth_delivery(
        cluster, tmp_path):
    from .test_protocol_foreign import ForeignClient, dead_letter_queue, request_queue

    runs = tmp_path / "runs"
    serve.run(Poison.bind(str(runs)), route_prefix=None)
    client = ForeignClient("amqp://guest:guest@127.0.0.1:5672/")
    try:
        request_id = client.publish(request_queue(cluster.name, "default", "Poison"), "call",
                                    pack_call("__call__", "p"))
        [event] = client.wait_for(request_id, timeout=90)
        assert event.type == "error" and event.body["status"] == 502, event.body
        assert event.body["error"] == "RequestKilledReplicas"
        assert _count(runs, "p") == 3  # three replicas died running it; the fourth refused it
        dead = dead_letter_queue(cluster.name)
        _, properties, _ = wait_for(
            lambda: (got := client.channel.basic_get(dead, auto_ack=True))[0] and got, timeout=10)
        assert properties.message_id == request_id
    finally:
        client.close()


def pack_call(method: str, *args: object) -> bytes:
    import msgpack

    return msgpack.packb({"method": method, "args": list(args), "kwargs": {}}, use_bin_type=True)


def _count(path, key: str) -> int:
    return path.read_text().count(f"{key}\n") if path.exists() else 0
