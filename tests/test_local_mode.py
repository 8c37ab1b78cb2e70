"""Local testing mode (`serve.run(app, _local_testing_mode=True)`) against a cluster: one body
of composition tests runs in both modes, as FastStream runs its suite against TestBroker and a
real broker. Chaining, handles (bound, looked up, `.options`, methods), streaming, batching,
multiplexing, reconfigure, cancellation and errors must behave the same in each.

In local mode RabbitMQ and Redis are pointed at a closed port: nothing may reach them. What
local mode refuses is tested at the end.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Iterator
from typing import Any

import pytest

from broker_serve import LocalTestingModeError, RayServeException, RequestCancelledError, serve
from broker_serve.client.runtime import current_runtime

from .conftest import free_port

# Each local-mode test, deploys and shutdown included, stays under this.
LOCAL_TEST_BOUND_S = 5.0


@pytest.fixture(params=["local", "cluster"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "cluster":
        request.getfixturevalue("cluster")
        yield "cluster"
        return
    closed = free_port()  # nothing listens there
    monkeypatch.setenv("BROKER_SERVE_AMQP_URL", f"amqp://guest:guest@127.0.0.1:{closed}/")
    monkeypatch.setenv("BROKER_SERVE_REDIS_URL", f"redis://127.0.0.1:{closed}/0")
    started, children = time.perf_counter(), child_pids()
    try:
        yield "local"
        assert child_pids() <= children  # no process was started
    finally:
        serve.shutdown()
    assert current_runtime() is None
    assert time.perf_counter() - started < LOCAL_TEST_BOUND_S


def child_pids() -> set[int]:
    """The processes whose parent is this one (Linux's /proc)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == os.getpid():
                found.add(int(entry))
    return found


def run(app: Any, mode: str, **options: Any) -> Any:
    return serve.run(app, _local_testing_mode=mode == "local", **options)


# --- the application both modes run --------------------------------------------------------------
@serve.deployment(version="1")
class Doubler:
    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.loads: list[str] = []

    async def __call__(self, x: int) -> int:
        if x < 0:
            raise ValueError(f"negative: {x}")
        return 2 * x

    def numbers(self, n: int) -> Iterator[int]:
        yield from range(n)

    async def letters(self, n: int) -> Any:
        for i in range(n):
            await asyncio.sleep(0)
            yield "abcdefgh"[i]

    async def hang(self) -> str:
        self.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return "finished"

    async def wait_started(self) -> bool:
        await asyncio.wait_for(self.started.wait(), 10)
        return True

    async def wait_cancelled(self) -> bool:
        await asyncio.wait_for(self.cancelled.wait(), 10)
        return True

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=5)
    async def batched(self, xs: list[int]) -> list[tuple[int, int]]:
        return [(x, len(xs)) for x in xs]

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        self.loads.append(model_id)
        return f"model-{model_id}"

    async def predict(self, x: int) -> list[Any]:
        model = await self.get_model(serve.get_multiplexed_model_id())
        return [model, x, list(self.loads)]


class NotPicklableError(Exception):
    def __init__(self, code: int) -> None:  # rebuilt from args: (code,)
        super().__init__(code)
        self.code = code


@serve.deployment(version="1", user_config={"greeting": "hello"})
class Front:
    def __init__(self, doubler: Any) -> None:
        self.doubler = doubler
        self.token = secrets.token_hex(4)
        self.greeting = ""
        self.reconfigured = 0

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.greeting = config["greeting"]
        self.reconfigured += 1

    def config(self) -> list[Any]:
        return [self.token, self.greeting, self.reconfigured]

    async def __call__(self, x: int) -> int:
        # A response passed unawaited into the next call (chaining).
        return await self.doubler.remote(self.doubler.remote(x))

    def sync_call(self, x: int) -> int:
        return self.doubler.remote(x).result(timeout_s=10)

    async def looked_up(self, x: int) -> list[Any]:
        context = serve.get_replica_context()
        by_name = serve.get_deployment_handle("Doubler")  # this app's, by default
        ingress = serve.get_app_handle(context.app_name)
        return [context.app_name, context.deployment, await by_name.remote(x),
                await ingress.options(method_name="sync_call").remote(x)]

    async def letters_through(self, n: int) -> list[str]:
        return [c async for c in self.doubler.options(stream=True).letters.remote(n)]

    async def fails(self, kind: str) -> None:
        if kind == "custom":
            raise NotPicklableError(7)
        await self.doubler.remote(-1)  # the callee's ValueError passes through this one


APP = "composed"


def deploy(mode: str, **front_options: Any) -> Any:
    front = Front.options(**front_options) if front_options else Front
    return run(front.bind(Doubler.bind()), mode, name=APP, route_prefix=None)


# --- the composition tests, in both modes --------------------------------------------------------
def test_calls_streams_and_errors(mode):
    handle = deploy(mode)
    assert handle.remote(5).result(timeout_s=10) == 20
    assert handle.sync_call.remote(4).result(timeout_s=10) == 8
    assert handle.options(method_name="sync_call").remote(3).result() == 6
    assert handle.looked_up.remote(2).result(timeout_s=10) == [APP, "Front", 4, 4]
    # From the driver: handles looked up, a response as the argument of another call.
    doubler = serve.get_deployment_handle("Doubler", app_name=APP)
    assert doubler.remote(doubler.remote(1)).result(timeout_s=10) == 4
    assert serve.get_app_handle(APP).remote(1).result(timeout_s=10) == 4
    # Streams: a sync generator, an async one, and one read inside another deployment.
    assert list(doubler.options(stream=True).numbers.remote(3)) == [0, 1, 2]
    assert list(doubler.options(stream=True).letters.remote(3)) == ["a", "b", "c"]
    assert handle.letters_through.remote(4).result(timeout_s=10) == ["a", "b", "c", "d"]
    # Awaited in another event loop than the runtime's (an async test's, say).
    async def from_async_code() -> list[Any]:
        streamed = [c async for c in doubler.options(stream=True).letters.remote(2)]
        return [await handle.remote(1), await doubler.remote(handle.remote(1)), streamed]

    assert asyncio.run(from_async_code()) == [4, 8, ["a", "b"]]
    # Errors: the callee's class, passed through a deployment, also a RayServeException.
    with pytest.raises(ValueError, match="negative: -1") as raised:
        handle.fails.remote("passed").result(timeout_s=10)
    assert isinstance(raised.value, RayServeException)
    assert raised.value.error_type == "ValueError"
    with pytest.raises(NotPicklableError) as custom:
        handle.fails.remote("custom").result(timeout_s=10)
    assert custom.value.code == 7 and isinstance(custom.value, RayServeException)
    with pytest.raises(RayServeException, match="no method"):
        handle.options(method_name="missing").remote().result(timeout_s=10)
    with pytest.raises(ValueError, match="no application named"):
        serve.get_app_handle("nowhere")
    hanging = doubler.hang.remote()
    with pytest.raises(TimeoutError):
        hanging.result(timeout_s=0.2)
    hanging.cancel()


def test_batches_models_reconfigure_and_cancel(mode):
    handle = deploy(mode)
    doubler = serve.get_deployment_handle("Doubler", app_name=APP)
    responses = [doubler.batched.remote(x) for x in range(4)]  # one full batch
    assert [r.result(timeout_s=10) for r in responses] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    model_a = doubler.options(multiplexed_model_id="a").predict
    assert model_a.remote(1).result(timeout_s=10) == ["model-a", 1, ["a"]]
    assert model_a.remote(2).result(timeout_s=10) == ["model-a", 2, ["a"]]  # loaded once
    model_b = doubler.options(multiplexed_model_id="b").predict
    assert model_b.remote(3).result(timeout_s=10) == ["model-b", 3, ["a", "b"]]
    token, greeting, times = handle.config.remote().result(timeout_s=10)
    assert (greeting, times) == ("hello", 1)
    # Same version, new user_config: the same instance takes it through reconfigure().
    handle = deploy(mode, user_config={"greeting": "hi"})
    assert handle.config.remote().result(timeout_s=10) == [token, "hi", 2]
    hanging = doubler.hang.remote()
    assert doubler.wait_started.remote().result(timeout_s=10)
    hanging.cancel()
    with pytest.raises(RequestCancelledError):
        hanging.result(timeout_s=10)
    assert doubler.wait_cancelled.remote().result(timeout_s=10)  # CancelledError in hang()


# --- local mode only ----------------------------------------------------------------------------
@pytest.fixture
def local(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    closed = free_port()
    monkeypatch.setenv("BROKER_SERVE_AMQP_URL", f"amqp://guest:guest@127.0.0.1:{closed}/")
    monkeypatch.setenv("BROKER_SERVE_REDIS_URL", f"redis://127.0.0.1:{closed}/0")
    try:
        yield
    finally:
        serve.shutdown()


@serve.deployment
def echo(x: Any) -> Any:
    return x


def test_what_local_mode_cannot_do_is_refused(local):
    from fastapi import FastAPI

    api = FastAPI()

    @serve.deployment
    @serve.ingress(api)
    class Http:
        pass

    refused = {
        "HTTP ingress": lambda: serve.run(Http.bind(), _local_testing_mode=True),
        "runtime_env": lambda: serve.run(
            echo.options(ray_actor_options={"runtime_env": {"env_vars": {"A": "1"}}}).bind(),
            _local_testing_mode=True),
        "more than one replica": lambda: serve.run(echo.options(num_replicas=2).bind(),
                                                    _local_testing_mode=True),
        "blocking": lambda: serve.run(echo.bind(), _local_testing_mode=True, blocking=True),
    }
    for what, attempt in refused.items():
        with pytest.raises(LocalTestingModeError, match="local testing mode"):
            attempt()
        assert what
    handle = serve.run(echo.bind(), _local_testing_mode=True)
    assert handle.remote({"a": [1, 2]}).result() == {"a": [1, 2]}
    for attempt in (lambda: handle.submit(1), serve.status,
                    lambda: serve.run(echo.bind())):
        with pytest.raises(LocalTestingModeError, match="local testing mode"):
            attempt()
    assert os.environ["BROKER_SERVE_REDIS_URL"].startswith("redis://127.0.0.1:")
    serve.delete("default")
    with pytest.raises(ValueError, match="no application named"):
        serve.get_app_handle("default")


@serve.deployment
class Failing:
    def __init__(self) -> None:
        raise RuntimeError("cannot start")


def test_a_constructor_that_raises_fails_the_deploy(local):
    from broker_serve import DeployFailed

    with pytest.raises(DeployFailed, match="cannot start"):
        serve.run(Failing.bind(), _local_testing_mode=True)
