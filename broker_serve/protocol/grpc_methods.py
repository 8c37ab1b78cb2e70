"""The (de)serializers of a gRPC method, found from the cluster's `grpc_servicer_functions`.

A `grpc_servicer_functions` entry names a generated `add_<Service>Servicer_to_server` function
(`"user_defined_protos_pb2_grpc.add_UserDefinedServiceServicer_to_server"`). Calling it with a
servicer whose every attribute is a placeholder, and a stand-in server that only records what
it is given, yields the service's method handlers without starting anything. The proxy and the
replica both resolve a method this way (docs/protocol.md, "`grpc` body"): the proxy to know
whether the method streams, the replica to decode the request and encode the replies.

grpcio is an optional extra, so nothing here imports it: the captured handlers are grpc's own
objects, and only their public attributes (`service()`, `request_deserializer`, ...) are used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..exceptions import ProtocolError


@dataclass(frozen=True)
class GrpcMethod:
    """One method of a user's gRPC service: how its messages travel as bytes."""

    path: str  # "/package.Service/Method"
    request_deserializer: Callable[[bytes], Any]
    response_serializer: Callable[[Any], bytes]
    streaming: bool  # server-streaming (unary-stream); else unary-unary

    @property
    def name(self) -> str:
        """The method's own name, the last segment of its path: the deployment's method."""
        return self.path.rsplit("/", 1)[-1]


class _CallDetails(NamedTuple):
    """What `GenericRpcHandler.service` is asked about (grpc.HandlerCallDetails' fields)."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


class _Placeholder:
    """A servicer whose methods are never called: generated code only reads them."""

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def never_called(*_: Any) -> Any:
            raise NotImplementedError(name)
        return never_called


class _CapturingServer:
    """Stands in for a grpc server in an `add_<Service>Servicer_to_server` call."""

    def __init__(self) -> None:
        self.generic_handlers: list[Any] = []
        self.registered: dict[str, Any] = {}  # full method path -> RpcMethodHandler

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        self.generic_handlers.extend(handlers)

    def add_registered_method_handlers(self, service_name: str,
                                       method_handlers: dict[str, Any]) -> None:
        for method, handler in method_handlers.items():
            self.registered[f"/{service_name}/{method}"] = handler


class GrpcMethods:
    """The methods of the services that `servicer_functions` add, looked up by full path."""

    def __init__(self, servicer_functions: Sequence[str]) -> None:
        self._server = _CapturingServer()
        for path in servicer_functions:
            try:
                _servicer_function(path)(_Placeholder(), self._server)
            except ValueError:
                raise
            except Exception as exc:
                raise ValueError(f"grpc_servicer_functions entry {path!r} failed when called "
                                 f"with a servicer and a server: {exc!r}") from exc
        self._methods: dict[str, GrpcMethod] = {}

    def method(self, path: str) -> GrpcMethod:
        """The method at `path`; a ProtocolError NoSuchMethod (404) if no service has it."""
        found = self._methods.get(path)
        if found is None:
            found = self._methods[path] = self._find(path)
        return found

    def _find(self, path: str) -> GrpcMethod:
        handler = self._server.registered.get(path)
        details = _CallDetails(path, ())
        for generic in self._server.generic_handlers:
            if handler is not None:
                break
            handler = generic.service(details)
        if handler is None:
            raise ProtocolError(f"no gRPC service of grpc_servicer_functions has the method "
                                f"{path!r}", status=404, error="NoSuchMethod")
        if handler.request_streaming:
            raise ProtocolError(f"{path!r} is a client-streaming method; only unary and "
                                "server-streaming methods are served", status=404,
                                error="NoSuchMethod")
        return GrpcMethod(path, handler.request_deserializer or _identity,
                          handler.response_serializer or _identity,
                          bool(handler.response_streaming))


def _servicer_function(path: str) -> Callable[[Any, Any], None]:
    """Import `module.add_XServicer_to_server`; a ValueError that says what is wrong."""
    if not isinstance(path, str) or "." not in path.strip("."):
        raise ValueError(f"grpc_servicer_functions entries are 'module.function' import "
                         f"paths, got {path!r}")
    module_name, _, attribute = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} of grpc_servicer_functions entry "
                         f"{path!r}: {exc}") from exc
    function = getattr(module, attribute, None)
    if function is None:
        raise ValueError(f"module {module_name!r} has no {attribute!r} (grpc_servicer_functions "
                         f"entry {path!r})")
    if not callable(function):  # one error type for every bad entry: callers catch ValueError
        raise ValueError(  # noqa: TRY004
            f"grpc_servicer_functions entry {path!r} is not callable")
    return function  # type: ignore[no-any-return]


def _identity(value: Any) -> Any:
    """A handler without a (de)serializer passes bytes through, as grpc does."""
    return value
