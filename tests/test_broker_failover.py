"""A broker that goes away, as clients see it (docs/architecture.md, "The AMQP transport"):
requests in flight fail at once, new ones get 503 while it is away, and service resumes within
seconds of its return, or at once on another node when BROKER_SERVE_AMQP_URL lists several."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from broker_serve import serve
from broker_serve.transport import addresses

from .faults import TcpFaultProxy


@serve.deployment
class Slow:
    async def __call__(self, request) -> str:
        await asyncio.sleep(float(request.query_params.get("s", "0")))
        return "done"


def get(url: str) -> tuple[int, float]:
    """The status (0: no answer) and when the answer came (time.monotonic())."""
    try:
        status = requests.get(url, timeout=15).status_code
    except requests.RequestException:
        status = 0
    return status, time.monotonic()


def first_success_within(url: str, timeout_s: float) -> float:
    """Seconds until the first 200, polling without pause but bounded by `timeout_s`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if get(url)[0] == 200:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"no 200 from {url} within {timeout_s}s")


@pytest.fixture
def two_nodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TcpFaultProxy, TcpFaultProxy]]:
    """Two addresses for the broker, each through its own fault injector, so one can "die"
    while the other serves. Requested before `cluster`, they outlive it."""
    with TcpFaultProxy("127.0.0.1", 5672) as first, TcpFaultProxy("127.0.0.1", 5672) as second:
        monkeypatch.setenv("BROKER_SERVE_AMQP_URL",
                           f"amqp://guest:guest@127.0.0.1:{first.port},127.0.0.1:{second.port}/")
        yield first, second


def test_a_broker_outage_fails_requests_fast_and_service_resumes_after_it(
        monkeypatch, cluster):
    with TcpFaultProxy("127.0.0.1", 5672) as broker:
        monkeypatch.setenv("BROKER_SERVE_AMQP_URL", f"amqp://guest:guest@127.0.0.1:{broker.port}/")
        cluster.env["BROKER_SERVE_AMQP_URL"] = f"amqp://guest:guest@127.0.0.1:{broker.port}/"
        serve.run(Slow.bind())
        assert get(cluster.url)[0] == 200
        with ThreadPoolExecutor(8) as pool:
            in_flight = [pool.submit(get, f"{cluster.url}?s=5") for _ in range(8)]
            time.sleep(1)  # they run in the replica now
            went_down = time.monotonic()
            broker.down()
            answers = [future.result() for future in in_flight]
        # Each in-flight request got its 503 within a second of the loss.
        assert [status for status, _ in answers] == [503] * 8
        assert max(answered for _, answered in answers) - went_down < 1.0
        # New requests while it is away: 503 at once, not a hang.
        for _ in range(10):
            asked = time.monotonic()
            status, answered = get(cluster.url)
            assert status == 503 and answered - asked < 1.0
        time.sleep(max(0.0, 4 - (time.monotonic() - went_down)))
        broker.up()
        assert first_success_within(cluster.url, 5.0) < 5.0


def test_processes_fail_over_to_another_listed_node(two_nodes, cluster):
    first, second = two_nodes
    assert addresses.parse(cluster.env["BROKER_SERVE_AMQP_URL"]) == [
        f"amqp://guest:guest@127.0.0.1:{first.port}/",
        f"amqp://guest:guest@127.0.0.1:{second.port}/"]
    serve.run(Slow.bind())
    assert get(cluster.url)[0] == 200
    for dying, staying in ((first, second), (second, first)):
        staying.up()
        dying.down()  # and it stays down: every process must move to the other node
        took = first_success_within(cluster.url, 10.0)
        assert took < 5.0, took
        # steady again: every request answered
        assert [get(cluster.url)[0] for _ in range(20)] == [200] * 20
