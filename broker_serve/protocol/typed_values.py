"""Typed values as msgpack extension types, decoded without pickle.

Tuples, numpy arrays and scalars, pydantic models and dataclasses each have an extension type
(docs/protocol.md, "Typed values"). A class travels as a reference, `"module:qualname"`, and the
receiver builds the value through the class's front door: a pydantic model is validated, a
dataclass constructed. The receiver only looks references up among the modules it has imported
already, so a value from an untrusted publisher cannot make it import anything. Only a sender
known to hold the cluster secret may name a module the receiver has not imported yet.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import math
import sys
from typing import Any

import cloudpickle
import msgpack
from pydantic import BaseModel, RootModel

from ..exceptions import BrokerServeError, UndecodableValue

TUPLE = 1
NDARRAY = 2
NUMPY_SCALAR = 3
PYDANTIC_MODEL = 4
DATACLASS = 5

# Classes defined in the driver's script exist nowhere else: they must travel pickled by value.
_SCRIPT_MODULES = frozenset({"__main__", "__mp_main__"})
# numpy dtype kinds whose bytes are the whole value: no object pointers, no fields.
_FLAT_DTYPE_KINDS = frozenset("biufcmMSUV")


class Unrepresentable(BrokerServeError, TypeError):
    """The value has no typed form here; it has to travel as a signed pickle."""


def dumps(value: Any, *, modules: set[str] | None = None) -> bytes:
    """Encode `value`. If given, `modules` collects the modules its class references name."""
    encoder = _Encoder(set() if modules is None else modules)
    try:
        return encoder.pack(value)
    except Unrepresentable:
        raise
    except Exception as exc:  # msgpack limits, odd attributes: the signed pickle still works
        raise Unrepresentable(str(exc)) from exc


def loads(data: bytes, *, import_modules: bool = False) -> Any:
    """Decode what `dumps` made. Pass `import_modules` only for data from a trusted sender."""
    try:
        return _Decoder(import_modules).unpack(data)
    except UndecodableValue:
        raise
    except Exception as exc:  # msgpack, pydantic and the classes themselves raise many types
        raise UndecodableValue(f"cannot decode a typed value: {exc}") from exc


class _Encoder:
    def __init__(self, modules: set[str]) -> None:
        self.modules = modules

    def pack(self, value: Any) -> bytes:
        # strict_types: tuples, namedtuples, enums and numpy's float64 must reach `default`,
        # not pass as the list, int or float they subclass.
        return msgpack.packb(  # type: ignore[no-any-return]
            value, default=self.default, strict_types=True, use_bin_type=True)

    def default(self, value: Any) -> msgpack.ExtType:
        kind = type(value)
        if kind is tuple:
            return msgpack.ExtType(TUPLE, self.pack(list(value)))
        numpy = sys.modules.get("numpy")  # no array exists before numpy is imported
        if numpy is not None and kind is numpy.ndarray:
            return msgpack.ExtType(NDARRAY, self.pack(
                [_flat_dtype(value.dtype).str, list(value.shape), value.tobytes()]))
        if numpy is not None and isinstance(value, numpy.generic):
            return msgpack.ExtType(NUMPY_SCALAR, self.pack(
                [_flat_dtype(value.dtype).str, value.tobytes()]))
        if isinstance(value, BaseModel):
            return msgpack.ExtType(PYDANTIC_MODEL, self.pack(
                [self.reference(kind), _model_input(value), sorted(value.model_fields_set)]))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            names = _init_fields(type(value))
            if names is None:
                raise Unrepresentable(f"{kind.__qualname__}(**fields) would not rebuild it")
            fields = {name: getattr(value, name) for name in names}
            return msgpack.ExtType(DATACLASS, self.pack([self.reference(kind), fields]))
        raise Unrepresentable(f"{kind.__qualname__} has no typed form")

    def reference(self, cls: type) -> str:
        module, qualname = cls.__module__, cls.__qualname__
        if (module in _SCRIPT_MODULES or _pickled_by_value(module)
                or _lookup(sys.modules.get(module), qualname) is not cls):
            raise Unrepresentable(f"{module}.{qualname} cannot be found by name elsewhere")
        self.modules.add(module)
        return f"{module}:{qualname}"


class _Decoder:
    def __init__(self, import_modules: bool) -> None:
        self.import_modules = import_modules

    def unpack(self, data: bytes) -> Any:
        return msgpack.unpackb(data, ext_hook=self.ext_hook, raw=False, strict_map_key=False)

    def ext_hook(self, code: int, data: bytes) -> Any:
        parts = self.unpack(data)
        if code == TUPLE and isinstance(parts, list):
            return tuple(parts)
        if code == NDARRAY and _shaped(parts, 3):
            return _array(*parts)
        if code == NUMPY_SCALAR and _shaped(parts, 2):
            return _scalar(*parts)
        if code == PYDANTIC_MODEL and _shaped(parts, 3):
            return self.model(*parts)
        if code == DATACLASS and _shaped(parts, 2) and isinstance(parts[1], dict):
            cls = self.resolve(parts[0])
            if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
                raise UndecodableValue(f"{parts[0]!r} is not a dataclass")
            return cls(**parts[1])
        raise UndecodableValue(f"extension type {code} is unknown or malformed")

    def model(self, reference: Any, fields: Any, fields_set: Any) -> BaseModel:
        cls = self.resolve(reference)
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            raise UndecodableValue(f"{reference!r} is not a pydantic model")
        model = cls.model_validate(fields)  # the sender is not trusted to have validated it
        if isinstance(fields_set, list):  # so that exclude_unset works as it did for the sender
            object.__setattr__(model, "__pydantic_fields_set__",
                               model.model_fields_set & set(fields_set))
        return model

    def resolve(self, reference: Any) -> Any:
        if not isinstance(reference, str) or ":" not in reference:
            raise UndecodableValue(f"{reference!r} is not a 'module:qualname' reference")
        module_name, _, qualname = reference.partition(":")
        module = sys.modules.get(module_name)
        if module is None and self.import_modules:
            module = importlib.import_module(module_name)
        if module is None:
            raise UndecodableValue(
                f"{reference!r} names module {module_name!r}, which this process has not "
                "imported; an unsigned value cannot make it import one")
        found = _lookup(module, qualname)
        if found is None:
            raise UndecodableValue(f"module {module_name!r} has no {qualname!r}")
        return found


def _shaped(parts: Any, length: int) -> bool:
    return isinstance(parts, list) and len(parts) == length


def _lookup(namespace: Any, qualname: str) -> Any:
    """Walk `qualname` through namespace dicts only: no __getattr__ or descriptor runs."""
    found = namespace
    for name in qualname.split("."):
        try:
            found = vars(found).get(name)
        except TypeError:  # no __dict__
            return None
        if found is None:
            return None
    return found


def _pickled_by_value(module: str) -> bool:
    """True if cloudpickle ships `module` (or a package holding it) by value."""
    registered = cloudpickle.list_registry_pickle_by_value()
    parts = module.split(".")
    return any(".".join(parts[:n]) in registered for n in range(1, len(parts) + 1))


def _model_input(model: BaseModel) -> Any:
    """What `model_validate` takes to rebuild `model`, keyed as validation expects."""
    cls = type(model)
    if model.__pydantic_private__:
        raise Unrepresentable(f"{cls.__qualname__} has private attributes, which do not travel")
    if isinstance(model, RootModel):
        return model.root
    by_alias = cls.model_config.get("validate_by_alias", True)
    fields = {}
    for name, info in cls.model_fields.items():
        alias = info.validation_alias if info.validation_alias is not None else info.alias
        if alias is not None and by_alias and not isinstance(alias, str):
            raise Unrepresentable(f"{cls.__qualname__}.{name} has an AliasPath or AliasChoices")
        fields[alias if alias is not None and by_alias else name] = getattr(model, name)
    fields.update(model.__pydantic_extra__ or {})
    return fields


@functools.lru_cache(maxsize=256)
def _init_fields(cls: type) -> tuple[str, ...] | None:
    """The fields that `cls(**fields)` rebuilds an instance from; None if its __init__ takes
    something else (init=False fields, an InitVar, a hand-written __init__)."""
    names = tuple(field.name for field in dataclasses.fields(cls))
    try:
        parameters = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return None
    keywords = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names if keywords == set(names) and len(parameters) == len(names) else None


def _flat_dtype(dtype: Any) -> Any:
    if dtype.kind not in _FLAT_DTYPE_KINDS or dtype.fields is not None or dtype.itemsize == 0:
        raise Unrepresentable(f"numpy dtype {dtype} is not plain bytes")
    return dtype


def _numpy_dtype(name: Any) -> Any:
    try:
        import numpy
    except ImportError as exc:
        raise UndecodableValue("a numpy value arrived, but numpy is not installed") from exc
    if not isinstance(name, str):
        raise UndecodableValue(f"{name!r} is not a numpy dtype")
    try:
        return _flat_dtype(numpy.dtype(name))
    except Unrepresentable as exc:
        raise UndecodableValue(str(exc)) from exc


def _array(dtype_name: Any, shape: Any, raw: Any) -> Any:
    import numpy

    dtype = _numpy_dtype(dtype_name)
    if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
        raise UndecodableValue(f"{shape!r} is not an array shape")
    size = math.prod(shape) * dtype.itemsize
    if not isinstance(raw, bytes) or len(raw) != size:
        raise UndecodableValue(f"an array of shape {tuple(shape)} and dtype {dtype} takes "
                               f"{size} bytes, not {_length(raw)}")
    # copy(): frombuffer's array is a read-only view of the message
    return numpy.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def _scalar(dtype_name: Any, raw: Any) -> Any:
    import numpy

    dtype = _numpy_dtype(dtype_name)
    if not isinstance(raw, bytes) or len(raw) != dtype.itemsize:
        raise UndecodableValue(f"a numpy {dtype} scalar takes {dtype.itemsize} bytes, "
                               f"not {_length(raw)}")
    return numpy.frombuffer(raw, dtype=dtype)[0]


def _length(raw: Any) -> str:
    return str(len(raw)) if isinstance(raw, bytes) else f"a {type(raw).__name__}"
