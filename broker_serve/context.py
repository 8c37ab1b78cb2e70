"""What code running inside a replica can learn about where it runs."""

from __future__ import annotations

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


def _set_replica_context(context: ReplicaContext | None) -> None:
    global _current
    _current = context


def get_replica_context() -> ReplicaContext:
    """The running replica's context; raises outside a replica, as Ray Serve does."""
    if _current is None:
        raise BrokerServeError("`serve.get_replica_context()` may only be called from a replica.")
    return _current


def _in_replica() -> bool:
    return _current is not None
