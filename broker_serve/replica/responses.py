"""Turning a deployment's return value into an HTTP response, as Ray Serve does."""

from __future__ import annotations

import datetime
import decimal
import ipaddress
import pathlib
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence, ValuesView
from collections.abc import Set as AbstractSet
from typing import Any

import orjson
import pydantic
from starlette.responses import PlainTextResponse, Response

__all__ = ["json_dumps", "jsonable", "to_response"]

# Non-str keys so that {1: "a"} works; numpy so that arrays need no copy to lists.
_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


def to_response(value: object) -> Response:
    """The HTTP response for what a deployment's `__call__` returned."""
    if isinstance(value, Response):
        return value
    if value is None:
        return PlainTextResponse("")
    if isinstance(value, str):
        return PlainTextResponse(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        # Ray Serve labels bytes as text without claiming a charset.
        return Response(bytes(value), headers={"content-type": "text/plain"})
    return Response(json_dumps(value), media_type="application/json")


def json_dumps(value: object) -> bytes:
    """JSON for anything FastAPI's `jsonable_encoder` accepts; TypeError otherwise."""
    return orjson.dumps(value, default=_default, option=_OPTIONS)


def jsonable(value: object) -> object:
    """`value` as plain JSON-compatible Python data."""
    return orjson.loads(json_dumps(value))


def _decimal(value: decimal.Decimal) -> int | float:
    # As FastAPI: a Decimal without a fractional part stays an exact integer.
    if value.is_finite() and int(value.as_tuple().exponent) >= 0:
        return int(value)
    return float(value)


def _text(value: bytes | bytearray | memoryview) -> str:
    return bytes(value).decode("utf-8", errors="replace")


# Types orjson rejects, looked up along the value's MRO so subclasses match too.
_BY_TYPE: dict[type, Callable[[Any], object]] = {
    bytes: _text,
    bytearray: _text,
    memoryview: _text,
    decimal.Decimal: _decimal,
    datetime.timedelta: datetime.timedelta.total_seconds,
    pathlib.PurePath: str,
    re.Pattern: lambda pattern: pattern.pattern,
    ipaddress.IPv4Address: str,
    ipaddress.IPv6Address: str,
    ipaddress.IPv4Network: str,
    ipaddress.IPv6Network: str,
    pydantic.AnyUrl: str,
    pydantic.NameEmail: str,
    pydantic.SecretStr: str,
    pydantic.SecretBytes: str,
}


def _default(value: object) -> object:
    """orjson's hook for what it cannot encode natively; its result is encoded in turn."""
    for cls in type(value).__mro__:
        encode = _BY_TYPE.get(cls)
        if encode is not None:
            return encode(value)
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Mapping):
        return dict(value)
    numpy = sys.modules.get("numpy")  # numpy values imply numpy is loaded; never import it
    if numpy is not None and isinstance(value, (numpy.ndarray, numpy.generic)):
        # Reached only for what OPT_SERIALIZE_NUMPY declines (object dtype, non-contiguous...).
        return value.tolist()
    if isinstance(value, (AbstractSet, Sequence, ValuesView, Iterator)):
        return list(value)
    raise TypeError(f"Object of type {type(value).__qualname__} is not JSON serializable")
