"""`RayServegRPCContext`: what a deployment's gRPC method knows of its call and sets on it.

A method that takes a `grpc_context` argument gets one, as in Ray. The client's metadata comes
from the request message; the code, details and trailing metadata the method sets go back on the
final reply event (docs/protocol.md, "`grpc` body"), and the proxy ends the call with them.
grpcio is only imported when a code is read back, so the class costs nothing without it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class RayServegRPCContext:
    """The gRPC context of one call, with the methods of `grpc.ServicerContext` that make sense
    in a replica (Ray's `ray.serve.grpc_util.RayServegRPCContext`)."""

    def __init__(self, invocation_metadata: Iterable[tuple[str, str]] = ()) -> None:
        self._invocation_metadata = tuple((str(k), str(v)) for k, v in invocation_metadata)
        self._code: Any = None  # a grpc.StatusCode once set
        self._details = ""
        self._trailing_metadata: list[tuple[str, str]] = []

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The client's metadata, as `(key, value)` pairs (less the keys routing used up:
        `application`, `multiplexed_model_id`, `request_id`)."""
        return self._invocation_metadata

    def set_code(self, code: Any) -> None:
        """The status the call ends with (a `grpc.StatusCode`); OK if never set."""
        value = getattr(code, "value", None)
        if not (isinstance(value, tuple) and value and isinstance(value[0], int)):
            raise TypeError(f"set_code takes a grpc.StatusCode, got {code!r}")
        self._code = code

    def code(self) -> Any:
        """The `grpc.StatusCode` set by `set_code`, or None."""
        return self._code

    def set_details(self, details: str) -> None:
        """The status details the client sees (`RpcError.details()`)."""
        if not isinstance(details, str):
            raise TypeError(f"set_details takes a str, got {type(details).__name__}")
        self._details = details

    def details(self) -> str:
        return self._details

    def set_trailing_metadata(self, trailing_metadata: Iterable[tuple[str, str]]) -> None:
        """Metadata sent when the call ends; the last call wins, as in grpc."""
        pairs = [(k, v) for k, v in trailing_metadata]
        for key, value in pairs:
            if not (isinstance(key, str) and isinstance(value, str)):
                raise TypeError(f"trailing metadata pairs are (str, str), got {(key, value)!r}")
        self._trailing_metadata = pairs

    def trailing_metadata(self) -> list[tuple[str, str]]:
        return list(self._trailing_metadata)

    def final_fields(self) -> dict[str, Any]:
        """What the final reply event carries of the status (docs/protocol.md)."""
        fields: dict[str, Any] = {}
        if self._code is not None:
            fields["code"] = self._code.value[0]
        if self._details:
            fields["details"] = self._details
        if self._trailing_metadata:
            fields["trailing_metadata"] = [[k, v] for k, v in self._trailing_metadata]
        return fields
