from __future__ import annotations

import collections
import dataclasses
import datetime
import decimal
import enum
import pathlib
import uuid

import orjson
import pydantic
import pytest
from starlette.datastructures import Headers, QueryParams
from starlette.responses import JSONResponse, Response, StreamingResponse

from broker_serve.replica.responses import json_dumps, jsonable, to_response


class Color(enum.Enum):
    RED = "red"


class Item(pydantic.BaseModel):
    name: str
    price: decimal.Decimal
    when: datetime.date


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Opaque:
    pass


def test_query_params_become_a_dict() -> None:
    assert jsonable(QueryParams("a=b&c=d")) == {"a": "b", "c": "d"}


def test_repeated_query_param_keeps_the_last_value_like_dict() -> None:
    params = QueryParams("a=1&a=2")
    assert jsonable(params) == dict(params) == {"a": "2"}


def test_headers_become_a_dict() -> None:
    assert jsonable(Headers({"x-a": "1"})) == {"x-a": "1"}


def test_pydantic_model_is_dumped_in_json_mode() -> None:
    item = Item(name="pen", price=decimal.Decimal("1.50"), when=datetime.date(2024, 1, 2))
    assert jsonable(item) == {"name": "pen", "price": "1.50", "when": "2024-01-02"}


def test_dataclass() -> None:
    assert jsonable(Point(1, 2)) == {"x": 1, "y": 2}


def test_containers_become_lists() -> None:
    value = {
        "set": {1},
        "frozenset": frozenset({2}),
        "tuple": (3, 4),
        "deque": collections.deque([5]),
        "generator": (n for n in range(2)),
        "iterator": iter(["a"]),
        "keys": {"k": 1}.keys(),
    }
    assert jsonable(value) == {
        "set": [1],
        "frozenset": [2],
        "tuple": [3, 4],
        "deque": [5],
        "generator": [0, 1],
        "iterator": ["a"],
        "keys": ["k"],
    }


def test_scalars_like_fastapi() -> None:
    value = [
        Color.RED,
        decimal.Decimal(10),
        decimal.Decimal("1E+2"),
        decimal.Decimal("1.5"),
        uuid.UUID(int=1),
        pathlib.PurePosixPath("/tmp/x"),
        datetime.datetime(2024, 1, 2, 3, 4, 5),
        datetime.time(1, 2),
        datetime.timedelta(seconds=1.5),
    ]
    assert jsonable(value) == [
        "red",
        10,
        100,
        1.5,
        "00000000-0000-0000-0000-000000000001",
        "/tmp/x",
        "2024-01-02T03:04:05",
        "01:02:00",
        1.5,
    ]


def test_integral_decimal_stays_an_int() -> None:
    assert json_dumps(decimal.Decimal(12345678901234567890)) == b"12345678901234567890"


def test_nested_bytes_are_decoded_as_utf8() -> None:
    assert jsonable({"b": b"caf\xc3\xa9", "bad": b"\xff"}) == {"b": "café", "bad": "\ufffd"}


def test_non_str_keys() -> None:
    assert jsonable({1: "a", Color.RED: "b"}) == {"1": "a", "red": "b"}


def test_unencodable_object_raises_type_error_naming_it() -> None:
    with pytest.raises(TypeError, match="Opaque"):
        json_dumps({"nested": [Opaque()]})


def test_numpy() -> None:
    numpy = pytest.importorskip("numpy")
    value = {
        "array": numpy.arange(4).reshape(2, 2),
        "strided": numpy.arange(6)[::2],
        "objects": numpy.array([Point(1, 2)], dtype=object),
        "scalar": numpy.float32(0.5),
    }
    assert jsonable(value) == {
        "array": [[0, 1], [2, 3]],
        "strided": [0, 2, 4],
        "objects": [{"x": 1, "y": 2}],
        "scalar": 0.5,
    }


def test_response_is_returned_unchanged() -> None:
    response = Response(b"made", status_code=201, headers={"x-made": "yes"}, media_type="a/b")
    assert to_response(response) is response
    assert response.status_code == 201
    assert response.headers["x-made"] == "yes"
    assert response.headers["content-type"] == "a/b"


@pytest.mark.parametrize(
    "response",
    [JSONResponse({"a": 1}), StreamingResponse(iter([b"x"]), media_type="text/event-stream")],
)
def test_response_subclasses_are_returned_unchanged(response: Response) -> None:
    assert to_response(response) is response


def test_none_is_an_empty_text_body() -> None:
    response = to_response(None)
    assert response.status_code == 200
    assert response.body == b""
    assert response.headers["content-type"] == "text/plain; charset=utf-8"


def test_str_is_utf8_text() -> None:
    response = to_response("café")
    assert response.body == "café".encode()
    assert response.headers["content-type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize("value", [b"\x00raw", bytearray(b"\x00raw"), memoryview(b"\x00raw")])
def test_bytes_are_raw_text_plain(value: bytes | bytearray | memoryview) -> None:
    response = to_response(value)
    assert response.body == b"\x00raw"
    assert response.headers["content-type"] == "text/plain"


def test_other_values_are_json() -> None:
    response = to_response({"q": QueryParams("a=b"), "n": [1, 2.5, None, True]})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert orjson.loads(response.body) == {"q": {"a": "b"}, "n": [1, 2.5, None, True]}


def test_json_response_for_a_plain_number() -> None:
    assert to_response(3).body == b"3"
