"""A handle call raises an instance of the class the deployment raised (docs/architecture.md,
"Handles"), as Ray's `RayTaskError` does: `except ValueError` works around `.result()`, an
`await` and a stream, in the driver and in a deployment in between, and still `except
RayServeException`. Where the caller cannot rebuild the class, a plain RayServeException."""

from __future__ import annotations

import asyncio
import errno
import json
import pickle
import sys
from typing import Any

import pytest

from broker_serve import RayServeException, serve
from broker_serve.protocol.call_values import dumps_signed
from broker_serve.protocol.remote_errors import raised_for

from .test_protocol_foreign import ForeignClient, request_queue


# Defined here, so pickled by value: in a replica their __module__ is this module's name too,
# though the replica has not imported this module.
class OutOfStock(Exception):
    def __init__(self, item: str) -> None:
        super().__init__(f"{item} is out of stock")
        self.item = item


class NeedsTwo(Exception):
    """Its args ("7: seven",) do not rebuild it: the caller falls back to RayServeException."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code


class DiskGone(OSError):
    pass


@serve.deployment(max_ongoing_requests=32)
class Thrower:
    def __call__(self, request: Any) -> None:
        raise ValueError("secret detail of an HTTP request")

    def value_error(self, text: str) -> None:
        raise ValueError(text)

    def key_error(self, key: str) -> None:
        raise KeyError(key)

    def out_of_stock(self, item: str) -> None:
        raise OutOfStock(item)

    def needs_two(self) -> None:
        raise NeedsTwo(7, "seven")

    def disk_gone(self) -> None:
        raise DiskGone(errno.ENOSPC, "no space left on the disk")

    def bad_json(self) -> Any:
        return json.loads('{"a": ')

    def where(self) -> dict[str, Any]:
        return {"module": OutOfStock.__module__, "imported": OutOfStock.__module__ in sys.modules}

    async def count_then_fail(self, n: int):
        for i in range(n):
            yield i
        raise KeyError(f"after {n}")

    async def odd_fails(self, i: int) -> int:
        await asyncio.sleep(0.05)  # so that the calls are in flight together
        if i % 2:
            raise ValueError(f"odd {i}")
        return i


@serve.deployment
class Middle:
    def __init__(self, thrower: Any) -> None:
        self.thrower = thrower

    async def catches_value_error(self, text: str) -> dict[str, Any]:
        try:
            await self.thrower.value_error.remote(text)
        except ValueError as exc:
            return {"class": type(exc).__name__, "args": list(exc.args),
                    "is_serve_exception": isinstance(exc, RayServeException),
                    "deployment": exc.deployment}
        return {"class": None}

    async def catches_out_of_stock(self, item: str) -> str | None:
        try:
            await self.thrower.out_of_stock.remote(item)
        except OutOfStock as exc:  # a class both replicas got by value
            return exc.item
        return None

    async def catches_bad_json(self) -> dict[str, Any]:
        try:
            await self.thrower.bad_json.remote()
        except json.JSONDecodeError as exc:  # a class of a module both replicas imported
            return {"pos": exc.pos, "doc": exc.doc}
        return {}

    async def catches_mid_stream(self, n: int) -> dict[str, Any]:
        got = []
        try:
            async for item in self.thrower.count_then_fail.options(stream=True).remote(n):
                got.append(item)
        except KeyError as exc:
            return {"got": got, "args": list(exc.args)}
        return {"got": got, "args": None}

    async def passes_through(self, method: str, *args: Any) -> None:
        await getattr(self.thrower, method).remote(*args)

    async def fan_out(self, n: int) -> list[list[Any]]:
        outcomes = await asyncio.gather(*(self.thrower.odd_fails.remote(i) for i in range(n)),
                                        return_exceptions=True)
        return [[type(o).__name__, list(o.args)] if isinstance(o, ValueError) else ["int", o]
                for o in outcomes]


def _run_both() -> Any:
    return serve.run(Middle.bind(Thrower.bind()), name="types", route_prefix=None)


def test_builtin_exceptions_are_raised_as_their_class_and_as_ray_serve_exception(cluster):
    thrower = serve.run(Thrower.bind(), name="types", route_prefix=None)
    with pytest.raises(ValueError) as info:
        thrower.value_error.remote("bad input 7").result(timeout_s=10)
    exc = info.value
    assert isinstance(exc, RayServeException)
    assert (exc.deployment, exc.error_type, exc.args) == ("types/Thrower", "ValueError",
                                                          ("bad input 7",))
    assert str(exc) == "ValueError in deployment types/Thrower: bad input 7"
    assert type(exc).__name__ == "RayServeException(ValueError)"
    # An instance pickles back into both classes, with its message and attributes.
    copy = pickle.loads(pickle.dumps(exc))
    assert isinstance(copy, ValueError) and isinstance(copy, RayServeException)
    assert (str(copy), copy.deployment, copy.args) == (str(exc), exc.deployment, exc.args)

    with pytest.raises(LookupError) as info:  # a base class of the raised one catches it too
        thrower.key_error.remote("missing").result(timeout_s=10)
    assert isinstance(info.value, KeyError) and info.value.args == ("missing",)
    assert info.value.error_type == "KeyError"
    # Two errors of one class are instances of one rebuilt class, made once.
    with pytest.raises(KeyError) as again:
        thrower.key_error.remote("other").result(timeout_s=10)
    assert type(again.value) is type(info.value)


def test_a_class_of_the_driver_module_arrives_as_itself(cluster):
    thrower = serve.run(Thrower.bind(), name="types", route_prefix=None)
    # What the replica sees of a class that travelled by value.
    assert thrower.where.remote().result(timeout_s=10) == {"module": __name__, "imported": False}
    with pytest.raises(OutOfStock) as info:
        thrower.out_of_stock.remote("apples").result(timeout_s=10)
    assert info.value.item == "apples"
    assert "OutOfStock in deployment types/Thrower: apples is out of stock" == str(info.value)


def test_a_class_that_its_args_cannot_rebuild_falls_back_to_ray_serve_exception(cluster):
    thrower = serve.run(Thrower.bind(), name="types", route_prefix=None)
    with pytest.raises(RayServeException) as info:
        thrower.needs_two.remote().result(timeout_s=10)
    exc = info.value
    assert type(exc) is RayServeException and not isinstance(exc, NeedsTwo)
    assert exc.error_type == "NeedsTwo" and exc.deployment == "types/Thrower"
    assert str(exc) == "NeedsTwo in deployment types/Thrower: 7: seven"
    assert (exc.origin["module"], exc.origin["qualname"]) == (__name__, "NeedsTwo")


def test_an_os_error_subclass_keeps_its_errno(cluster):
    thrower = serve.run(Thrower.bind(), name="types", route_prefix=None)
    with pytest.raises(DiskGone) as info:
        thrower.disk_gone.remote().result(timeout_s=10)
    exc = info.value
    assert isinstance(exc, OSError) and isinstance(exc, RayServeException)
    assert (exc.errno, exc.strerror) == (errno.ENOSPC, "no space left on the disk")
    assert "DiskGone in deployment types/Thrower" in str(exc)


def test_the_class_survives_a_deployment_in_between(cluster):
    middle = _run_both()
    caught = middle.catches_value_error.remote("x").result(timeout_s=10)
    assert caught == {"class": "RayServeException(ValueError)", "args": ["x"],
                      "is_serve_exception": True, "deployment": "types/Thrower"}
    assert middle.catches_out_of_stock.remote("pears").result(timeout_s=10) == "pears"
    assert middle.catches_bad_json.remote().result(timeout_s=10) == {"pos": 6, "doc": '{"a": '}

    # Not caught in between, it reaches the driver as the callee's class, from either hop.
    with pytest.raises(ValueError) as info:
        middle.passes_through.remote("value_error", "deep").result(timeout_s=10)
    exc = info.value
    assert (exc.deployment, exc.error_type, exc.args) == ("types/Middle", "ValueError",
                                                          ("deep",))
    assert str(exc) == ("ValueError in deployment types/Middle: "
                        "ValueError in deployment types/Thrower: deep")
    with pytest.raises(OutOfStock) as stock:
        middle.passes_through.remote("out_of_stock", "plums").result(timeout_s=10)
    assert stock.value.item == "plums"
    with pytest.raises(RayServeException) as fallback:
        middle.passes_through.remote("needs_two").result(timeout_s=10)
    assert type(fallback.value) is RayServeException
    assert fallback.value.error_type == "NeedsTwo"


def test_an_error_mid_stream_is_raised_as_its_class(cluster):
    middle = _run_both()
    thrower = serve.get_deployment_handle("Thrower", app_name="types")
    stream = thrower.count_then_fail.options(stream=True).remote(3)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError) as info:
        next(stream)
    assert info.value.args == ("after 3",) and info.value.deployment == "types/Thrower"
    # An async for in a deployment catches it by class too.
    assert middle.catches_mid_stream.remote(2).result(timeout_s=10) == {
        "got": [0, 1], "args": ["after 2"]}


def test_concurrent_calls_each_get_their_own_outcome(cluster):
    middle = _run_both()
    thrower = serve.get_deployment_handle("Thrower", app_name="types")
    responses = [thrower.odd_fails.remote(i) for i in range(32)]
    for i, response in enumerate(responses):
        if i % 2:
            with pytest.raises(ValueError) as info:
                response.result(timeout_s=20)
            assert info.value.args == (f"odd {i}",), i
        else:
            assert response.result(timeout_s=20) == i
    expected = [["RayServeException(ValueError)", [f"odd {i}"]] if i % 2 else ["int", i]
                for i in range(32)]
    assert middle.fan_out.remote(32).result(timeout_s=20) == expected


def test_the_error_event_names_the_class_for_calls_only(cluster):
    serve.run(Thrower.bind(), name="types", route_prefix=None)
    client = ForeignClient()
    try:
        queue = request_queue(cluster.name, "types", "Thrower")
        body = client.call(queue, "value_error", "for a foreign caller").terminal.body
        assert (body["error"], body["module"], body["qualname"]) == ("ValueError", "builtins",
                                                                     "ValueError")
        assert body["args"] == {"value": [["for a foreign caller"], {}]}
        # An HTTP client learns nothing of the exception, not even its arguments.
        http = client.http(queue, "GET", "/").terminal
        assert http.type == "error" and http.body["message"] == "Internal Server Error"
        assert not {"module", "qualname", "args"} & set(http.body)
    finally:
        client.close()


# --- what a forged error event can make a caller do -------------------------------------------
SECRET = b"the cluster secret"
_side_effects: list[Any] = []


def not_an_exception(*args: Any) -> None:
    _side_effects.append(args)


class _LoadsWithSideEffect:
    def __reduce__(self) -> tuple[Any, ...]:
        return not_an_exception, ("unpickled",)


def _event(**fields: Any) -> dict[str, Any]:
    return {"status": 500, "error": "ValueError", "message": "forged", **fields}


def test_a_forged_event_imports_nothing_and_calls_nothing():
    _side_effects.clear()
    assert "this" not in sys.modules  # importing it prints the Zen of Python
    forged = [
        _event(module="this", qualname="ValueError", args={"value": [[], {}]}),
        _event(module=__name__, qualname="not_an_exception", args={"value": [["called"], {}]}),
        _event(module="builtins", qualname="StopIteration", args={"value": [[], {}]}),
        _event(module="builtins", qualname="SystemExit", args={"value": [[1], {}]}),
    ]
    data, _ = dumps_signed([[_LoadsWithSideEffect()], {}], SECRET)
    forged.append(_event(module="builtins", qualname="ValueError",
                         args={"pickled": data, "sig": b"\0" * 32}))
    for event in forged:
        exc = raised_for(event, deployment="app/d", secret=SECRET)
        assert type(exc) is RayServeException, event
        assert str(exc) == "ValueError in deployment app/d: forged"
    assert "this" not in sys.modules
    assert _side_effects == []
    # The same pickle, signed, is loaded: the rule is the signature, as for a call's values.
    data, sig = dumps_signed([["signed"], {}], SECRET)
    exc = raised_for(_event(module="builtins", qualname="ValueError",
                            args={"pickled": data, "sig": sig}), deployment="app/d", secret=SECRET)
    assert isinstance(exc, ValueError) and exc.args == ("signed",)
