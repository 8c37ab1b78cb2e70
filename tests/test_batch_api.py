"""@serve.batch called directly in plain asyncio programs, outside any replica, as Ray's own
unit tests of `serve.batch` call it: validation, when batches go, arguments, setters,
batch_size_fn, max_concurrent_batches and model ids. (Generators and cancellation are in
test_batch_streams.py.)"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from broker_serve import RayServeException, serve
from broker_serve.replica import multiplex

from .asyncio_tests import QUIET_S, in_loop


def batched_pairs(use_class: bool, **options: Any) -> Callable[..., Any]:
    """A batch function of two parameters, as a plain function or as a bound method."""
    if use_class:
        class Pairs:
            @serve.batch(**options)
            async def method(self, key1: list[str], key2: list[str]) -> list[tuple[str, str]]:
                return list(zip(key1, key2, strict=True))

        return Pairs().method

    @serve.batch(**options)
    async def pairs(key1: list[str], key2: list[str]) -> list[tuple[str, str]]:
        return list(zip(key1, key2, strict=True))

    return pairs


# --- validation, with Ray's messages -------------------------------------------------------

def test_both_decorator_forms_accept_functions_methods_and_generators():
    @serve.batch
    async def function(items: list[int]) -> list[int]:
        return items

    @serve.batch(max_batch_size=10, batch_wait_timeout_s=1.5)
    async def generator(items: list[int]) -> Any:
        yield items

    class Model:
        @serve.batch
        async def method(self, items: list[int]) -> list[int]:
            return items

    assert callable(function) and callable(generator) and callable(Model().method)


@pytest.mark.parametrize("form", ["bare", "with arguments"])
def test_a_sync_function_is_refused_with_async_def(form):
    def sync(items: list[int]) -> list[int]:
        return items

    decorator = serve.batch if form == "bare" else serve.batch(max_batch_size=2)
    with pytest.raises(TypeError, match="async def"):
        decorator(sync)


@pytest.mark.parametrize(("options", "error", "message"), [
    ({"max_batch_size": 0}, ValueError, "max_batch_size must be an integer >= 1, got 0"),
    ({"max_batch_size": -3}, ValueError, "max_batch_size must be an integer >= 1"),
    ({"max_batch_size": 1.1}, TypeError, "max_batch_size must be integer >= 1, got 1.1"),
    ({"max_batch_size": "8"}, TypeError, "max_batch_size must be integer >= 1"),
    ({"batch_wait_timeout_s": -0.1}, ValueError, "batch_wait_timeout_s must be a float >= 0"),
    ({"batch_wait_timeout_s": "a"}, TypeError, "batch_wait_timeout_s must be a float >= 0"),
    ({"max_concurrent_batches": 0}, TypeError, "max_concurrent_batches must be an integer"),
    ({"max_concurrent_batches": 1.5}, TypeError, "max_concurrent_batches must be an integer"),
    ({"batch_size_fn": 3}, TypeError, "batch_size_fn must be a callable or None"),
])
def test_bad_parameters_are_refused(options, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        serve.batch(**options)


def test_integral_floats_and_zero_timeouts_are_accepted():
    for options in ({"max_batch_size": 1.0}, {"batch_wait_timeout_s": 0},
                    {"batch_wait_timeout_s": 0.0}):
        @serve.batch(**options)
        async def fine(items: list[int]) -> list[int]:
            return items

        assert fine._get_max_batch_size() >= 1


def test_something_not_callable_is_refused():
    with pytest.raises(TypeError, match="can only be used to decorate functions or methods"):
        serve.batch(42)


def test_the_setters_validate_too():
    @serve.batch
    async def echo(items: list[int]) -> list[int]:
        return items

    with pytest.raises(ValueError, match="max_batch_size"):
        echo.set_max_batch_size(0)
    with pytest.raises(ValueError, match="batch_wait_timeout_s"):
        echo.set_batch_wait_timeout_s(-1)
    assert echo._get_max_batch_size() == 10
    assert echo._get_batch_wait_timeout_s() == 0.01


# --- when batches are sent ----------------------------------------------------------------

def raising(use_class: bool, max_batch_size: int) -> Callable[..., Any]:
    """A batch function (or bound method) that fails its batch if a caller passed "raise"."""
    async def body(requests: list[str]) -> list[str]:
        if "raise" in requests:
            raise ZeroDivisionError(f"bad batch {requests}")
        return requests

    if use_class:
        class Model:
            @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=1000)
            async def method(self, requests: list[str]) -> list[str]:
                return await body(requests)

        return Model().method
    return serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=1000)(body)


@pytest.mark.parametrize("use_class", [True, False])
@in_loop
async def test_a_batch_of_one_runs_at_once_and_raises_for_its_caller(use_class):
    call = raising(use_class, 1)
    assert await call("hi") == "hi"
    with pytest.raises(ZeroDivisionError):
        await call("raise")


@in_loop
async def test_a_full_batch_goes_at_once_and_a_partial_one_after_the_timeout():
    sizes: list[int] = []

    @serve.batch(max_batch_size=10, batch_wait_timeout_s=0.25)
    async def no_op(requests: list[None]) -> list[str]:
        sizes.append(len(requests))
        return ["No-op"] * len(requests)

    tasks = [asyncio.ensure_future(no_op(None)) for _ in range(9)]
    done, _ = await asyncio.wait(tasks, timeout=QUIET_S)
    assert not done  # nine of ten: waits for the tenth or the timeout
    tasks.append(asyncio.ensure_future(no_op(None)))
    done, _ = await asyncio.wait(tasks, timeout=5)
    assert done == set(tasks) and {t.result() for t in tasks} == {"No-op"}

    alone = asyncio.ensure_future(no_op(None))
    done, _ = await asyncio.wait([alone], timeout=QUIET_S)
    assert not done
    assert await alone == "No-op"  # after the timeout
    assert sizes == [10, 1]


@in_loop
async def test_callers_beyond_the_batch_size_form_the_next_batches():
    sizes: list[int] = []

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=10000)
    async def no_op(requests: list[int]) -> list[int]:
        sizes.append(len(requests))
        return requests

    assert await asyncio.gather(*(no_op(i) for i in range(10))) == list(range(10))
    assert sizes == [2] * 5


@in_loop
async def test_with_no_timeout_callers_arriving_while_a_batch_runs_go_together():
    release = asyncio.Event()
    batches: list[list[str]] = []

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=0)
    async def blocked(requests: list[str]) -> list[str]:
        batches.append(requests)
        await release.wait()
        if "raise" in requests:
            raise ZeroDivisionError
        return requests

    first = asyncio.ensure_future(blocked("hi1"))
    done, _ = await asyncio.wait([first], timeout=QUIET_S)
    assert not done and batches == [["hi1"]]  # a batch of one went at once
    second = asyncio.ensure_future(blocked("hi2"))
    third = asyncio.ensure_future(blocked("raise"))
    release.set()
    assert await first == "hi1"
    for task in (second, third):
        with pytest.raises(ZeroDivisionError):
            await task
    assert batches == [["hi1"], ["hi2", "raise"]]


@pytest.mark.parametrize("use_class", [True, False])
@in_loop
async def test_an_exception_reaches_every_caller_of_its_batch_only(use_class):
    call = raising(use_class, 3)
    first = [asyncio.ensure_future(call(f"hi{i}")) for i in range(2)]
    done, _ = await asyncio.wait(first, timeout=QUIET_S)
    assert not done  # two of three
    assert await asyncio.gather(*first, call("hi2")) == ["hi0", "hi1", "hi2"]
    outcomes = await asyncio.gather(call("hi1"), call("raise"), call("hi3"),
                                    return_exceptions=True)
    assert all(isinstance(e, ZeroDivisionError) and "bad batch" in str(e) for e in outcomes)
    assert await asyncio.gather(*(call(f"ok{i}") for i in range(3))) == ["ok0", "ok1", "ok2"]


@in_loop
async def test_a_result_of_the_wrong_length_or_kind_fails_every_caller():
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def short(items: list[int]) -> list[int]:
        return items[:1]

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def no_list(items: list[int]) -> int:
        return len(items)

    errors = await asyncio.gather(short(1), short(2), return_exceptions=True)
    assert all(isinstance(e, RayServeException) for e in errors)
    assert "doesn't preserve batch size" in str(errors[0])
    assert "length 2 but the returned list has length 1" in str(errors[0])
    errors = await asyncio.gather(no_list(1), no_list(2), return_exceptions=True)
    assert all(isinstance(e, TypeError) and "got int" in str(e) for e in errors)


def test_a_function_decorated_once_serves_one_event_loop_after_another():
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def echo(items: list[int]) -> Any:
        yield items

    async def first_program() -> None:
        echo(1)  # a stream never read: its call waits in the queue when the loop ends

    async def second_program() -> list[list[int]]:
        streams = [echo(2), echo(3)]
        return [[item async for item in stream] for stream in streams]

    asyncio.run(first_program())
    assert asyncio.run(second_program()) == [[2], [3]]


# --- arguments ----------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["args", "kwargs", "mixed", "out-of-order"])
@pytest.mark.parametrize("use_class", [True, False])
@in_loop
async def test_each_parameter_becomes_a_list_of_the_callers_values(mode, use_class):
    func = batched_pairs(use_class, max_batch_size=2, batch_wait_timeout_s=1000)
    calls = {
        "args": lambda: [func("hi1", "hi2"), func("hi3", "hi4")],
        "kwargs": lambda: [func(key1="hi1", key2="hi2"), func(key1="hi3", key2="hi4")],
        "mixed": lambda: [func("hi1", key2="hi2"), func(key1="hi3", key2="hi4")],
        "out-of-order": lambda: [func(key2="hi2", key1="hi1"), func(key2="hi4", key1="hi3")],
    }[mode]()
    assert await asyncio.gather(*calls) == [("hi1", "hi2"), ("hi3", "hi4")]


@in_loop
async def test_defaults_keyword_only_varargs_and_varkw_are_batched_by_parameter():
    seen: list[tuple[Any, ...]] = []

    @serve.batch(max_batch_size=3, batch_wait_timeout_s=1000)
    async def gen(prompt: list[str], /, tokens: Any = 16, *extra: list[int], temp: Any = 1.0,
                  flag: Any = False, **options: list[Any]) -> list[str]:
        seen.append((prompt, tokens, extra, temp, flag, options))
        return [p.upper() for p in prompt]

    results = await asyncio.gather(gen("a", 1, 7, temp=0.5, seed=1),
                                   gen("b", 2, 8, seed=2),
                                   gen("c", 3, 9, temp=0.9, seed=3))
    assert results == ["A", "B", "C"]
    # temp: passed by two callers, the default stands in for the third; flag: passed by
    # nobody, so the function's own default applies, unbatched.
    assert seen == [(["a", "b", "c"], [1, 2, 3], ([7, 8, 9],), [0.5, 1.0, 0.9], False,
                     {"seed": [1, 2, 3]})]


@in_loop
async def test_arguments_that_do_not_fit_the_signature_fail_at_the_call():
    func = batched_pairs(True, max_batch_size=2, batch_wait_timeout_s=1000)
    with pytest.raises(TypeError, match="key2"):
        await func("only one")
    with pytest.raises(TypeError):
        await func("a", "b", key3="c")


@in_loop
async def test_callers_passing_different_extra_keywords_fail_together():
    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def loose(items: list[int], **options: list[Any]) -> list[int]:
        return items

    errors = await asyncio.gather(loose(1, a=1), loose(2, b=2), return_exceptions=True)
    assert all(isinstance(e, TypeError) and "**options" in str(e) for e in errors)


# --- setters ------------------------------------------------------------------------------

@pytest.mark.parametrize("use_class", [True, False])
@in_loop
async def test_the_setters_change_the_next_batches(use_class):
    func = batched_pairs(use_class, max_batch_size=2, batch_wait_timeout_s=1000)
    assert func._get_max_batch_size() == 2
    assert func._get_batch_wait_timeout_s() == 1000
    done, pending = await asyncio.wait([asyncio.ensure_future(func("hi1", "hi2")),
                                        asyncio.ensure_future(func("hi3", "hi4"))], timeout=5)
    assert not pending

    func.set_max_batch_size(3)
    func.set_batch_wait_timeout_s(15000)
    assert func._get_max_batch_size() == 3
    assert func._get_batch_wait_timeout_s() == 15000
    tasks = [asyncio.ensure_future(func(f"hi{i}", f"ho{i}")) for i in range(2)]
    done, pending = await asyncio.wait(tasks, timeout=QUIET_S)
    assert not done  # a batch of three now
    tasks.append(asyncio.ensure_future(func("hi2", "ho2")))
    assert await asyncio.gather(*tasks) == [(f"hi{i}", f"ho{i}") for i in range(3)]


@in_loop
async def test_a_forming_batch_keeps_the_settings_it_opened_with():
    func = batched_pairs(False, max_batch_size=3, batch_wait_timeout_s=15000)
    pending = {asyncio.ensure_future(func("hi1", "hi2")),
               asyncio.ensure_future(func("hi3", "hi4"))}
    done, pending = await asyncio.wait(pending, timeout=QUIET_S)
    assert not done
    func.set_max_batch_size(1)
    func.set_batch_wait_timeout_s(0)
    done, pending = await asyncio.wait(pending, timeout=QUIET_S)
    assert not done  # still waits for its third caller
    pending.add(asyncio.ensure_future(func("hi5", "hi6")))
    done, pending = await asyncio.wait(pending, timeout=5)
    assert not pending
    assert {t.result() for t in done} == {("hi1", "hi2"), ("hi3", "hi4"), ("hi5", "hi6")}
    assert await asyncio.wait_for(func("a", "b"), timeout=5) == ("a", "b")  # size one now


def test_the_setters_reach_every_instance():
    class Model:
        @serve.batch(max_batch_size=2)
        async def method(self, items: list[int]) -> list[int]:
            return items

    first, second = Model(), Model()
    first.method.set_max_batch_size(5)
    assert second.method._get_max_batch_size() == 5


# --- batch_size_fn ------------------------------------------------------------------------

def sized(max_batch_size: int, batches: list[list[str]]) -> Callable[..., Any]:
    @serve.batch(max_batch_size=max_batch_size, batch_wait_timeout_s=0.05,
                 batch_size_fn=lambda items: sum(item["size"] for item in items))
    async def handler(requests: list[dict[str, Any]]) -> list[str]:
        batches.append([r["value"] for r in requests])
        return [r["value"] for r in requests]

    return handler


@in_loop
async def test_a_caller_that_would_overflow_the_size_goes_to_the_next_batch():
    batches: list[list[str]] = []
    handler = sized(10, batches)
    results = await asyncio.gather(handler({"size": 6, "value": "first"}),
                                   handler({"size": 6, "value": "second"}))
    assert results == ["first", "second"]
    assert batches == [["first"], ["second"]]


@in_loop
async def test_callers_whose_sizes_fit_share_a_batch():
    batches: list[list[str]] = []
    handler = sized(20, batches)
    await asyncio.gather(*(handler({"size": s, "value": v}) for s, v in [(5, "a"), (6, "b"),
                                                                          (7, "c")]))
    assert batches == [["a", "b", "c"]]


@in_loop
async def test_a_caller_larger_than_the_batch_size_fails_alone():
    batches: list[list[str]] = []
    handler = sized(10, batches)
    first = asyncio.ensure_future(handler({"size": 6, "value": "first"}))
    with pytest.raises(RuntimeError, match="Size of item is greater than max_batch_size"):
        await handler({"size": 12, "value": "second"})
    assert await first == "first"


# --- max_concurrent_batches ---------------------------------------------------------------

@pytest.mark.parametrize("max_concurrent_batches", [1, 2])
@in_loop
async def test_at_most_max_concurrent_batches_run_at_once(max_concurrent_batches):
    running = 0
    most = 0
    release = asyncio.Event()

    @serve.batch(max_batch_size=5, batch_wait_timeout_s=1000,
                 max_concurrent_batches=max_concurrent_batches)
    async def slow(items: list[int]) -> list[tuple[int, int]]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return [(i, len(items)) for i in items]

    tasks = [asyncio.ensure_future(slow(i)) for i in range(20)]
    done, _ = await asyncio.wait(tasks, timeout=QUIET_S)
    assert not done and running == max_concurrent_batches
    release.set()
    results = await asyncio.gather(*tasks)
    assert [i for i, _ in results] == list(range(20))
    assert {size for _, size in results} == {5}
    assert most == max_concurrent_batches


# --- multiplexed model ids ----------------------------------------------------------------

def model_batcher(records: list[tuple[str, list[str]]], **options: Any) -> Callable[..., Any]:
    @serve.batch(**options)
    async def predict(requests: list[str]) -> list[str]:
        model_id = serve.get_multiplexed_model_id()
        records.append((model_id, list(requests)))
        return [f"{model_id}:{r}" for r in requests]

    return predict


async def as_model(model_id: str, call: Coroutine[Any, Any, Any]) -> Any:
    multiplex._set_model_id(model_id)  # what a replica does for each request
    return await call


@in_loop
async def test_batches_fill_per_model_id_and_the_handler_sees_its_model():
    records: list[tuple[str, list[str]]] = []
    predict = model_batcher(records, max_batch_size=5, batch_wait_timeout_s=1000)
    tasks = []
    for i in range(5):
        tasks.append(asyncio.ensure_future(as_model("model-a", predict(f"a-{i}"))))
        tasks.append(asyncio.ensure_future(as_model("model-b", predict(f"b-{i}"))))
    assert await asyncio.gather(*tasks) == [
        f"model-{m}:{m}-{i}" for i in range(5) for m in "ab"]
    assert sorted(records) == [("model-a", [f"a-{i}" for i in range(5)]),
                               ("model-b", [f"b-{i}" for i in range(5)])]


@in_loop
async def test_one_models_callers_do_not_fill_another_models_batch():
    records: list[tuple[str, list[str]]] = []
    predict = model_batcher(records, max_batch_size=5, batch_wait_timeout_s=1000)
    model_a = [asyncio.ensure_future(as_model("model-a", predict(f"a-{i}"))) for i in range(4)]
    first_b = asyncio.ensure_future(as_model("model-b", predict("b-0")))
    done, _ = await asyncio.wait([*model_a, first_b], timeout=QUIET_S)
    assert not done and records == []
    model_a.append(asyncio.ensure_future(as_model("model-a", predict("a-4"))))
    assert await asyncio.gather(*model_a) == [f"model-a:a-{i}" for i in range(5)]
    done, _ = await asyncio.wait([first_b], timeout=QUIET_S)
    assert not done
    rest_b = [asyncio.ensure_future(as_model("model-b", predict(f"b-{i}"))) for i in range(1, 5)]
    assert await asyncio.gather(first_b, *rest_b) == [f"model-b:b-{i}" for i in range(5)]
    assert records == [("model-a", [f"a-{i}" for i in range(5)]),
                       ("model-b", [f"b-{i}" for i in range(5)])]


@in_loop
async def test_model_batches_share_max_concurrent_batches():
    running = 0
    two_running = asyncio.Event()
    release = asyncio.Event()

    @serve.batch(max_batch_size=1, batch_wait_timeout_s=0, max_concurrent_batches=2)
    async def blocked(requests: list[str]) -> list[str]:
        nonlocal running
        running += 1
        if running == 2:
            two_running.set()
        await release.wait()
        running -= 1
        return requests

    tasks = [asyncio.ensure_future(as_model(m, blocked(m))) for m in ("m-a", "m-b", "m-c")]
    await asyncio.wait_for(two_running.wait(), timeout=5)
    done, _ = await asyncio.wait(tasks, timeout=QUIET_S)
    assert not done and running == 2
    release.set()
    assert await asyncio.gather(*tasks) == ["m-a", "m-b", "m-c"]


@in_loop
async def test_a_batch_runs_in_its_own_context_not_its_first_callers():
    tag: contextvars.ContextVar[str] = contextvars.ContextVar("tag", default="none")
    seen: list[str] = []

    @serve.batch(max_batch_size=2, batch_wait_timeout_s=1000)
    async def echo(items: list[str]) -> list[str]:
        seen.append(tag.get())
        return items

    async def tagged(value: str) -> str:
        tag.set(value)
        return await echo(value)

    assert await asyncio.gather(tagged("first"), tagged("second")) == ["first", "second"]
    assert seen == ["none"]
