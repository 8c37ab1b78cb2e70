"""Calling a user object's `__del__` when its service ends, once, as Ray does.

Ray calls a deployment instance's `__del__` (plain or `async def`) when its replica stops
gracefully, and an evicted multiplexed model's `__del__` on eviction. The interpreter calls
`__del__` too, when it frees the object: for a model, as soon as the cache lets go of it; for
the deployment instance, as the process exits. A plain `__del__` would then run twice, and an
`async def __del__` would leave a coroutine that is never awaited.

So before calling it, `call_del` wraps the class's `__del__` (once per class) in a guard that
skips the interpreter's call for an object already called here. Other objects of the class get
their `__del__` as before. The guard keys objects by id and holds no reference to them, so an
evicted model is still freed; the interpreter finalises an object once, before its memory (and
id) can be reused, and the guard forgets the id at that call. Nothing else changes at exit: the
process ends normally, its atexit handlers run and its logs are flushed.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

from .threads import ThreadRunner

log = logging.getLogger("broker_serve.replica.destructor")

# On a guarded class: the ids of its objects whose __del__ this module called.
_CALLED = "__broker_serve_del_called__"
# On a guard: the __del__ it wraps.
_WRAPPED = "__broker_serve_del_wrapped__"
# A plain __del__ runs in a daemon thread: one that hangs cannot keep a stopped replica alive.
_threads = ThreadRunner(4, "user-del")


async def call_del(obj: object) -> None:
    """Call `obj.__del__()` now, awaited if it is async, in a thread if not; the interpreter
    does not call it again. Its exception is logged, as the interpreter would."""
    cls = type(obj)
    method = getattr(cls, "__del__", None)
    if not callable(method):
        return
    while hasattr(method, _WRAPPED):  # an inherited guard: call what it guards
        method = getattr(method, _WRAPPED)
    bound = functools.partial(method, obj)
    _skip_the_interpreters_call(obj)
    try:
        if inspect.iscoroutinefunction(method):
            await bound()
        else:
            result = await _threads.run(bound)
            if inspect.isawaitable(result):
                await result
    except Exception:  # user code at the end of its service: logged, as the interpreter does
        log.exception("__del__ of %s raised", cls.__qualname__)


def _skip_the_interpreters_call(obj: object) -> None:
    cls = type(obj)
    called: set[int] | None = cls.__dict__.get(_CALLED)
    if called is None:
        called = set()
        try:
            cls.__del__ = _guard(cls.__del__, called)  # type: ignore[attr-defined]
            setattr(cls, _CALLED, called)
        except (TypeError, AttributeError) as exc:  # a class that cannot be changed
            log.warning("the interpreter may call __del__ of %s again: %s",
                        cls.__qualname__, exc)
            return
    called.add(id(obj))


def _guard(original: Callable[[Any], Any], called: set[int]) -> Callable[[Any], Any]:
    @functools.wraps(original)
    def __del__(self: Any) -> Any:
        key = id(self)
        if key in called:
            called.discard(key)
            return None
        return original(self)

    setattr(__del__, _WRAPPED, original)
    return __del__
