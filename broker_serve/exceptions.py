"""Errors raised by broker-serve.

    BrokerServeError
     ├── RayServeException          an error in a deployment, re-raised in the caller
     │    ├── BackPressureError     the deployment's queue is at its max_queued_requests
     │    └── RequestCancelledError the request was cancelled before it finished
     ├── ProtocolError              a message broke docs/protocol.md
     │    ├── UntrustedPayload      a signed payload whose signature does not verify
     │    └── UndecodableValue      a typed value that does not decode to what it claims
     ├── ClusterUnavailable         RabbitMQ or Redis cannot be reached
     ├── TransportError             RabbitMQ refused an operation (it closed the channel)
     │    └── PreconditionFailed    ... on a precondition, e.g. a queue's other arguments
     ├── StateError                 Redis refused or failed a read or write of the state
     └── DeployFailed               serve.run could not bring an application up (a RuntimeError)
          └── BuildFailed           an application could not be built from its config

The names of Ray Serve's `ray.serve.exceptions` are kept, so `except` clauses port unchanged.
Errors from aio-pika and aiormq are translated in `transport/errors.py`, those from redis in
`state/`, each with one table, raising ours ``from`` theirs.
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


class BackPressureError(RayServeException):
    """The deployment's queue holds its max_queued_requests already, so the call was refused.

    Retry later. Its `error_type` stays "QueueFull", what it was before it had its own class.
    """

    def __init__(self, message: str, *, deployment: str = "", error_type: str = "QueueFull"
                 ) -> None:
        super().__init__(message, deployment=deployment, error_type=error_type)


class RequestCancelledError(RayServeException):
    """The request was cancelled (`response.cancel()`, a timeout or a client that left)
    before it finished."""

    def __init__(self, message: str, *, deployment: str = "", error_type: str = "Cancelled"
                 ) -> None:
        super().__init__(message, deployment=deployment, error_type=error_type)


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


class StateError(BrokerServeError):
    """Redis answered, but refused or failed a read or write of the cluster's state."""


class TransportError(BrokerServeError):
    """RabbitMQ refused an operation and closed its channel: a queue or exchange that is
    missing, or declared already with other arguments."""


class PreconditionFailed(TransportError):
    """RabbitMQ refused a command on a precondition (406), e.g. a declare whose arguments
    differ from the existing queue's."""


class DeployFailed(BrokerServeError, RuntimeError):
    """serve.run could not bring an application up. A RuntimeError too, as Ray's failures
    of serve.run are, so `except RuntimeError` ports unchanged."""


class BuildFailed(DeployFailed):
    """An application could not be built from its config: its import path, its builder or
    the config's options for its deployments."""
