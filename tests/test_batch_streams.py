"""@serve.batch async generators, where each caller streams its own items, and callers that
leave a batch (cancelled, or their stream closed), in plain asyncio programs."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from broker_serve import RayServeException, serve

from .asyncio_tests import QUIET_S, in_loop

# --- async generators ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["args", "kwargs", "mixed", "out-of-order"])
@pytest.mark.parametrize("use_class", [True, False])
@pytest.mark.parametrize("length", [0, 2, 5])
@in_loop
async def test_each_caller_streams_its_own_items(mode, use_class, length):
    async def steps(key1: list[str], key2: list[str]) -> Any:
        for step in range(length):
            yield [(step, a, b) for a, b in zip(key1, key2, strict=True)]

    class Model:
        @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
        async def method(self, key1: list[str], key2: list[str]) -> Any:
            async for step in steps(key1, key2):
                yield step

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def function(key1: list[str], key2: list[str]) -> Any:
        async for step in steps(key1, key2):
            yield step

    func = Model().method if use_class else function
    streams = {
        "args": lambda: [func("hi1", "hi2"), func("hi3", "hi4")],
        "kwargs": lambda: [func(key1="hi1", key2="hi2"), func(key1="hi3", key2="hi4")],
        "mixed": lambda: [func("hi1", key2="hi2"), func("hi3", key2="hi4")],
        "out-of-order": lambda: [func(key2="hi2", key1="hi1"), func(key2="hi4", key1="hi3")],
    }[mode]()
    assert [[item async for item in stream] for stream in streams] == [
        [(step, "hi1", "hi2") for step in range(length)],
        [(step, "hi3", "hi4") for step in range(length)],
    ]


@pytest.mark.parametrize("error", ["raised", "wrong length"])
@in_loop
async def test_an_error_mid_stream_reaches_every_caller_after_its_items(error):
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def func(key1: list[str], key2: list[str]) -> Any:
        for step in range(5):
            results = [(step, a, b) for a, b in zip(key1, key2, strict=True)]
            if step == 2:
                if error == "raised":
                    raise RuntimeError("Testing error")
                yield results * 2
            yield results

    for stream in [func("hi1", "hi2"), func("hi3", "hi4")]:
        for _ in range(2):
            await stream.__anext__()
        with pytest.raises(RuntimeError if error == "raised" else RayServeException):
            await stream.__anext__()
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()


@pytest.mark.parametrize("stop_token", [StopAsyncIteration, StopIteration])
@in_loop
async def test_a_stop_item_ends_one_callers_stream_early(stop_token):
    callers = 4
    next_step = asyncio.Event()

    @serve.batch(max_batch_size=callers, batch_wait_timeout_s=1000)
    async def sequential_terminator(ids: list[int]) -> Any:
        for finished in range(1, callers + 1):
            next_step.clear()
            yield [stop_token] * finished + ids[finished:]
            await next_step.wait()

    streams = [sequential_terminator(i) for i in range(callers)]
    for i, stream in enumerate(streams):
        assert [item async for item in stream] == [i] * i
        next_step.set()


@in_loop
async def test_a_stream_closed_early_leaves_the_others_streaming():
    may_finish = asyncio.Event()
    closed = asyncio.Event()

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=1000)
    async def tokens(prompts: list[str]) -> Any:
        try:
            for i in range(3):
                yield [f"{p}{i}" for p in prompts]
            await may_finish.wait()
            yield [f"{p}-last" for p in prompts]
        finally:
            closed.set()

    a, b, c = tokens("a"), tokens("b"), tokens("c")
    assert await a.__anext__() == "a0"
    await a.aclose()  # this caller hangs up
    may_finish.set()
    assert [x async for x in b] == ["b0", "b1", "b2", "b-last"]
    assert [x async for x in c] == ["c0", "c1", "c2", "c-last"]
    assert closed.is_set()


@in_loop
async def test_when_every_stream_is_closed_the_generator_is_closed_too():
    next_token = asyncio.Event()  # never set: a slow step that nobody waits for any more
    resumed = asyncio.Event()
    closed = asyncio.Event()

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def tokens(prompts: list[str]) -> Any:
        try:
            yield prompts
            await next_token.wait()
            resumed.set()
            yield prompts
        finally:
            closed.set()

    streams = [tokens("a"), tokens("b")]
    assert [await s.__anext__() for s in streams] == ["a", "b"]
    for stream in streams:
        await stream.aclose()
    await asyncio.wait_for(closed.wait(), timeout=5)
    assert not resumed.is_set()


@in_loop
async def test_the_setters_work_while_a_batch_streams():
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def three_times(key1: list[str], key2: list[str]) -> Any:
        for _ in range(3):
            yield list(zip(key1, key2, strict=True))

    first = [("hi1", "hi2"), ("hi3", "hi4")]
    streams = [three_times(*args) for args in first]
    for stream, expected in zip(streams, first, strict=True):
        assert [await stream.__anext__() for _ in range(2)] == [expected] * 2
    three_times.set_max_batch_size(3)
    three_times.set_batch_wait_timeout_s(15000)
    second = [("hi1", "hi2"), ("hi3", "hi4"), ("hi5", "hi6")]
    streams_2 = [three_times(*args) for args in second]
    for stream, expected in zip(streams, first, strict=True):
        assert [item async for item in stream] == [expected]
    for stream, expected in zip(streams_2, second, strict=True):
        assert [item async for item in stream] == [expected] * 3


# --- cancellation -------------------------------------------------------------------------

@in_loop
async def test_a_cancelled_caller_is_dropped_from_its_forming_batch():
    seen: list[list[int]] = []

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=1000)
    async def echo(items: list[int]) -> list[int]:
        seen.append(items)
        return items

    calls = [asyncio.ensure_future(echo(i)) for i in range(2)]
    done, _ = await asyncio.wait(calls, timeout=QUIET_S)
    assert not done
    calls[1].cancel()
    await asyncio.wait([calls[1]], timeout=5)
    # Its place is free again: two more callers fill the batch of three.
    rest = [asyncio.ensure_future(echo(i)) for i in (2, 3)]
    assert await asyncio.gather(calls[0], *rest) == [0, 2, 3]
    assert seen == [[0, 2, 3]]


@pytest.mark.parametrize("use_gen", [True, False])
@in_loop
async def test_a_batch_whose_callers_all_left_is_cancelled(use_gen):
    release = asyncio.Event()
    handler_cancelled = asyncio.Event()

    async def wait_for_release(key1: list[str], key2: list[str]) -> list[tuple[str, str]]:
        try:
            await release.wait()
        except asyncio.CancelledError:
            handler_cancelled.set()
            raise
        return list(zip(key1, key2, strict=True))

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def unary(key1: list[str], key2: list[str]) -> list[tuple[str, str]]:
        return await wait_for_release(key1, key2)

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def streaming(key1: list[str], key2: list[str]) -> Any:
        yield await wait_for_release(key1, key2)

    def start() -> list[asyncio.Future[Any]]:
        if use_gen:
            streams = [streaming("hi1", "hi2"), streaming("hi3", "hi4")]
            return [asyncio.ensure_future(s.__anext__()) for s in streams]
        return [asyncio.ensure_future(unary("hi1", "hi2")),
                asyncio.ensure_future(unary("hi3", "hi4"))]

    tasks = start()
    done, _ = await asyncio.wait(tasks, timeout=QUIET_S)
    assert not done
    tasks[0].cancel()
    done, _ = await asyncio.wait(tasks, timeout=QUIET_S)
    assert done == {tasks[0]} and not handler_cancelled.is_set()  # one caller still waits
    tasks[1].cancel()
    await asyncio.wait_for(handler_cancelled.wait(), timeout=5)

    release.set()  # the next batch runs normally
    assert await asyncio.gather(*start()) == [("hi1", "hi2"), ("hi3", "hi4")]


@pytest.mark.parametrize("use_gen", [True, False])
@in_loop
async def test_callers_cancelled_before_they_ran_leave_the_function_usable(use_gen):
    failing = True

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def unary(key1: list[str], key2: list[str]) -> list[tuple[str, str]]:
        if failing:
            raise ValueError
        return list(zip(key1, key2, strict=True))

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def streaming(key1: list[str], key2: list[str]) -> Any:
        if failing:
            raise ValueError
        yield list(zip(key1, key2, strict=True))

    def start() -> list[asyncio.Future[Any]]:
        if use_gen:
            streams = [streaming("hi1", "hi2"), streaming("hi3", "hi4")]
            return [asyncio.ensure_future(s.__anext__()) for s in streams]
        return [asyncio.ensure_future(unary("hi1", "hi2")),
                asyncio.ensure_future(unary("hi3", "hi4"))]

    for task in start():
        task.cancel()
    failing = False
    assert await asyncio.gather(*start()) == [("hi1", "hi2"), ("hi3", "hi4")]
