"""Errors raised by broker-serve.

    BrokerServeError
     ├── RayServeException        an error in a deployment, re-raised in the caller
     ├── ProtocolError             a message broke docs/protocol.md
     │    ├── UntrustedPayload     a signed payload whose signature does not verify
     │    └── UndecodableValue     a typed value that does not decode to what it claims
     ├── ClusterUnavailable        RabbitMQ or Redis cannot be reached
     └── DeployFailed              serve.run could not bring an application up

Errors from aio-pika and redis are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class BrokerServeError(Exception):
    """Base class of every error broker-serve raises."""


class RayServeException(BrokerServeError):
    """An exception raised inside a deployment, carried back to the caller.

    Named as in Ray Serve so that ``except RayServeException`` ports unchanged.
    """

    def __init__(self, message: str, *, deployment: str = "", error_type: str = "") -> None:
        super().__init__(message)
        self.deployment = deployment
        self.error_type = error_type


class ProtocolError(BrokerServeError):
    def __init__(self, message: str, *, status: int = 400, error: str = "MalformedMessage") -> None:
        super().__init__(message)
        self.status = status
        self.error = error


class UntrustedPayload(ProtocolError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=403, error="UntrustedPayload")


class UndecodableValue(ProtocolError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=400, error="UndecodableValue")


class ClusterUnavailable(BrokerServeError):
    pass


class DeployFailed(BrokerServeError):
    pass
