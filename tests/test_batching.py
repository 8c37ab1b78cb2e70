"""@serve.batch in replicas, end to end: over HTTP and handles, unary and streaming, several
arguments, batches split by multiplexed model id, and callers that hang up. (Its behaviour in
plain asyncio programs is in test_batch_api.py.)"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import StreamingResponse

from broker_serve import RayServeException, serve

CALLERS = 32


@serve.deployment(max_ongoing_requests=CALLERS)
class Batched:
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.2)
    async def handle(self, items: list[int]) -> list[dict[str, int]]:
        return [{"value": i * 10, "batch": len(items)} for i in items]

    async def __call__(self, request: Request) -> dict[str, int]:
        return await self.handle(int(request.query_params["x"]))

    async def times_ten(self, x: int) -> dict[str, int]:
        return await self.handle(x)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.2)
    async def pair(self, key1: list[str], key2: list[str]) -> list[dict[str, Any]]:
        return [{"pair": [a, b], "batch": len(key1)} for a, b in zip(key1, key2, strict=True)]

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def fail(self, items: list[int]) -> list[int]:
        raise KeyError("whole batch")


def test_concurrent_http_callers_each_get_their_own_result_in_shared_batches(cluster):
    handle = serve.run(Batched.bind())
    with ThreadPoolExecutor(CALLERS) as pool:
        answers = list(pool.map(lambda x: requests.get(f"{cluster.url}?x={x}").json(),
                                range(CALLERS)))
    assert [a["value"] for a in answers] == [x * 10 for x in range(CALLERS)]
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


def test_several_arguments_are_batched_from_handle_calls(cluster):
    handle = serve.run(Batched.bind())
    responses = [handle.pair.remote(f"a{i}", key2=f"b{i}") if i % 2 else
                 handle.pair.remote(key2=f"b{i}", key1=f"a{i}") for i in range(8)]
    results = [r.result(timeout_s=30) for r in responses]
    assert [r["pair"] for r in results] == [[f"a{i}", f"b{i}"] for i in range(8)]
    assert max(r["batch"] for r in results) > 1


text = FastAPI()


@serve.deployment(max_ongoing_requests=16)
@serve.ingress(text)
class Textgen:
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.5)
    async def tokens(self, prompts: list[str], counts: list[int]) -> Any:
        """Token i of each prompt, marked with the batch size; a prompt ends after its count."""
        for i in range(max(counts)):
            yield [f"{p}.{i}/{len(prompts)} " if i < n else StopIteration
                   for p, n in zip(prompts, counts, strict=True)]

    @text.get("/generate")
    async def generate(self, prompt: str, count: int) -> StreamingResponse:
        return StreamingResponse(self.tokens(prompt, counts=count), media_type="text/plain")

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=1.0)
    async def slow(self, prompts: list[str]) -> Any:
        for i in range(20):
            yield [f"{p}{i} " for p in prompts]
            await asyncio.sleep(0.05)  # the model's time per token

    @text.get("/slow")
    async def slow_route(self, prompt: str) -> StreamingResponse:
        return StreamingResponse(self.slow(prompt), media_type="text/plain")


def parse(stream: str) -> list[tuple[str, int]]:
    """(token, batch size) of each token of a Textgen stream."""
    tokens = [token.split("/") for token in stream.split()]
    return [(token, int(size)) for token, size in tokens]


def test_each_http_caller_streams_its_own_items_of_a_batched_generator(cluster):
    serve.run(Textgen.bind())
    counts = [3, 5, 1, 4]

    def get(i: int) -> str:
        response = requests.get(f"{cluster.url}/generate",
                                params={"prompt": f"p{i}", "count": counts[i]})
        assert response.status_code == 200
        return response.text

    with ThreadPoolExecutor(4) as pool:
        streams = [parse(text) for text in pool.map(get, range(4))]
    for i, stream in enumerate(streams):
        assert [token for token, _ in stream] == [f"p{i}.{n}" for n in range(counts[i])]
    assert max(size for stream in streams for _, size in stream) > 1


def test_each_handle_caller_streams_its_own_items(cluster):
    handle = serve.run(Textgen.bind()).options(stream=True)
    streams = [handle.tokens.remote(f"h{i}", counts=i + 1) for i in range(4)]
    items = [parse("".join(stream)) for stream in streams]
    for i, stream in enumerate(items):
        assert [token for token, _ in stream] == [f"h{i}.{n}" for n in range(i + 1)]
    assert max(size for stream in items for _, size in stream) > 1


def test_a_client_that_hangs_up_mid_stream_leaves_the_others_streaming(cluster):
    serve.run(Textgen.bind())
    url = f"{cluster.url}/slow"
    with ThreadPoolExecutor(3) as pool:  # at once: each waits for its batch's first token
        streams = list(pool.map(
            lambda i: requests.get(url, params={"prompt": f"s{i}"}, stream=True), range(3)))
    try:
        first = next(streams[0].iter_content(chunk_size=None))
        assert first.startswith(b"s0")
        streams[0].close()  # hangs up after its first token
        rest = [stream.text.split() for stream in streams[1:]]
    finally:
        for stream in streams:
            stream.close()
    assert rest == [[f"s{i}{n}" for n in range(20)] for i in (1, 2)]
    # The batch that lost a caller, and the queue, still work for the next ones.
    assert requests.get(url, params={"prompt": "t"}, timeout=30).text.split() == [
        f"t{n}" for n in range(20)]


@serve.deployment(max_ongoing_requests=16)
class PerModel:
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.3)
    async def predict(self, items: list[str]) -> list[dict[str, Any]]:
        model_id = serve.get_multiplexed_model_id()
        return [{"model": model_id, "item": item, "batch": items} for item in items]

    async def __call__(self, request: Request) -> dict[str, Any]:
        return await self.predict(request.query_params["item"])


def test_a_batch_holds_requests_of_one_multiplexed_model_only(cluster):
    handle = serve.run(PerModel.bind())

    def get(i: int) -> dict[str, Any]:
        model = f"m{i % 2}"
        answer: dict[str, Any] = requests.get(
            cluster.url, params={"item": f"{model}-{i}"},
            headers={"serve_multiplexed_model_id": model}).json()
        return answer

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(get, range(8)))
    for i, answer in enumerate(answers):
        assert answer["item"] == f"m{i % 2}-{i}"
        assert answer["model"] == f"m{i % 2}"  # the handler saw its batch's model
        assert all(item.startswith(answer["model"] + "-") for item in answer["batch"])
    assert max(len(answer["batch"]) for answer in answers) > 1

    by_handle = [handle.options(multiplexed_model_id=f"h{i % 2}").predict.remote(f"h{i % 2}-{i}")
                 for i in range(4)]
    for response in by_handle:
        result = response.result(timeout_s=30)
        assert all(item.startswith(result["model"] + "-") for item in result["batch"])
