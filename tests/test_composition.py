"""Composition end to end: deployments that call deployments through handles.

What other modules already prove is not repeated here: a bound deployment arriving as a handle
and `get_app_handle` inside a replica (test_handles), cancellation cascading to awaited and
unawaited handle calls and `DeploymentResponse.cancel()` (test_cascade), batching over HTTP with
`max_batch_size=8` (test_batching), a model id from the header and from handles
(test_multiplex), and a pickle with a random, empty or zero `sig` refused unloaded
(test_protocol_foreign).
"""

from __future__ import annotations

import asyncio
import json
import pickle
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis
import requests
from starlette.requests import Request
from starlette.responses import StreamingResponse

from broker_serve import BrokerServeError, RayServeException, serve

from .conftest import REDIS_URL
from .test_protocol_foreign import ForeignClient, assert_error, pack, request_queue


# --- chaining: an unawaited response as another call's argument --------------------------------
@serve.deployment
class Doubler:
    async def __call__(self, x: int) -> int:
        await asyncio.sleep(0.05)  # still running when the next call is made
        if x < 0:
            raise ValueError(f"negative: {x}")
        return 2 * x


@serve.deployment
class Describer:
    def __call__(self, value: Any) -> dict[str, Any]:
        # What arrived: the resolved value, never a response object.
        return {"value": value, "type": type(value).__name__}


@serve.deployment
class Pipeline:
    def __init__(self, doubler: Any, describer: Any) -> None:
        self.doubler = doubler
        self.describer = describer

    async def __call__(self, request: Request) -> dict[str, Any]:
        return await self.compute(int(request.query_params["x"]))

    async def compute(self, x: int) -> dict[str, Any]:
        doubled = self.doubler.remote(x)
        return await self.describer.remote(doubled)

    async def fan_out(self, x: int) -> list[Any]:
        """One response passed to two calls and awaited here too, as Ray Serve allows."""
        doubled = self.doubler.remote(x)
        first = self.describer.remote(doubled)
        second = self.describer.remote(doubled)
        # Bounded: with the bug one of the three waits forever.
        return list(await asyncio.wait_for(asyncio.gather(first, second, doubled), 3))


def test_unawaited_response_is_resolved_before_the_next_call(cluster):
    handle = serve.run(Pipeline.bind(Doubler.bind(), Describer.bind()), name="chain")
    expected = {"value": 42, "type": "int"}
    assert requests.get(f"{cluster.url}?x=21", timeout=10).json() == expected
    assert handle.compute.remote(21).result(timeout_s=10) == expected
    # From the driver: a response of one handle as the argument of another.
    doubler = serve.get_deployment_handle("Doubler", app_name="chain")
    describer = serve.get_deployment_handle("Describer", app_name="chain")
    assert describer.remote(doubler.remote(5)).result(timeout_s=10) == {"value": 10,
                                                                        "type": "int"}


# In its own process: with the bug the calls never resolve, and a response left waiting in this
# process would be collected during a later test.
CANNOT_BE_SENT = """
import threading
from broker_serve import RayServeException, serve

doubler = serve.get_deployment_handle("Doubler", app_name="chain")
describer = serve.get_deployment_handle("Describer", app_name="chain")


def outcome(response):
    try:
        return f"value {response.result(timeout_s=2)!r}"
    except TimeoutError:
        return "no answer in 2 s"
    except RayServeException as exc:
        return f"RayServeException {exc.deployment} {exc.error_type}: {exc}"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


print(outcome(describer.remote(doubler.remote(-1))))
print(outcome(describer.remote(threading.Lock())))
"""


def test_a_call_that_cannot_be_sent_fails_instead_of_hanging(cluster):
    serve.run(Pipeline.bind(Doubler.bind(), Describer.bind()), name="chain")
    done = cluster.run_script(CANNOT_BE_SENT, timeout=60)
    failed_argument, unpicklable = done.stdout.splitlines()
    # A failed argument fails the chained call with the first callee's error.
    assert failed_argument.startswith("RayServeException chain/Doubler ValueError"), done.stdout
    assert "negative: -1" in failed_argument
    assert unpicklable.startswith("TypeError") and "pickle" in unpicklable, done.stdout


def test_one_response_passed_to_two_calls_and_awaited(cluster):
    handle = serve.run(Pipeline.bind(Doubler.bind(), Describer.bind()), name="chain")
    assert handle.fan_out.remote(4).result(timeout_s=10) == [
        {"value": 8, "type": "int"}, {"value": 8, "type": "int"}, 8]


# --- streaming handle calls ---------------------------------------------------------------------
@serve.deployment
class Producer:
    async def count(self, n: int, interval_s: float):
        for i in range(n):
            if i:
                await asyncio.sleep(interval_s)
            yield {"i": i, "produced_at": time.time()}


@serve.deployment
class StreamRelay:
    def __init__(self, producer: Any) -> None:
        self.producer = producer

    async def __call__(self, request: Request) -> StreamingResponse:
        n, interval_s = int(request.query_params["n"]), float(request.query_params["s"])
        items = self.producer.options(method_name="count", stream=True).remote(n, interval_s)

        async def lines():
            async for item in items:
                yield json.dumps(item) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")


N_ITEMS, INTERVAL_S = 4, 0.4  # the generator runs for 1.2 s


def assert_arrived_as_produced(arrivals: list[tuple[float, dict[str, Any]]]) -> None:
    assert [item["i"] for _, item in arrivals] == list(range(N_ITEMS))
    first_arrival = arrivals[0][0]
    last_produced = arrivals[-1][1]["produced_at"]
    # The first item is in hand while the generator still has most of its work to do.
    assert last_produced - first_arrival > 0.5 * (N_ITEMS - 1) * INTERVAL_S, arrivals
    for arrived, item in arrivals:
        assert arrived - item["produced_at"] < INTERVAL_S, arrivals  # none waited for the next


def test_streaming_call_from_a_replica_and_from_the_driver(cluster):
    serve.run(StreamRelay.bind(Producer.bind()))
    with requests.get(f"{cluster.url}?n={N_ITEMS}&s={INTERVAL_S}", stream=True,
                      timeout=10) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        over_http = [(time.time(), json.loads(line)) for line in response.iter_lines() if line]
    assert_arrived_as_produced(over_http)

    producer = serve.get_deployment_handle("Producer", app_name="default")
    items = producer.options(method_name="count", stream=True).remote(N_ITEMS, INTERVAL_S)
    from_driver = [(time.time(), item) for item in items]
    assert_arrived_as_produced(from_driver)


# --- handles by name, .result() in sync code ----------------------------------------------------
@serve.deployment
class SyncCaller:
    def __init__(self, doubler: Any) -> None:
        self.doubler = doubler

    def __call__(self, x: int) -> dict[str, Any]:  # sync: runs in the replica's thread pool
        return {"doubled": self.doubler.remote(x).result(timeout_s=10), "x": x}

    async def blocks_the_loop(self, x: int) -> int:
        return self.doubler.remote(x).result(timeout_s=10)  # refused: it would deadlock


@serve.deployment
class Slow:
    async def __call__(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"


def test_handles_by_name_and_result_from_sync_code(cluster):
    serve.run(SyncCaller.bind(Doubler.bind()), name="sync", route_prefix="/sync")
    by_app = serve.get_app_handle("sync")
    assert by_app.deployment_name == "SyncCaller"
    assert by_app.remote(7).result(timeout_s=10) == {"doubled": 14, "x": 7}
    by_name = serve.get_deployment_handle("Doubler", app_name="sync")
    assert by_name.remote(8).result(timeout_s=10) == 16
    with pytest.raises(RayServeException, match="Use `await response` instead") as info:
        by_app.blocks_the_loop.remote(1).result(timeout_s=10)
    assert info.value.error_type == "RuntimeError"
    with pytest.raises(ValueError, match="no application"):
        serve.get_app_handle("no-such-app")


def test_result_times_out(cluster):
    handle = serve.run(Slow.bind(), name="slow", route_prefix=None)
    response = handle.remote(1.0)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        response.result(timeout_s=0.2)
    assert time.monotonic() - started < 0.9
    response.cancel()  # so that nothing waits on it when the test's runtime stops


def test_result_after_a_timeout_still_gives_the_value(cluster):
    handle = serve.run(Slow.bind(), name="slow", route_prefix=None)
    response = handle.remote(0.5)
    with pytest.raises(TimeoutError):
        response.result(timeout_s=0.1)
    assert response.result(timeout_s=10) == "done"


# --- batching ------------------------------------------------------------------------------------
@serve.deployment(max_ongoing_requests=32)
class BatchRecorder:
    def __init__(self) -> None:
        self.batch_sizes: list[int] = []

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.2)
    async def square(self, items: list[int]) -> list[dict[str, int]]:
        self.batch_sizes.append(len(items))
        return [{"x": x, "square": x * x} for x in items]

    async def __call__(self, request: Request) -> dict[str, int]:
        return await self.square(int(request.query_params["x"]))

    def sizes(self) -> list[int]:
        return self.batch_sizes


def test_sixteen_concurrent_requests_in_batches_of_at_most_four(cluster):
    handle = serve.run(BatchRecorder.bind())
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(
            lambda x: requests.get(f"{cluster.url}?x={x}", timeout=10).json(), range(16)))
    assert answers == [{"x": x, "square": x * x} for x in range(16)]
    sizes = handle.sizes.remote().result(timeout_s=10)
    assert sum(sizes) == 16, sizes
    assert max(sizes) > 1, sizes
    assert all(1 <= size <= 4 for size in sizes), sizes


# --- multiplexing --------------------------------------------------------------------------------
@serve.deployment(num_replicas=1)
class CountingModels:
    def __init__(self) -> None:
        self.loads: dict[str, int] = {}

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> dict[str, str]:
        self.loads[model_id] = self.loads.get(model_id, 0) + 1
        await asyncio.sleep(0.05)
        return {"model": model_id}

    async def __call__(self, request: Request) -> dict[str, Any]:
        return await self.predict()

    async def predict(self) -> dict[str, Any]:
        model = await self.get_model(serve.get_multiplexed_model_id())
        return {"model": model["model"], "object": id(model)}

    def load_counts(self) -> dict[str, int]:
        return self.loads


def test_a_multiplexed_model_is_loaded_once_and_reused(cluster):
    handle = serve.run(CountingModels.bind())
    answers = [requests.get(cluster.url, headers={"serve_multiplexed_model_id": "a"},
                            timeout=10).json() for _ in range(4)]
    answers += [handle.predict.options(multiplexed_model_id="a").remote().result(timeout_s=10)
                for _ in range(4)]
    assert {a["model"] for a in answers} == {"a"}
    assert len({a["object"] for a in answers}) == 1  # the same loaded object every time
    for _ in range(3):
        handle.predict.options(multiplexed_model_id="b").remote().result(timeout_s=10)
    assert handle.load_counts.remote().result(timeout_s=10) == {"a": 1, "b": 1}


# --- trust: a pickle without a valid signature --------------------------------------------------
class _TouchOnLoad:
    """Pickles to `open(path, "w")`: loading the pickle creates the file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_pickle_without_a_signature_is_refused_unloaded(cluster, tmp_path):
    serve.run(Describer.bind(), name="trust", route_prefix=None)
    marker = tmp_path / "unpickled"
    pickled = pickle.dumps(((_TouchOnLoad(str(marker)),), {}))
    queue = request_queue(cluster.name, "trust", "Describer")
    client = ForeignClient()
    try:
        # test_protocol_foreign sends random, empty and zero signatures; these are the rest.
        for extra in ({}, {"sig": None}, {"sig": "not bytes"}, {"sig": 12345}):
            body = pack({"method": "__call__", "pickled": pickled, **extra})
            assert_error(client.collect(client.publish(queue, "call", body)), 403,
                         "UntrustedPayload")
        reply = client.call(queue, "__call__", 1)  # the replica still serves
        assert reply.terminal.body["value"] == {"value": 1, "type": "int"}
    finally:
        client.close()
    assert not marker.exists()


# --- errors and the replica context -------------------------------------------------------------
@serve.deployment
class Thrower:
    def fail(self, text: str) -> None:
        raise ValueError(text)

    def whoami(self) -> dict[str, Any]:
        context = serve.get_replica_context()
        return {"app": context.app_name, "deployment": context.deployment,
                "replica_id": context.replica_id, "replica_tag": context.replica_tag,
                "servable_is_self": context.servable_object is self}


@serve.deployment
class Catcher:
    def __init__(self, thrower: Any) -> None:
        self.thrower = thrower

    async def __call__(self, text: str) -> dict[str, str]:
        try:
            await self.thrower.fail.remote(text)
        except RayServeException as exc:
            return {"class": type(exc).__name__, "error_type": exc.error_type,
                    "deployment": exc.deployment, "message": str(exc)}
        return {"class": "none"}

    async def passthrough(self, text: str) -> None:
        await self.thrower.fail.remote(text)


def test_a_callee_error_reaches_the_caller_with_its_type_and_message(cluster):
    handle = serve.run(Catcher.bind(Thrower.bind()), name="errors", route_prefix=None)
    caught = handle.remote("bad input 7").result(timeout_s=10)
    assert caught["class"] == "RayServeException(ValueError)"
    assert caught["error_type"] == "ValueError"
    assert caught["deployment"] == "errors/Thrower"
    assert "Thrower" in caught["message"] and "bad input 7" in caught["message"]
    # Uncaught in the middle, it still reaches the driver with the callee's message.
    with pytest.raises(RayServeException, match="bad input 8") as info:
        handle.passthrough.remote("bad input 8").result(timeout_s=10)
    assert info.value.deployment == "errors/Catcher"
    assert "ValueError" in str(info.value) and "Thrower" in str(info.value)


def test_the_original_error_type_survives_two_hops(cluster):
    handle = serve.run(Catcher.bind(Thrower.bind()), name="errors", route_prefix=None)
    with pytest.raises(RayServeException) as info:
        handle.passthrough.remote("bad input 9").result(timeout_s=10)
    assert info.value.error_type == "ValueError"


def test_replica_context_inside_a_replica(cluster):
    serve.run(Catcher.bind(Thrower.bind()), name="ctx", route_prefix=None)
    thrower = serve.get_deployment_handle("Thrower", app_name="ctx")
    context = thrower.whoami.remote().result(timeout_s=10)
    assert context["app"] == "ctx"
    assert context["deployment"] == "Thrower"
    assert context["replica_tag"] == context["replica_id"]
    assert context["servable_is_self"] is True
    client = redis.Redis.from_url(REDIS_URL)
    try:
        record = client.hget(f"bs:{cluster.name}:replicas", context["replica_id"])
    finally:
        client.close()
    assert record is not None and json.loads(record)["deployment"] == "Thrower"
    with pytest.raises(BrokerServeError, match="only be called from a replica"):
        serve.get_replica_context()
