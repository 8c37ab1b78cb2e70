"""Message priorities (docs/protocol.md, "Priorities"): the AMQP `priority` a request is
published with, and the queue argument that makes RabbitMQ deliver by it.

Every classic request queue has priorities 0 to MAX_PRIORITY; a message without one has 0. A
caller's explicit priority wins; else a deployment with `order_by_deadline` ranks a request by
its deadline (`deadlines.priority`, 1 to 5); else it has 0, so that a deadline alone never
reorders a queue. Quorum queues (RabbitMQ 3.10) have no priorities.
"""

from __future__ import annotations

from typing import Any

from . import deadlines

MAX_PRIORITY = 9

# The HTTP request header that gives a request's priority, named after the handle option.
HTTP_PRIORITY = b"x-serve-priority"
_HEADER_VALUES = {str(n).encode(): n for n in range(MAX_PRIORITY + 1)}


def checked(value: Any) -> int:
    """`value` if it is a priority, else a ValueError that says what is wrong."""
    if value.__class__ is not int or not 0 <= value <= MAX_PRIORITY:
        raise ValueError(f"priority must be an integer from 0 to {MAX_PRIORITY}, got {value!r}")
    return int(value)


def of_http_header(value: bytes) -> int:
    """The priority an `X-Serve-Priority` header gives, or a ValueError."""
    priority = _HEADER_VALUES.get(value)
    if priority is not None:
        return priority
    raise ValueError(f"X-Serve-Priority must be an integer from 0 to {MAX_PRIORITY}, "
                     f"got {value.decode('latin-1')!r}")


def of_request(explicit: int | None, ordered: bool, remaining_ms: int | None) -> int:
    """A request's priority: `explicit` if given, else its deadline's (`remaining_ms` away)
    where its deployment has `order_by_deadline`, else 0."""
    if explicit is not None:
        return explicit
    if ordered and remaining_ms is not None:
        return deadlines.priority(remaining_ms)
    return 0


def queue_arguments(*, quorum: bool) -> dict[str, Any]:
    """What a request queue's arguments have for priorities: nothing on a quorum queue."""
    return {} if quorum else {"x-max-priority": MAX_PRIORITY}
