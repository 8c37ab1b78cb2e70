"""Running async tests in plain asyncio, as a user's program runs (no pytest plugin)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

# How long a test lets pass to see that something does *not* happen yet.
QUIET_S = 0.05


def in_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop, as `asyncio.run` would in a user's program."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), timeout=30))

    return run
