"""@serve.batch: unit tests of the queue, and end to end from HTTP and from handles."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from starlette.requests import Request

from broker_serve import RayServeException, serve


def test_flushes_on_size_and_on_timeout():
    sizes: list[int] = []

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def double(items: list[int]) -> list[int]:
        sizes.append(len(items))
        return [2 * i for i in items]

    async def scenario() -> list[int]:
        full = await asyncio.gather(*(double(i) for i in range(8)))
        alone = await double(100)  # no partner: sent after the timeout
        return [*full, alone]

    assert asyncio.run(scenario()) == [0, 2, 4, 6, 8, 10, 12, 14, 200]
    assert sizes == [4, 4, 1]


def test_an_exception_reaches_every_caller_of_the_batch():
    class Model:
        @serve.batch(max_batch_size=3, batch_wait_timeout_s=0.05)
        async def predict(self, items: list[str]) -> list[str]:
            raise ValueError(f"bad batch {items}")

    async def scenario() -> list[BaseException]:
        model = Model()
        return await asyncio.gather(*(model.predict(x) for x in "abc"), return_exceptions=True)

    errors = asyncio.run(scenario())
    assert all(isinstance(e, ValueError) and "bad batch" in str(e) for e in errors)


def test_a_cancelled_caller_is_dropped_from_its_batch():
    seen: list[list[int]] = []

    @serve.batch(max_batch_size=10, batch_wait_timeout_s=0.05)
    async def echo(items: list[int]) -> list[int]:
        seen.append(items)
        return items

    async def scenario() -> list[int]:
        calls = [asyncio.ensure_future(echo(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        calls[1].cancel()
        return [await calls[0], await calls[2]]

    assert asyncio.run(scenario()) == [0, 2]
    assert seen == [[0, 2]]


def test_wrong_result_length_is_an_error_for_all():
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0.01)
    async def short(items: list[int]) -> list[int]:
        return items[:1]

    async def scenario() -> list[BaseException]:
        return await asyncio.gather(short(1), short(2), return_exceptions=True)

    assert all(isinstance(e, TypeError) for e in asyncio.run(scenario()))


def test_sync_functions_are_refused():
    with pytest.raises(TypeError, match="async"):
        serve.batch(lambda items: items)


@serve.deployment(max_ongoing_requests=32)
class Batched:
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.2)
    async def handle(self, items: list[int]) -> list[dict[str, int]]:
        return [{"value": i * 10, "batch": len(items)} for i in items]

    async def __call__(self, request: Request) -> dict[str, int]:
        return await self.handle(int(request.query_params["x"]))

    async def times_ten(self, x: int) -> dict[str, int]:
        return await self.handle(x)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def fail(self, items: list[int]) -> list[int]:
        raise KeyError("whole batch")


def test_batching_over_http_and_handles(cluster):
    handle = serve.run(Batched.bind())
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda x: requests.get(f"{cluster.url}?x={x}").json(), range(8)))
    assert [a["value"] for a in answers] == [x * 10 for x in range(8)]
    assert max(a["batch"] for a in answers) > 1
    assert all(a["batch"] <= 8 for a in answers)

    responses = [handle.times_ten.remote(x) for x in range(4)]
    results = [r.result(timeout_s=30) for r in responses]
    assert [r["value"] for r in results] == [0, 10, 20, 30]
    assert max(r["batch"] for r in results) > 1

    failures = [handle.fail.remote(x) for x in range(4)]
    for failure in failures:
        with pytest.raises(RayServeException, match="whole batch"):
            failure.result(timeout_s=30)
