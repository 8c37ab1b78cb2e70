"""Values that cross process boundaries: plain data as msgpack, anything else as a signed pickle.

A pickle is only ever loaded after its HMAC-SHA256 under the cluster secret verifies, so whoever
can publish to a queue cannot make a replica run code (docs/architecture.md, "Trust").
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import cloudpickle

from .exceptions import UntrustedPayload

_PLAIN_SCALARS = (type(None), bool, int, float, str, bytes)


def sign(secret: bytes, data: bytes) -> bytes:
    return hmac.new(secret, data, hashlib.sha256).digest()


def dumps_signed(value: Any, secret: bytes) -> tuple[bytes, bytes]:
    data = cloudpickle.dumps(value)
    return data, sign(secret, data)


def loads_signed(data: Any, sig: Any, secret: bytes) -> Any:
    if not isinstance(data, bytes) or not isinstance(sig, bytes):
        raise UntrustedPayload("pickled payload without a signature; refusing to load it")
    if not hmac.compare_digest(sign(secret, data), sig):
        raise UntrustedPayload("pickled payload with a bad signature; refusing to load it")
    return cloudpickle.loads(data)


def is_plain(value: Any, depth: int = 0) -> bool:
    """True if msgpack carries `value` unchanged: no tuples, no custom types, str dict keys."""
    if isinstance(value, _PLAIN_SCALARS) and type(value) in _PLAIN_SCALARS:
        return True
    if depth > 32:
        return False
    if type(value) is list:
        return all(is_plain(item, depth + 1) for item in value)
    if type(value) is dict:
        return all(
            type(key) is str and is_plain(item, depth + 1) for key, item in value.items()
        )
    return False


def pack_call(args: tuple[Any, ...], kwargs: dict[str, Any], secret: bytes) -> dict[str, Any]:
    if is_plain(list(args)) and is_plain(kwargs):
        return {"args": list(args), "kwargs": kwargs}
    data, sig = dumps_signed((args, kwargs), secret)
    return {"pickled": data, "sig": sig}


def unpack_call(payload: dict[str, Any], secret: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if "pickled" in payload:
        args, kwargs = loads_signed(payload.get("pickled"), payload.get("sig"), secret)
        return tuple(args), dict(kwargs)
    args, kwargs = payload.get("args", []), payload.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise TypeError("'args' must be a list and 'kwargs' a map")
    return tuple(args), kwargs


def pack_value(value: Any, secret: bytes) -> dict[str, Any]:
    if is_plain(value):
        return {"value": value}
    data, sig = dumps_signed(value, secret)
    return {"pickled": data, "sig": sig}


def unpack_value(payload: dict[str, Any], secret: bytes) -> Any:
    if "pickled" in payload:
        return loads_signed(payload.get("pickled"), payload.get("sig"), secret)
    return payload.get("value")
