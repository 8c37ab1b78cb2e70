"""What code running inside a replica can learn about where it runs (Ray's `serve.context`).

`serve.context.web` is Ray Serve 0.8's flag: True while a replica handles a request that came
over HTTP, False for a handle call (and outside a replica).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

from .exceptions import BrokerServeError


@dataclass(frozen=True)
class ReplicaContext:
    app_name: str
    deployment: str
    replica_id: str
    servable_object: Any

    @property
    def replica_tag(self) -> str:
        """The Ray Serve 1.x name of `replica_id`."""
        return self.replica_id


_current: ReplicaContext | None = None
# In local testing mode several deployments share the process: each request's task (and its
# sync method's thread) carries the context of the replica running it.
_local: contextvars.ContextVar[ReplicaContext | None] = contextvars.ContextVar(
    "broker_serve_local_replica_context", default=None)

# The id of the client request being handled (its X-Request-Id, or the first caller's
# correlation id), set by the replica per request; handle calls made while handling it carry
# it on (header bs-request-id), so every log line of one request shares the id.
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar(
    "broker_serve_request_id", default="")


# Set by the replica per request (replica/execution.py): its HTTP path sets True, its call path
# False. Read as `serve.context.web` through the module's `__getattr__` below.
_web: contextvars.ContextVar[bool] = contextvars.ContextVar("broker_serve_web", default=False)


def __getattr__(name: str) -> Any:
    if name == "web":
        return _web.get()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _set_replica_context(context: ReplicaContext | None) -> None:
    global _current
    _current = context


def get_replica_context() -> ReplicaContext:
    """The running replica's context; raises outside a replica, as Ray Serve does."""
    context = _local.get() or _current
    if context is None:
        raise BrokerServeError("`serve.get_replica_context()` may only be called from a replica.")
    return context


def _in_replica() -> bool:
    return _current is not None or _local.get() is not None
