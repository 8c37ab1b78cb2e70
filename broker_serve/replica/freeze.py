"""Freezing an ASGI app: the copy `serve.ingress` serves, which later changes to the app (routes,
middleware, exception handlers, event handlers added after decoration) do not reach, as in Ray.

Ray copies the whole app with a cloudpickle round trip, the user's functions and data with it:
each copied function sees a snapshot of only the globals it names at that moment (a route
calling a helper defined further down fails with NameError), and a route's copy and the class
method that fills the same dict in `__init__` no longer share it. This copy is of the app's
structure only, by an in-memory pickle round trip that copies:

- builtin containers, and Starlette and FastAPI objects: the app, its routers, routes,
  middleware entries, lifespans (not `State`, the app's data: shared, so what a startup hook
  stores through the original app is what the copy's `request.app.state` reads);
- functions and bound methods that refer to such an object through their closure (FastAPI's
  own `/openapi.json` endpoint, a lifespan merged by `include_router`, a route naming `app`), so
  they refer to the copy; their other closure variables and their globals stay shared.

Everything else is shared: functions, classes, modules, the user's objects (a dependency
holding a lock included), pydantic's validators.
"""

from __future__ import annotations

import io
import pickle
import types
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Router

__all__ = ["freeze"]

_A = TypeVar("_A")

_ATOMS = (type(None), bool, int, float, complex, str, bytes)
_CONTAINERS = (list, dict, set, frozenset, tuple, bytearray)
# Subclasses of these are structure wherever they are defined (a user's FastAPI subclass).
_STRUCTURE = (Starlette, Router, BaseRoute, Middleware)
_FRAMEWORKS = ("starlette", "fastapi")


def freeze(app: _A) -> _A:
    """A copy of `app`'s structure, sharing its code and data."""
    buffer = io.BytesIO()
    pickler = _Freezer(buffer)
    try:
        pickler.dump(app)
    except Exception as exc:  # whatever the app's structure holds decides what it raises
        raise TypeError(f"serve.ingress copies the app it is given, as Ray Serve does, and "
                        f"{app!r} cannot be copied: {exc}") from exc
    buffer.seek(0)
    frozen: _A = _Thawer(buffer, pickler.kept).load()
    if isinstance(frozen, Starlette):
        # Built already if the app served before: rebuilt on first use from the copy's
        # middleware entries, not shared with the original's.
        frozen.middleware_stack = None
    return frozen


def _is_framework_object(obj: Any) -> bool:
    if isinstance(obj, State):
        return False
    return isinstance(obj, _STRUCTURE) or (
        type(obj).__module__.partition(".")[0] in _FRAMEWORKS and not isinstance(obj, type))


class _Freezer(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.kept: dict[int, Any] = {}
        self._bound: dict[int, bool] = {}

    def persistent_id(self, obj: Any) -> int | None:
        """None to copy `obj`; otherwise it is kept, under this id."""
        if id(obj) in self.kept:  # a copied function's globals, say
            return id(obj)
        if isinstance(obj, _ATOMS + _CONTAINERS) or _is_framework_object(obj):
            return None
        if isinstance(obj, types.FunctionType) and self._binds_structure(obj):
            return None
        if isinstance(obj, types.MethodType) and self._refers_to_structure(obj.__self__):
            return None
        self.kept[id(obj)] = obj
        return id(obj)

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.FunctionType):  # one persistent_id chose to copy
            return self._reduce_function(obj)
        return NotImplemented

    def _refers_to_structure(self, obj: Any) -> bool:
        if isinstance(obj, types.FunctionType):
            return self._binds_structure(obj)
        if isinstance(obj, types.MethodType):
            return self._refers_to_structure(obj.__self__)
        return _is_framework_object(obj)

    def _binds_structure(self, function: types.FunctionType) -> bool:
        """Whether the function's closure reaches a framework object, through other
        functions' closures too."""
        known = self._bound.get(id(function))
        if known is None:
            self._bound[id(function)] = False  # a function in its own closure
            known = any(self._refers_to_structure(value)
                        for value in _cell_values(function).values())
            self._bound[id(function)] = known
        return known

    def _reduce_function(self, function: types.FunctionType) -> tuple[Any, ...]:
        """Its structure cells new and filled with copies; its other cells shared. Rebuilt in
        two steps, so that a function in its own closure pickles."""
        values = _cell_values(function)
        copied = {index: value for index, value in values.items()
                  if self._refers_to_structure(value)}
        cells = function.__closure__ or ()
        shared = tuple(None if index in copied else cell for index, cell in enumerate(cells))
        state = {
            "closure": copied,
            "attributes": {
                "__defaults__": function.__defaults__,
                "__kwdefaults__": function.__kwdefaults__,
                "__dict__": function.__dict__,
                "__qualname__": function.__qualname__,
                "__module__": function.__module__,
                "__doc__": function.__doc__,
                "__annotations__": function.__annotations__,
            },
        }
        self.kept[id(function.__globals__)] = function.__globals__  # a dict, else copied
        args = (function.__code__, function.__globals__, function.__name__, shared)
        return _function_skeleton, args, state, None, None, _fill_function


class _Thawer(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, kept: dict[int, Any]) -> None:
        super().__init__(file)
        self._kept = kept

    def persistent_load(self, pid: Any) -> Any:
        return self._kept[pid]


def _cell_values(function: types.FunctionType) -> dict[int, Any]:
    """The closure's assigned cells by index (a local not assigned yet has an empty one)."""
    values = {}
    for index, cell in enumerate(function.__closure__ or ()):
        try:
            values[index] = cell.cell_contents
        except ValueError:
            continue
    return values


def _function_skeleton(code: types.CodeType, globals_: dict[str, Any], name: str,
                       shared: tuple[types.CellType | None, ...]) -> types.FunctionType:
    closure = tuple(types.CellType() if cell is None else cell for cell in shared) or None
    return types.FunctionType(code, globals_, name, None, closure)


def _fill_function(function: types.FunctionType, state: dict[str, Any]) -> None:
    cells = function.__closure__ or ()
    for index, value in state["closure"].items():
        cells[index].cell_contents = value
    for name, value in state["attributes"].items():
        setattr(function, name, value)
