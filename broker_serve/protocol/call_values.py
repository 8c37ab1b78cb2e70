"""How handle-call arguments and results travel, from cheapest to most powerful:

- plain msgpack data as itself (`args`/`kwargs`, `value`);
- tuples, numpy arrays, pydantic models and dataclasses as typed msgpack (`data`, see typed_values.py),
  decoded without pickle;
- anything else as a cloudpickle signed with HMAC-SHA256 under the cluster secret (`pickled`).

A pickle is only ever loaded after its signature verifies, so whoever can publish to a queue
cannot make a replica run code (docs/architecture.md, "Trust"). The secret comes from the
operator (credentials.py); a process without one (b"") cannot sign, and nothing verifies in it.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import cloudpickle

from ..credentials import HOW_TO_SET
from ..exceptions import ClusterSecretMissing, UndecodableValue, UntrustedPayload
from . import typed_values

_PLAIN_SCALARS = frozenset({type(None), bool, int, float, str, bytes})
# msgpack integers are 64-bit: a bigger int is not plain data.
_INT_MIN, _INT_END = -(2**63), 2**64


def sign(secret: bytes, data: bytes) -> bytes:
    if not secret:
        raise ClusterSecretMissing(f"this process has no cluster secret, so it cannot sign "
                                   f"what only a pickle (or a signed typed value) carries: "
                                   f"{HOW_TO_SET}")
    return hmac.new(secret, data, hashlib.sha256).digest()


def verifies(secret: bytes, data: Any, sig: Any) -> bool:
    """Whether `sig` is the signature of `data` (both bytes) under `secret`."""
    return (bool(secret) and isinstance(data, bytes) and isinstance(sig, bytes)
            and hmac.compare_digest(sign(secret, data), sig))


def not_verified(what: str, secret: bytes, doing: str = "load") -> str:
    """Why a signed `what` is refused: the words every receiver uses."""
    if not secret:
        return (f"the signature of {what} cannot be verified: this process has no cluster "
                f"secret; refusing to {doing} it: {HOW_TO_SET}")
    return (f"the signature of {what} does not verify under this cluster's secret: the sender "
            f"signed with another secret (a stale one) or has none; refusing to {doing} it, "
            f"nothing of it ran. Every process of the cluster needs the same secret "
            f"(BROKER_SERVE_CLUSTER_SECRET_FILE or BROKER_SERVE_CLUSTER_SECRET)")


def dumps_signed(value: Any, secret: bytes) -> tuple[bytes, bytes]:
    data = cloudpickle.dumps(value)
    return data, sign(secret, data)


def loads_signed(data: Any, sig: Any, secret: bytes, what: str = "the pickled payload") -> Any:
    if not isinstance(data, bytes) or not isinstance(sig, bytes):
        raise UntrustedPayload(f"{what} has no signature; refusing to load it")
    if not verifies(secret, data, sig):
        raise UntrustedPayload(not_verified(what, secret))
    return cloudpickle.loads(data)


def is_plain(value: Any, depth: int = 0) -> bool:
    """True if msgpack carries `value` unchanged: no tuples, no custom types, str dict keys."""
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return kind is not int or _INT_MIN <= value < _INT_END
    if depth > 32:
        return False
    if kind is list:
        return all(is_plain(item, depth + 1) for item in value)
    if kind is dict:
        return all(
            type(key) is str and is_plain(item, depth + 1) for key, item in value.items()
        )
    return False


def pack_call(args: tuple[Any, ...], kwargs: dict[str, Any], secret: bytes) -> dict[str, Any]:
    if is_plain(list(args)) and is_plain(kwargs):
        return {"args": list(args), "kwargs": kwargs}
    return _typed_or_signed([list(args), kwargs], (args, kwargs), secret)


def unpack_call(payload: dict[str, Any], secret: bytes) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if "pickled" in payload:
        args, kwargs = loads_signed(payload.get("pickled"), payload.get("sig"), secret,
                                    "the call's pickled arguments")
        return tuple(args), dict(kwargs)
    if "data" in payload:
        call = _loads_typed(payload, secret)
        if not (isinstance(call, list) and len(call) == 2 and isinstance(call[0], list)
                and isinstance(call[1], dict) and all(type(k) is str for k in call[1])):
            raise UndecodableValue("a call's 'data' must hold [args, kwargs]")
        return tuple(call[0]), call[1]
    args, kwargs = payload.get("args", []), payload.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise TypeError("'args' must be a list and 'kwargs' a map")
    return tuple(args), kwargs


def pack_value(value: Any, secret: bytes) -> dict[str, Any]:
    if is_plain(value):
        return {"value": value}
    return _typed_or_signed(value, value, secret)


def unpack_value(payload: dict[str, Any], secret: bytes) -> Any:
    if "pickled" in payload:
        return loads_signed(payload.get("pickled"), payload.get("sig"), secret)
    if "data" in payload:
        return _loads_typed(payload, secret)
    return payload.get("value")


def carries_value(event: dict[str, Any]) -> bool:
    """True if a `result` event holds a value, in any of the forms `pack_value` makes."""
    return "value" in event or "data" in event or "pickled" in event


def _typed_or_signed(typed: Any, pickled: Any, secret: bytes) -> dict[str, Any]:
    modules: set[str] = set()
    try:
        data = typed_values.dumps(typed, modules=modules)
    except typed_values.Unrepresentable:
        data, sig = dumps_signed(pickled, secret)
        return {"pickled": data, "sig": sig}
    if modules:  # signed, the receiver may import a module it lacks, as a pickle would
        return {"data": data, "sig": sign(secret, data)}
    return {"data": data}


def _loads_typed(payload: dict[str, Any], secret: bytes) -> Any:
    data, sig = payload.get("data"), payload.get("sig")
    if not isinstance(data, bytes):
        raise UndecodableValue("'data' must be a msgpack bin")
    if sig is not None and secret and not verifies(secret, data, sig):
        raise UntrustedPayload(not_verified("the typed value", secret))
    # Without a secret the signature cannot count: decoded as an unsigned value would be.
    return typed_values.loads(data, import_modules=sig is not None and bool(secret))
