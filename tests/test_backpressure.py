"""max_queued_requests bounds a deployment's queue; past it callers hear so at once."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from broker_serve import BackPressureError, RayServeException, serve


@serve.deployment(max_ongoing_requests=1, max_queued_requests=2)
class Narrow:
    async def __call__(self) -> str:
        await asyncio.sleep(0.5)
        return "done"


def test_over_the_bound_callers_get_fast_503s(cluster):
    serve.run(Narrow.bind())

    def call(_: int) -> tuple[int, float, str]:
        started = time.monotonic()
        response = requests.get(cluster.url, timeout=30)
        return response.status_code, time.monotonic() - started, response.headers.get(
            "retry-after", "")

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, range(12)))
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert 3 <= statuses.count(200) < 12  # one running, two queued, maybe one more racing
    rejected = [(elapsed, retry) for status, elapsed, retry in results if status == 503]
    assert all(elapsed < 0.4 for elapsed, _ in rejected), rejected  # not after a wait
    assert all(retry == "1" for _, retry in rejected)
    assert requests.get(cluster.url).text == "done"  # serving goes on


def test_a_handle_call_past_the_bound_raises(cluster):
    handle = serve.run(Narrow.bind())
    responses = [handle.remote() for _ in range(8)]
    outcomes = []
    for response in responses:
        try:
            outcomes.append(response.result(timeout_s=30))
        except RayServeException as exc:
            outcomes.append(exc.error_type)
            assert isinstance(exc, BackPressureError), exc  # Ray's name for it
    assert "QueueFull" in outcomes and "done" in outcomes
    assert set(outcomes) == {"QueueFull", "done"}


def test_zero_is_not_a_queue_bound():
    with pytest.raises(ValueError, match="max_queued_requests"):
        Narrow.options(max_queued_requests=0)
