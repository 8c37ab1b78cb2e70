"""redis-py's errors, translated to broker-serve's in one place: every Store method raises
through `translated`, so callers catch `ClusterUnavailable` or `StateError`, never redis's."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

from redis import exceptions as redis_errors

from ..exceptions import BrokerServeError, ClusterUnavailable, StateError

# First match wins, so subclasses come before their bases.
_TRANSLATIONS: tuple[tuple[type[Exception], type[BrokerServeError], str], ...] = (
    # Includes AuthenticationError, BusyLoadingError (Redis still loading),
    # MaxConnectionsError and, under Sentinel, MasterNotFoundError (no primary while a
    # failover runs), which redis-py files under ConnectionError.
    (redis_errors.ConnectionError, ClusterUnavailable, "cannot reach Redis"),
    (redis_errors.TimeoutError, ClusterUnavailable, "cannot reach Redis"),
    # A primary demoted to a replica refuses writes until the client finds the new one (a
    # Sentinel client turns this into a ConnectionError itself; a plain URL's does not).
    (redis_errors.ReadOnlyError, ClusterUnavailable, "Redis is a read-only replica"),
    # A socket error redis-py lets through while connecting.
    (OSError, ClusterUnavailable, "cannot reach Redis"),
    (redis_errors.RedisError, StateError, "Redis failed"),
)
_CAUGHT = tuple(theirs for theirs, _, _ in _TRANSLATIONS)


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Raise ours `from` redis's."""
    try:
        yield
    except _CAUGHT as exc:
        for theirs, ours, what in _TRANSLATIONS:
            if isinstance(exc, theirs):
                raise ours(f"{what}: {exc}") from exc
        raise  # unreachable: _CAUGHT is the table's


_Class = TypeVar("_Class", bound=type)


def translate_errors(cls: _Class) -> _Class:
    """Class decorator: each public coroutine method of `cls` raises through `translated`."""
    for name, method in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(method):
            setattr(cls, name, _translating(method))
    return cls


def _translating(method: Callable[..., Coroutine[Any, Any, Any]]
                 ) -> Callable[..., Coroutine[Any, Any, Any]]:
    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        with translated():
            return await method(*args, **kwargs)

    return wrapper
