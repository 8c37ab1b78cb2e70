"""aio-pika's and aiormq's errors, translated to broker-serve's at one boundary.

The transport calls into aio-pika and aiormq only here in `transport/`, and what those raise
leaves it as one of our exceptions, chosen by `AMQP_ERRORS` (the way httpx maps httpcore's
errors). Setup and control calls wrap themselves in `map_amqp_errors()`; the publish hot path
catches `AMQP_ERROR_TYPES` in a plain `except` (free when nothing fails) and raises
`translate(exc, ...)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import aiormq

from ..exceptions import (
    BrokerServeError,
    ClusterUnavailable,
    PreconditionFailed,
    TransportError,
)

# The first row whose type matches wins.
AMQP_ERRORS: tuple[tuple[type[Exception], type[BrokerServeError]], ...] = (
    (aiormq.exceptions.ChannelPreconditionFailed, PreconditionFailed),
    # The broker closed a channel on purpose (404 NOT_FOUND, 403 ACCESS_REFUSED, ...).
    (aiormq.exceptions.ChannelClosed, TransportError),
    # Any other AMQP error: the connection or its channel is gone or broken.
    (aiormq.exceptions.AMQPError, ClusterUnavailable),
    # Sockets and timeouts (aiormq's connection errors are ConnectionErrors too).
    (OSError, ClusterUnavailable),
    # aiormq's ChannelInvalidStateError, and aio-pika's "channel closed": a channel in use
    # when its connection went away.
    (RuntimeError, ClusterUnavailable),
)
AMQP_ERROR_TYPES = tuple(theirs for theirs, _ in AMQP_ERRORS)


def translate(exc: Exception, what: str) -> BrokerServeError:
    """Our exception for aio-pika's or aiormq's `exc`, saying `what` failed."""
    for theirs, ours in AMQP_ERRORS:
        if isinstance(exc, theirs):
            return ours(f"{what}: {exc}")
    raise TypeError(f"{type(exc).__name__} is not an AMQP error") from exc


@contextlib.contextmanager
def map_amqp_errors(what: str) -> Iterator[None]:
    """Raise our exception, from theirs, for an AMQP error inside the block."""
    try:
        yield
    except AMQP_ERROR_TYPES as exc:
        raise translate(exc, what) from exc
