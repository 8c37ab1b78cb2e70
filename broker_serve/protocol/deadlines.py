"""Request deadlines: from a caller's SLO to the message's `bs-deadline`, `expiration` and,
for a deployment with `order_by_deadline`, `priority` (docs/architecture.md, "Deadlines and
ordering"; protocol/priorities.py says when a deadline's priority is used).

A deadline is a Unix time in milliseconds, as Ray Serve 0.8's `absolute_slo_ms` was; a
`relative_slo_ms` is counted from when the request is made. Every caller (proxy, handles)
shares these rules.
"""

from __future__ import annotations

import math
import time
from typing import Any

# The HTTP request headers that give a request's deadline, named after the handle options.
HTTP_RELATIVE_SLO = b"x-serve-relative-slo-ms"
HTTP_ABSOLUTE_SLO = b"x-serve-absolute-slo-ms"

# The priorities a deadline gives, 1 to PRIORITY_LEVELS, under a deployment's
# `order_by_deadline`: the nearer a request's deadline is when it is published, the higher.
# Bounds of the remaining time, nearest first, for 5 to 2; any later deadline is 1.
PRIORITY_LEVELS = 5
_PRIORITY_BOUNDS_MS = (100, 500, 2_000, 10_000)

# RabbitMQ dead-letters an expired request to `bs.<cluster>.dead`, which cannot tell expiry
# from a rejection. Its caller stops waiting at the deadline and a live replica skips it at
# pickup without dead-lettering it, so the AMQP expiration comes this much later: only a
# request nobody consumed for so long past its deadline ends among the dead letters.
EXPIRY_GRACE_MS = 60_000


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def checked_slo(name: str, value: Any) -> float | None:
    """`value` as milliseconds (None: no SLO), or a ValueError that says what is wrong."""
    if value is None:
        return None
    try:
        slo = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of milliseconds, got {value!r}") from None
    if not math.isfinite(slo) or slo < 0:
        raise ValueError(f"{name} must be a finite number of milliseconds >= 0, got {value!r}")
    return slo


def from_slo(relative_slo_ms: float | None, absolute_slo_ms: float | None,
             made_ms: int) -> int | None:
    """The deadline of a request made at `made_ms` (None: none)."""
    if absolute_slo_ms is not None:
        return int(absolute_slo_ms)
    if relative_slo_ms is not None:
        return made_ms + int(relative_slo_ms)
    return None


def earlier(first: int | None, second: int | None) -> int | None:
    """The earlier of two deadlines, either of which may be missing."""
    if first is None:
        return second
    if second is None:
        return first
    return min(first, second)


def of_http_request(relative: bytes | None, absolute: bytes | None, timeout_s: float | None,
                    arrived_ms: int) -> int | None:
    """An HTTP request's deadline: the earlier of the proxy's request_timeout_s and the SLO
    headers' (their values, if sent); a ValueError if the headers are bad."""
    timeout = None if timeout_s is None else arrived_ms + int(timeout_s * 1000)
    if relative is None and absolute is None:
        return timeout
    if relative is not None and absolute is not None:
        raise ValueError("give X-Serve-Relative-Slo-Ms or X-Serve-Absolute-Slo-Ms, not both")
    own = from_slo(checked_slo("X-Serve-Relative-Slo-Ms", _text(relative)),
                   checked_slo("X-Serve-Absolute-Slo-Ms", _text(absolute)), arrived_ms)
    return earlier(own, timeout)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def priority(remaining_ms: int) -> int:
    """The AMQP priority of a request whose deadline is `remaining_ms` away."""
    level = PRIORITY_LEVELS
    for bound in _PRIORITY_BOUNDS_MS:
        if remaining_ms <= bound:
            return level
        level -= 1
    return level


def expiration(remaining_ms: int) -> str:
    """The AMQP `expiration` of a request whose deadline is `remaining_ms` away."""
    return str(max(remaining_ms, 0) + EXPIRY_GRACE_MS)
