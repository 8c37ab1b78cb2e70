"""Typed values (broker_serve/_values.py) and how `_signing` chooses a value's wire form."""

from __future__ import annotations

import collections
import datetime
import decimal
import sys
import types
from typing import Any

import cloudpickle
import msgpack
import pydantic
import pytest

from broker_serve.exceptions import UndecodableValue, UntrustedPayload
from broker_serve.protocol import typed_values
from broker_serve.protocol.call_values import (
    pack_call,
    pack_value,
    unpack_call,
    unpack_value,
)

from .values_models import (
    Aliased,
    Batch,
    Derived,
    Loose,
    Names,
    Order,
    Priced,
    Reading,
    Report,
    Span,
    WithInitVar,
    WithPrivate,
)

SECRET = b"k" * 32


@pytest.fixture
def np() -> Any:
    return pytest.importorskip("numpy")


def round_trip(value: Any) -> Any:
    return typed_values.loads(typed_values.dumps(value))


def forged(code: int, parts: Any) -> bytes:
    """A typed value as an untrusted publisher could write it, by hand."""
    return msgpack.packb(msgpack.ExtType(code, msgpack.packb(parts, use_bin_type=True)),
                         use_bin_type=True)


def wire_form(value: Any) -> str:
    return next(key for key in ("value", "data", "pickled") if key in pack_value(value, SECRET))


# Round trips


def test_tuples_stay_tuples_at_any_depth_and_as_keys():
    value = {"pair": (1, ("a", b"b")), (1, 2): [(), (None,)], 3: "int key"}
    assert round_trip(value) == value
    assert type(round_trip(value)["pair"][1]) is tuple


def test_bytearray_and_memoryview_arrive_as_bytes():
    assert round_trip([bytearray(b"ab"), memoryview(b"cd"), (1,)]) == [b"ab", b"cd", (1,)]


def test_nested_models_keep_their_types():
    report = Report(reading=Reading(sensor="s1", window=(0, 10), threshold=0.5,
                                    tags={"site": ["a", "b"]}), peak=9.5)
    decoded = round_trip(report)
    assert decoded == report
    assert type(decoded.reading) is Reading and decoded.reading.window == (0, 10)


def test_unset_fields_stay_unset():
    reading = Reading(sensor="s1", window=(0, 1))
    decoded = round_trip(reading)
    assert decoded.model_fields_set == {"sensor", "window"}
    assert decoded.model_dump(exclude_unset=True) == reading.model_dump(exclude_unset=True)


def test_aliases_extras_and_root_models():
    assert round_trip(Aliased(firstName="Ada")).first_name == "Ada"
    loose = round_trip(Loose(name="x", colour="red"))
    assert loose.name == "x" and loose.colour == "red"  # type: ignore[attr-defined]
    assert round_trip(Names(["a", "b"])) == Names(["a", "b"])


def test_dataclasses_nested_with_models():
    batch = Batch(spans=[Span(0, 1), Span(2, 3)], reading=Reading(sensor="s", window=(1, 2)))
    decoded = round_trip(batch)
    assert decoded == batch and type(decoded.spans[0]) is Span


def test_numpy_arrays_of_several_dtypes_and_shapes(np):
    arrays = [
        np.arange(12, dtype=np.int32).reshape(3, 4),
        np.linspace(0, 1, 5, dtype=np.float16),
        np.array([1 + 2j, 3 - 4j]),
        np.array([True, False]),
        np.array(["a", "héllo"]),
        np.array([b"xy", b"z"]),
        np.array(["2024-01-02T03:04"], dtype="datetime64[m]"),
        np.arange(3, dtype=">u2"),  # big-endian stays big-endian
        np.array(7.5),  # 0-d
        np.zeros((0, 3)),
        np.arange(20).reshape(4, 5)[::2, 1::2],  # not contiguous
        np.asfortranarray(np.arange(6).reshape(2, 3)),
    ]
    for array in arrays:
        decoded = round_trip(array)
        assert type(decoded) is np.ndarray
        assert decoded.dtype == array.dtype and decoded.shape == array.shape
        assert np.array_equal(decoded, array)
        assert decoded.flags.writeable


def test_numpy_scalars_keep_their_dtype(np):
    for scalar in (np.float64(1.5), np.float32(2), np.int8(-3), np.uint64(2**64 - 1),
                   np.bool_(True), np.str_("hé"), np.datetime64("2024-01-02")):
        decoded = round_trip(scalar)
        assert type(decoded) is type(scalar) and decoded == scalar


def test_arrays_inside_models_and_dataclasses(np):
    report = round_trip(Report(reading=Reading(sensor="s", window=(0, 1)), peak=1.0,
                               samples=np.eye(2)))
    assert np.array_equal(report.samples, np.eye(2))
    batch = round_trip(Batch(spans=[], reading=Reading(sensor="s", window=(0, 1)),
                             weights=np.ones(3, dtype=np.float32)))
    assert batch.weights.dtype == np.float32


# What falls back to the signed pickle


def test_models_with_datetime_or_decimal_fall_back_to_pickle():
    order = Order(item=Priced(name="pen", price=decimal.Decimal("1.50"),
                              when=datetime.datetime(2024, 1, 2, 3, 4)), quantity=2)
    assert wire_form(order) == "pickled"
    assert unpack_value(pack_value(order, SECRET), SECRET) == order
    assert wire_form(Order.model_construct(item=None, quantity=1)) == "data"


@pytest.mark.parametrize("value", [
    Derived([1, 2]),  # an init=False field
    WithInitVar(2, 3),  # an InitVar
    WithPrivate(name="x"),  # private attributes
    collections.namedtuple("Pair", "a b")(1, 2),
    {1, 2},
    2**70,  # too big for a msgpack int
])
def test_what_cannot_be_rebuilt_by_reference_falls_back_to_pickle(value):
    assert wire_form(value) == "pickled"
    assert unpack_value(pack_value(value, SECRET), SECRET) == value


def test_object_and_structured_arrays_fall_back_to_pickle(np):
    for array in (np.array([{"a": 1}], dtype=object),
                  np.zeros(2, dtype=[("x", "i4"), ("y", "f8")])):
        assert wire_form(array) == "pickled"
    assert wire_form(np.ma.masked_array([1, 2])) == "pickled"  # an ndarray subclass


def test_local_classes_fall_back_to_pickle():
    class Local(pydantic.BaseModel):
        x: int

    assert wire_form(Local(x=1)) == "pickled"


def test_classes_of_the_main_script_fall_back_to_pickle(monkeypatch):
    main = sys.modules["__main__"]
    model = pydantic.create_model("ScriptModel", __module__="__main__", x=(int, ...))
    monkeypatch.setattr(main, "ScriptModel", model, raising=False)
    assert wire_form(model(x=1)) == "pickled"


def test_modules_pickled_by_value_fall_back_to_pickle(monkeypatch):
    module = types.ModuleType("bs_values_by_value")
    model = pydantic.create_model("Shipped", __module__=module.__name__, x=(int, ...))
    module.Shipped = model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    assert wire_form(model(x=1)) == "data"
    cloudpickle.register_pickle_by_value(module)
    try:
        assert wire_form(model(x=1)) == "pickled"
    finally:
        cloudpickle.unregister_pickle_by_value(module)


# The wire forms of _signing


def test_plain_data_keeps_its_wire_form():
    assert pack_call((1, "a"), {"b": [1.5]}, SECRET) == {"args": [1, "a"], "kwargs": {"b": [1.5]}}
    assert pack_value({"x": [None, True]}, SECRET) == {"value": {"x": [None, True]}}


def test_calls_travel_typed_and_are_signed_only_when_they_name_a_class():
    unsigned = pack_call(((1, 2),), {"k": (3,)}, SECRET)
    assert set(unsigned) == {"data"}
    assert unpack_call(unsigned, SECRET) == (((1, 2),), {"k": (3,)})
    reading = Reading(sensor="s", window=(0, 1))
    signed = pack_call((reading,), {"span": Span(1, 2)}, SECRET)
    assert set(signed) == {"data", "sig"}
    assert unpack_call(signed, SECRET) == ((reading,), {"span": Span(1, 2)})
    assert unpack_value(pack_value(reading, SECRET), SECRET) == reading


def test_a_bad_signature_on_typed_data_is_refused():
    payload = pack_value(Span(1, 2), SECRET)
    with pytest.raises(UntrustedPayload):
        unpack_value({**payload, "sig": b"\x00" * 32}, SECRET)
    with pytest.raises(UntrustedPayload):
        unpack_value(payload, b"another secret")


def test_unsigned_typed_data_from_a_foreign_caller_decodes_loaded_classes():
    payload = {"data": forged(typed_values.DATACLASS, ["tests.values_models:Span", {"start": 1,
                                                                              "end": 2}])}
    assert unpack_value(payload, SECRET) == Span(1, 2)


def test_only_signed_data_may_import_a_module(monkeypatch):
    payload = pack_value(Span(1, 2), SECRET)
    monkeypatch.delitem(sys.modules, "tests.values_models")
    with pytest.raises(UndecodableValue, match="not imported"):
        unpack_value({"data": payload["data"]}, SECRET)
    assert "tests.values_models" not in sys.modules
    decoded = unpack_value(payload, SECRET)  # the signed original: the module is imported
    assert (decoded.start, decoded.end) == (1, 2)
    assert "tests.values_models" in sys.modules


@pytest.mark.parametrize("payload", [
    {"data": "not bin"},
    {"data": forged(typed_values.TUPLE, [1])[:-1]},  # truncated
    {"data": msgpack.packb([[1], {"k": 1}, "extra"])},
    {"data": msgpack.packb([[1], {1: 2}], use_bin_type=True)},  # a non-str keyword
])
def test_malformed_call_data_is_undecodable(payload):
    with pytest.raises(UndecodableValue) as info:
        unpack_call(payload, SECRET)
    assert info.value.status == 400 and info.value.error == "UndecodableValue"


# Forged values are refused


def test_a_reference_to_an_unloaded_module_is_refused_without_importing_it(monkeypatch):
    # A stdlib module, made unloaded for this test whatever other tests imported.
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    for code in (typed_values.PYDANTIC_MODEL, typed_values.DATACLASS):
        parts = ["colorsys:Anything", {}, []] if code == typed_values.PYDANTIC_MODEL else [
            "colorsys:Anything", {}]
        with pytest.raises(UndecodableValue, match="has not imported"):
            typed_values.loads(forged(code, parts))
    assert "colorsys" not in sys.modules


def test_a_reference_to_something_else_than_a_model_or_dataclass_is_refused():
    for reference in ("os:system", "subprocess:Popen", "tests.values_models:Span",
                      "builtins:dict"):
        with pytest.raises(UndecodableValue, match="not a pydantic model"):
            typed_values.loads(forged(typed_values.PYDANTIC_MODEL, [reference, {}, []]))
    for reference in ("os:system", "tests.values_models:Reading"):
        with pytest.raises(UndecodableValue, match="not a dataclass"):
            typed_values.loads(forged(typed_values.DATACLASS, [reference, {}]))


def test_references_are_looked_up_without_running_module_getattr(monkeypatch):
    asked: list[str] = []
    module = types.ModuleType("bs_values_lazy")
    module.__getattr__ = asked.append  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(UndecodableValue, match="has no"):
        typed_values.loads(forged(typed_values.PYDANTIC_MODEL, ["bs_values_lazy:Model", {}, []]))
    assert asked == []


def test_decoding_validates_the_model():
    reference = "tests.values_models:Reading"
    valid = {"sensor": "s", "window": [0, 1], "threshold": 1.0}
    assert typed_values.loads(forged(typed_values.PYDANTIC_MODEL, [reference, valid, []])).window == (0, 1)
    for fields in ({**valid, "threshold": -1.0}, {**valid, "window": "nope"}, {"sensor": "s"}):
        with pytest.raises(UndecodableValue, match="validation error"):
            typed_values.loads(forged(typed_values.PYDANTIC_MODEL, [reference, fields, []]))


def test_unknown_extension_codes_are_refused():
    with pytest.raises(UndecodableValue, match="unknown or malformed"):
        typed_values.loads(forged(99, []))


def test_forged_arrays_are_checked(np):
    assert typed_values.loads(forged(typed_values.NDARRAY, ["<f8", [2], b"\x00" * 16])).shape == (2,)
    for parts, match in [
        (["<f8", [3], b"\x00" * 16], "takes 24 bytes, not 16"),
        (["<f8", [2**40, 2**40], b"\x00" * 16], "not 16"),
        (["|O", [1], b"\x00" * 8], "not plain bytes"),
        (["i4,f8", [1], b"\x00" * 12], "not plain bytes"),
        (["<f8", [-1], b""], "not an array shape"),
        (["<f8", [1], "text"], "not a str"),
        ([3, [1], b"\x00" * 8], "not a numpy dtype"),
    ]:
        with pytest.raises(UndecodableValue, match=match):
            typed_values.loads(forged(typed_values.NDARRAY, parts))
    with pytest.raises(UndecodableValue, match="takes 8 bytes"):
        typed_values.loads(forged(typed_values.NUMPY_SCALAR, ["<f8", b"\x00"]))
