"""Errors raised by broker-serve.

    BrokerServeError
     ├── RayServeException          an error in a deployment, re-raised in the caller
     │    ├── RayServeException(E)  ... and an E too, E being the class the deployment raised
     │    ├── BackPressureError     the deployment's queue is at its max_queued_requests
     │    ├── RequestCancelledError the request was cancelled before it finished
     │    └── RequestTimeoutError   its deadline (SLO) passed first (a TimeoutError too)
     ├── ProtocolError              a message broke docs/protocol.md
     │    ├── UntrustedPayload      a signed payload whose signature does not verify
     │    └── UndecodableValue      a typed value that does not decode to what it claims
     ├── ClusterUnavailable         RabbitMQ or Redis cannot be reached
     ├── ClusterSecretMissing       this process has no cluster secret (or cannot read it)
     ├── TransportError             RabbitMQ refused an operation (it closed the channel)
     │    └── PreconditionFailed    ... on a precondition, e.g. a queue's other arguments
     ├── StateError                 Redis refused or failed a read or write of the state
     ├── LocalTestingModeError      what serve.run(_local_testing_mode=True) does not do
     └── DeployFailed               serve.run could not bring an application up (a RuntimeError)
          └── BuildFailed           an application could not be built from its config
               └── RuntimeEnvError  ... nor its runtime_env resolved or prepared

The names of Ray Serve's `ray.serve.exceptions` are kept, so `except` clauses port unchanged.
Errors from aio-pika and aiormq are translated in `transport/errors.py`, those from redis in
`state/`, each with one table, raising ours ``from`` theirs.
"""

from __future__ import annotations

from typing import Any


class BrokerServeError(Exception):
    """Base class of every error broker-serve raises."""


class RayServeException(BrokerServeError):
    """An exception raised inside a deployment, carried back to the caller.

    Named as in Ray Serve so that ``except RayServeException`` ports unchanged. `deployment`
    is the callee (`app/deployment`), `error_type` the name of the class raised there (kept
    from the first callee when an error passes through several), and `str()` says both.

    As Ray's `RayTaskError`, what a handle call raises is also an instance of the class the
    deployment raised: a class `RayServeException(ValueError)` deriving from both, so that
    ``except ValueError`` works, with the original's arguments and attributes. It is a plain
    RayServeException instead, of the same message and `error_type`, when the caller cannot
    rebuild the class:

    - the caller has not loaded it (a message never makes it import a module): found neither
      by name in a module it imported nor, for a class that travelled by value such as one from
      the driver's `__main__`, as the one loaded Exception subclass of that module and name;
    - its `__reduce__` (by default: its `args`) does not rebuild it, as in ``class E(Exception):
      def __init__(self, code, text): super().__init__(f"{code} {text}")``, or returns a
      callable other than the class itself;
    - its arguments or attributes cannot be pickled, or pack bigger than 64 KiB;
    - it cannot be subclassed (a C type that forbids it, an `__init_subclass__` that refuses,
      a metaclass conflict), or it is not an Exception, or it is a StopIteration or
      StopAsyncIteration, which would end the caller's iteration instead;
    - it is one of broker-serve's own (`BackPressureError`, `RequestCancelledError` and
      `RequestTimeoutError`, for a `DeadlineExceeded`, keep their classes), or the error did
      not come from a deployment's code (e.g. `NoSuchMethod`).

    `origin` is what the error event said of the class (`module`, `qualname`, `args`,
    docs/protocol.md); a replica passes it on when the error passes through it.
    """

    def __init__(self, message: str, *, deployment: str = "", error_type: str = "") -> None:
        super().__init__(message)
        self.deployment = deployment
        self.error_type = error_type
        self.origin: dict[str, Any] = {}


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


class RequestTimeoutError(RayServeException, TimeoutError):
    """The call's deadline (`relative_slo_ms` / `absolute_slo_ms`, or one inherited from the
    request that made it) passed before it finished; it was cancelled, so if it had not
    started it never runs. A TimeoutError too, as what Ray's `result(timeout_s=)` raises is.
    Its `error_type` is "DeadlineExceeded", the replica's name for a request it found late."""

    def __init__(self, message: str, *, deployment: str = "",
                 error_type: str = "DeadlineExceeded") -> None:
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


class ClusterSecretMissing(BrokerServeError):
    """This process has no cluster secret, so it cannot sign (a pickled handle argument, an
    application's definitions), or the secret it was given cannot be read or is too short.
    The operator gives it: `BROKER_SERVE_CLUSTER_SECRET_FILE` or `BROKER_SERVE_CLUSTER_SECRET`
    (docs/architecture.md, "Trust")."""


class StateError(BrokerServeError):
    """Redis answered, but refused or failed a read or write of the cluster's state."""


class TransportError(BrokerServeError):
    """RabbitMQ refused an operation and closed its channel: a queue or exchange that is
    missing, or declared already with other arguments."""


class PreconditionFailed(TransportError):
    """RabbitMQ refused a command on a precondition (406), e.g. a declare whose arguments
    differ from the existing queue's."""


class LocalTestingModeError(BrokerServeError, NotImplementedError):
    """Something an application run with `serve.run(app, _local_testing_mode=True)` cannot do
    in one process: HTTP ingress, runtime_env, several replicas, jobs, the cluster's state
    (docs/architecture.md, "Local testing mode")."""


class DeployFailed(BrokerServeError, RuntimeError):
    """serve.run could not bring an application up. A RuntimeError too, as Ray's failures
    of serve.run are, so `except RuntimeError` ports unchanged."""


class BuildFailed(DeployFailed):
    """An application could not be built from its config: its import path, its builder or
    the config's options for its deployments."""


class RuntimeEnvError(BuildFailed):
    """A runtime_env could not be resolved or prepared: a source that cannot be fetched or is
    not a safe zip, or requirements that pip could not install."""
