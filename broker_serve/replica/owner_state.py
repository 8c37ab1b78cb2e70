"""State that a decorator keeps per instance (or per plain function), for `@serve.batch` and
`@serve.multiplexed`.

The state is made on first use, in the process that calls the method: the replica, never the
driver that pickled the class.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, Generic, TypeVar

State = TypeVar("State")

_ATTRIBUTE = "_bs_owner_state"


class OwnerState(Generic[State]):
    def __init__(self, decorator: str, func: Callable[..., Any],
                 make: Callable[[Callable[..., Any]], State], *,
                 generators: bool = False) -> None:
        if not (inspect.iscoroutinefunction(func)
                or (generators and inspect.isasyncgenfunction(func))):
            raise TypeError(f"@serve.{decorator} needs an async function, got {func!r}")
        self.func = func
        self.make = make
        self.takes_self = next(iter(inspect.signature(func).parameters), None) == "self"

    def split(self, wrapper: Any, args: tuple[Any, ...]) -> tuple[State, tuple[Any, ...]]:
        """The caller's state, and the call's arguments without `self`."""
        owner, rest = (args[0], args[1:]) if self.takes_self else (wrapper, args)
        states = owner.__dict__.setdefault(_ATTRIBUTE, {})
        if self.func not in states:
            bound = functools.partial(self.func, owner) if self.takes_self else self.func
            states[self.func] = self.make(bound)
        state: State = states[self.func]
        return state, rest
