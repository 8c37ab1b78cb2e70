"""A blocking wait on a handle call inside a running event loop is refused with Ray's message."""

from __future__ import annotations

import asyncio

import pytest

from broker_serve import serve


@serve.deployment
def downstream() -> str:
    return "down"


@serve.deployment
def numbers():  # a streaming deployment
    yield 1
    yield 2


@serve.deployment
class Blocks:
    def __init__(self, down, stream) -> None:  # two handles
        self.down = down
        self.stream = stream

    async def __call__(self) -> dict[str, object]:
        seen: dict[str, object] = {}
        try:
            self.down.remote().result()
            seen["result"] = "no error"
        except RuntimeError as exc:
            seen["result"] = str(exc)
        items = self.stream.options(stream=True).remote()
        try:
            next(iter(items))
            seen["iterate"] = "no error"
        except RuntimeError as exc:
            seen["iterate"] = str(exc)
        seen["streamed"] = [item async for item in items]
        seen["awaited"] = await self.down.remote()
        return seen

    def sync_method(self) -> str:  # runs in a worker thread: blocking is fine there
        return str(self.down.remote().result(timeout_s=30))


def test_blocking_inside_a_replicas_loop_is_refused_and_await_works(cluster):
    handle = serve.run(Blocks.bind(downstream.bind(), numbers.bind()))
    seen = handle.remote().result(timeout_s=60)
    assert seen["result"] == ("Sync methods should not be called from within an `asyncio` "
                              "event loop. Use `await response` instead.")
    assert seen["iterate"] == ("Sync methods should not be called from within an `asyncio` "
                               "event loop. Use `async for` instead.")
    assert seen["streamed"] == [1, 2]
    assert seen["awaited"] == "down"
    assert handle.sync_method.remote().result(timeout_s=60) == "down"


def test_blocking_inside_a_drivers_own_loop_is_refused(cluster):
    handle = serve.run(downstream.bind())

    async def main() -> None:
        handle.remote().result(timeout_s=10)

    with pytest.raises(RuntimeError, match="Use `await response` instead"):
        asyncio.run(main())
    assert handle.remote().result(timeout_s=30) == "down"
