"""broker-serve: Ray Serve's programming model, served through RabbitMQ with Redis as control state.

    from broker_serve import serve
"""

from . import serve
from .exceptions import (
    BackPressureError,
    BrokerServeError,
    BuildFailed,
    ClusterSecretMissing,
    ClusterUnavailable,
    DeployFailed,
    LocalTestingModeError,
    PreconditionFailed,
    ProtocolError,
    RayServeException,
    RequestCancelledError,
    RequestTimeoutError,
    StateError,
    TransportError,
    UndecodableValue,
    UntrustedPayload,
)

__version__ = "0.1.0"

__all__ = [
    "BackPressureError",
    "BrokerServeError",
    "BuildFailed",
    "ClusterSecretMissing",
    "ClusterUnavailable",
    "DeployFailed",
    "LocalTestingModeError",
    "PreconditionFailed",
    "ProtocolError",
    "RayServeException",
    "RequestCancelledError",
    "RequestTimeoutError",
    "StateError",
    "TransportError",
    "UndecodableValue",
    "UntrustedPayload",
    "__version__",
    "serve",
]
