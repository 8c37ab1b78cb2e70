"""An exception raised in a deployment, raised again in its caller as an instance of its class.

The replica's `error` event names the exception's class (`module`, `qualname`) and carries what
rebuilds it (`args`: its constructor arguments and attributes, packed as a call's values are,
docs/protocol.md). The caller then raises an instance of a class made from broker-serve's
`RayServeException` and the user's class, as Ray's `RayTaskError.as_instanceof_cause` does, so
that both ``except ValueError`` and ``except RayServeException`` catch it.

The caller rebuilds the class only if it has loaded the class already: a message never makes it
import a module. The instance is then built as unpickling builds an exception: the class called
with the arguments of its `__reduce__` (by default `exc.args`), then its `__dict__` restored.
Where any step fails, the caller raises a plain RayServeException with the same message; the
RayServeException docstring lists when.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, ClassVar, cast

from ..exceptions import (
    BackPressureError,
    RayServeException,
    RequestCancelledError,
    RequestTimeoutError,
)
from . import messages
from .call_values import pack_value, unpack_value

__all__ = ["describe", "raised_for"]

# An exception whose arguments and attributes pack bigger than this travels without them (and so
# arrives as a plain RayServeException): an error reply stays small.
MAX_ARGS_BYTES = 64 * 1024
# The error events whose type Ray Serve has its own exception for: a callee's cancelled or
# refused call reaches the caller of the caller as the same class.
_RAISED_AS: dict[str, type[RayServeException]] = {
    "Cancelled": RequestCancelledError,
    "QueueFull": BackPressureError,
    "DeadlineExceeded": RequestTimeoutError,
}
# One entry per exception class ever raised in a callee: as many as the classes loaded.
_combined_classes: dict[type[Exception], type[_Rebuilt] | None] = {}
_combining = threading.Lock()
# Raised from a rebuilt class, these would end the caller's iteration silently instead.
_NEVER_REBUILT = (StopIteration, StopAsyncIteration)
_ORIGIN_FIELDS = {"module": str, "qualname": str, "args": dict}


def describe(exc: Exception, secret: bytes) -> dict[str, Any]:
    """The fields an `error` event adds so that its caller can rebuild `exc`'s class.

    An exception that came from a callee passes its callee's description on unchanged, so the
    class survives any number of hops. Never raises: the error reply must go out."""
    if isinstance(exc, RayServeException) and (exc.origin or _is_ours(type(exc))):
        return dict(exc.origin)
    cls = type(exc)
    module, qualname = getattr(cls, "__module__", None), getattr(cls, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        return {}
    fields: dict[str, Any] = {"module": module, "qualname": qualname}
    packed = _packed_arguments(exc, secret)
    if packed is not None:
        fields["args"] = packed
    return fields


def raised_for(event: dict[str, Any], *, deployment: str, secret: bytes) -> RayServeException:
    """What a handle call raises for the `error` event `event` from `deployment`."""
    error_type = str(event.get("error", "Error"))
    summary = f"{error_type} in deployment {deployment}: {event.get('message', '')}"
    special = _RAISED_AS.get(error_type)
    if special is not None:
        return special(summary, deployment=deployment, error_type=error_type)
    origin = {name: event[name] for name, kind in _ORIGIN_FIELDS.items()
              if isinstance(event.get(name), kind)}
    rebuilt = _rebuilt(origin, secret)
    if rebuilt is None:
        exc = RayServeException(summary, deployment=deployment, error_type=error_type)
    else:  # set after the user's attributes: ours win where the names meet
        rebuilt._summary, rebuilt.deployment, rebuilt.error_type = summary, deployment, error_type
        exc = rebuilt
    exc.origin = origin
    return exc


class _Rebuilt(RayServeException):
    """What broker-serve adds to the user's class in each class made from both: the message
    names the deployment, and an instance pickles back into the same two classes."""

    _cause: ClassVar[type[Exception]]
    _summary: str

    def __init__(self, *args: Any) -> None:
        # The user's class builds the instance from its own arguments, as unpickling would.
        self._cause.__init__(self, *args)

    def __str__(self) -> str:
        return self._summary

    def __reduce__(self) -> tuple[Any, ...]:
        reduced = self._cause.__reduce__(self)
        args = reduced[1] if isinstance(reduced, tuple) and len(reduced) > 1 else ()
        return _restore, (self._cause, tuple(args), dict(vars(self)))


def _restore(cause: type[Exception], args: tuple[Any, ...], state: dict[str, Any]
             ) -> RayServeException:
    """Unpickling a rebuilt exception."""
    rebuilt = _instance(cause, args, state)
    if rebuilt is not None:
        return rebuilt
    fallback = RayServeException(str(state.get("_summary", "")),
                                 deployment=str(state.get("deployment", "")),
                                 error_type=str(state.get("error_type", "")))
    fallback.origin = dict(state.get("origin") or {})
    return fallback


def _rebuilt(origin: dict[str, Any], secret: bytes) -> _Rebuilt | None:
    """The exception `origin` describes, if this process can rebuild it."""
    if "args" not in origin or "module" not in origin or "qualname" not in origin:
        return None
    cause = _loaded_class(origin["module"], origin["qualname"])
    if cause is None:
        return None
    try:
        unpacked = unpack_value(origin["args"], secret)
    # A bad signature, an undecodable value, or a signed pickle this process cannot load.
    except Exception:  # noqa: BLE001
        return None
    if not (isinstance(unpacked, list) and len(unpacked) == 2
            and isinstance(unpacked[0], (list, tuple)) and isinstance(unpacked[1], dict)
            and all(type(key) is str for key in unpacked[1])):
        return None
    return _instance(cause, tuple(unpacked[0]), unpacked[1])


def _instance(cause: type[Exception], args: tuple[Any, ...], state: dict[str, Any]
              ) -> _Rebuilt | None:
    combined = _combined(cause)
    if combined is None:
        return None
    try:
        instance = combined(*args)
        vars(instance).update(state)
    # The user's constructor refuses the arguments: it needs others than its __reduce__ gives.
    except Exception:  # noqa: BLE001
        return None
    return instance if isinstance(instance, combined) else None


def _combined(cause: type[Exception]) -> type[_Rebuilt] | None:
    """The class deriving from both RayServeException and `cause`, made once per class (so
    that two errors of one class have one class too); None if `cause` cannot be subclassed so
    (a C type that forbids it, an `__init_subclass__` that refuses, a metaclass conflict)."""
    with _combining:
        if cause not in _combined_classes:
            _combined_classes[cause] = _combine(cause)
        return _combined_classes[cause]


def _combine(cause: type[Exception]) -> type[_Rebuilt] | None:
    name = f"RayServeException({cause.__qualname__})"
    try:
        combined = type(name, (_Rebuilt, cause), {
            "_cause": cause, "__module__": RayServeException.__module__, "__qualname__": name})
    except Exception:  # noqa: BLE001 - whatever the class's own hooks raise
        return None
    return cast("type[_Rebuilt]", combined)


def _loaded_class(module: str, qualname: str) -> type[Exception] | None:
    """The exception class named so, if this process has loaded it; nothing is imported.

    A class found by name in its imported module wins. Else a class that travelled by value
    (one from the driver's `__main__` or the user's own modules, whose module a replica has
    not imported) is found among the loaded subclasses of Exception, if exactly one matches."""
    found = _by_name(sys.modules.get(module), qualname)
    if found is None:
        matches = [cls for cls in _loaded_exception_classes()
                   if cls.__module__ == module and cls.__qualname__ == qualname]
        found = matches[0] if len(matches) == 1 else None
    if (not isinstance(found, type) or not issubclass(found, Exception)
            or issubclass(found, (*_NEVER_REBUILT, _Rebuilt))):
        return None
    return found


def _by_name(namespace: Any, qualname: str) -> Any:
    """Walk `qualname` through namespace dicts only: no module __getattr__ or descriptor runs."""
    found = namespace
    for name in qualname.split("."):
        try:
            found = vars(found).get(name)
        except TypeError:  # None, or no __dict__
            return None
        if found is None:
            return None
    return found


def _loaded_exception_classes() -> list[type[Exception]]:
    seen: set[type[Exception]] = set()
    pending: list[type[Exception]] = [Exception]
    while pending:
        # type's own method: a metaclass cannot answer for its classes.
        for subclass in type.__subclasses__(pending.pop()):
            if subclass not in seen:
                seen.add(subclass)
                pending.append(subclass)
    return list(seen)


def _packed_arguments(exc: Exception, secret: bytes) -> dict[str, Any] | None:
    """`[args, attributes]` of `exc` as a call's value travels; None if its `__reduce__` does
    not call its own class, or they cannot be pickled or pack bigger than MAX_ARGS_BYTES."""
    try:
        reduced = exc.__reduce__()
        if not (isinstance(reduced, tuple) and len(reduced) >= 2 and reduced[0] is type(exc)
                and isinstance(reduced[1], tuple)):
            return None
        state = reduced[2] if len(reduced) > 2 and reduced[2] is not None else {}
        if not (isinstance(state, dict) and all(type(key) is str for key in state)):
            return None
        packed = pack_value([list(reduced[1]), state], secret)
        if len(messages.pack(packed)) > MAX_ARGS_BYTES:
            return None
    # User code: a __reduce__ that fails, an attribute that cannot be pickled.
    except Exception:  # noqa: BLE001
        return None
    return packed


def _is_ours(cls: type) -> bool:
    """broker-serve's own exceptions travel by their `error` name alone."""
    return str(getattr(cls, "__module__", "")).split(".")[0] == "broker_serve"
