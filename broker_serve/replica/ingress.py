"""`serve.ingress`: a deployment class that serves an ASGI app.

FastAPI routes written as methods of the decorated class get `self` injected as
a dependency resolving to the replica's live instance, so one FastAPI app can
be declared at import time and served by whichever process instantiates the
class.
"""

from __future__ import annotations

import copyreg
import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

from starlette.datastructures import State
from starlette.types import ASGIApp

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.routing import APIRoute, APIWebSocketRoute

__all__ = ["asgi_app_of", "get_servable", "ingress", "set_servable"]

_C = TypeVar("_C", bound=type)

_APP_ATTRIBUTE = "_bs_asgi_app"
# On a route rebuilt for a class: which class. One FastAPI app may serve several classes.
_VIEW_ATTRIBUTE = "_bs_view_of"

# A replica process hosts exactly one deployment instance.
_servable: object | None = None


def ingress(app: ASGIApp) -> Callable[[_C], _C]:
    """Make the decorated class serve `app` (FastAPI, Starlette or any ASGI callable)."""
    if not callable(app):
        raise TypeError(f"serve.ingress expects an ASGI app, got {type(app).__qualname__}")

    def decorator(cls: _C) -> _C:
        if not isinstance(cls, type):
            raise TypeError("serve.ingress decorates a class")
        if "__call__" in _own_and_inherited(cls):
            # Its requests go to the app; a __call__ would never run (Ray refuses it too).
            raise ValueError("Class passed to @serve.ingress may not have __call__ method.")
        if _is_fastapi(app):
            _bind_class_routes(app, cls)
        _register_reducers()
        # staticmethod: a plain-function ASGI app must not become a bound method
        # when read from an instance.
        setattr(cls, _APP_ATTRIBUTE, staticmethod(app))
        return cls

    return decorator


def _own_and_inherited(cls: type) -> set[str]:
    """The attribute names `cls` and its bases define, `object`'s left out."""
    return {name for klass in cls.__mro__ if klass is not object for name in vars(klass)}


def asgi_app_of(cls_or_instance: object) -> ASGIApp | None:
    """The app given to `ingress` for this class or instance, if any."""
    app: ASGIApp | None = getattr(cls_or_instance, _APP_ATTRIBUTE, None)
    return app


def set_servable(instance: object) -> None:
    """Make `instance` the `self` of class-based routes; None clears it."""
    global _servable
    _servable = instance


def get_servable() -> object:
    """The instance set by `set_servable`."""
    if _servable is None:
        raise RuntimeError(
            "No servable instance in this process: set_servable() must be called with "
            "the deployment instance before its ingress app handles requests"
        )
    return _servable


async def _servable_dependency() -> object:
    # async so that FastAPI resolves it on the event loop, not in a worker thread.
    return get_servable()


def _is_fastapi(app: object) -> TypeGuard[FastAPI]:
    # A FastAPI app implies fastapi is loaded: FastAPI stays an optional dependency.
    fastapi = sys.modules.get("fastapi")
    return fastapi is not None and isinstance(app, fastapi.FastAPI)


def _bind_class_routes(app: FastAPI, cls: type) -> None:
    """Rebuild, in place, the routes whose endpoint is a method of `cls`."""
    from fastapi.routing import APIRoute, APIWebSocketRoute

    routes = app.router.routes
    for index, route in enumerate(routes):
        if (
            isinstance(route, (APIRoute, APIWebSocketRoute))
            and _is_method_of(route.endpoint, cls)
            and _bind_self(route.endpoint)
        ):
            # FastAPI reads the endpoint's signature once, when the route is built.
            routes[index] = _rebuilt(route, app)
            setattr(routes[index], _VIEW_ATTRIBUTE, _view_key(cls))
    app.openapi_schema = None
    # Kept on the class: cloudpickle does not keep the __qualname__ of a class defined in a
    # function, so the replica could not recompute the key.
    setattr(cls, _VIEW_ATTRIBUTE, _view_key(cls))


def drop_other_views(app: ASGIApp, cls: type) -> None:
    """In a replica of `cls`: remove the routes of other classes that decorate the same app
    (as Ray 1.x programs do with `@serve.ingress(app)` on two deployments), so a path both
    define reaches this class's method, not the first one registered."""
    if not _is_fastapi(app):
        return
    mine = getattr(cls, _VIEW_ATTRIBUTE, None)
    if mine is None:
        return
    app.router.routes[:] = [route for route in app.router.routes
                            if getattr(route, _VIEW_ATTRIBUTE, mine) == mine]
    app.openapi_schema = None


def _view_key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _is_method_of(endpoint: Callable[..., Any], cls: type) -> bool:
    # By qualname, not by class attribute: two methods may share a name (the
    # second `def root` shadows the first in the class, not in the app).
    return (
        inspect.isfunction(endpoint)
        and endpoint.__module__ == cls.__module__
        and endpoint.__qualname__.rpartition(".")[0] == cls.__qualname__
    )


def _bind_self(endpoint: Callable[..., Any]) -> bool:
    """Declare the first parameter a dependency on the servable; False if there is none.

    The other parameters become keyword-only, since they may lack defaults.
    Idempotent, as one function can be the endpoint of several routes.
    """
    from fastapi import Depends, params

    signature = inspect.signature(endpoint)
    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
        return False
    first, rest = parameters[0], parameters[1:]
    if isinstance(first.default, params.Depends):
        return first.default.dependency is _servable_dependency
    # Any annotation goes: FastAPI has no type to resolve or validate for `self`.
    bound_self = first.replace(default=Depends(_servable_dependency), annotation=first.empty)
    endpoint.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[bound_self, *map(_keyword_only, rest)]
    )
    return True


def _keyword_only(parameter: inspect.Parameter) -> inspect.Parameter:
    if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
        return parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY)
    return parameter


def _rebuilt(route: APIRoute | APIWebSocketRoute, app: FastAPI) -> APIRoute | APIWebSocketRoute:
    """A new route like `route`, built from its endpoint's current signature.

    Arguments are read back from the route's attributes of the same names, which
    FastAPI keeps already merged with the router's settings (prefix, tags...).
    """
    accepted = inspect.signature(type(route)).parameters
    kwargs: dict[str, Any] = {
        name: getattr(route, name)
        for name, parameter in accepted.items()
        if name not in ("path", "endpoint")
        and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        and hasattr(route, name)
    }
    if "dependency_overrides_provider" in accepted:
        # A websocket route does not keep it; without it app.dependency_overrides is ignored.
        kwargs.setdefault("dependency_overrides_provider", app.router.dependency_overrides_provider)
    if getattr(route, "stream_item_type", None) is not None:
        # FastAPI infers a streaming endpoint's item type only from a default response_model.
        del kwargs["response_model"]
    return type(route)(route.path, route.endpoint, **kwargs)


# Replicas receive the class, and so its app, through cloudpickle: a class of the driver's own
# modules travels by value, with its `_bs_asgi_app`. Two pieces of Starlette and FastAPI apps do
# not survive that as they are. The reducers below mend them through public interfaces only;
# copyreg is process-wide, so they are registered when an ingress is declared, not at import.
# tests/test_dependency_contracts.py pins both.


def _register_reducers() -> None:
    copyreg.pickle(State, _reduce_state)
    if "fastapi" in sys.modules:
        included = _lazily_included_router_type()
        if included is not None:
            copyreg.pickle(included, _reduce_dataclass_route)


def _reduce_state(state: State) -> tuple[type[State], tuple[dict[str, Any]]]:
    # As it is, unpickling looks up __setstate__ on a State without its dict, and State's
    # __getattr__ recurses forever. Rebuilt from its items instead.
    return State, ({key: state[key] for key in state},)


@functools.cache  # one probe a process
def _lazily_included_router_type() -> type | None:
    """The route type `include_router` adds instead of copies of the router's routes, if it
    is a dataclass (recent FastAPI includes routers lazily, through a route holding a lock)."""
    from fastapi import APIRouter, FastAPI
    from fastapi.routing import APIRoute

    async def endpoint() -> None:
        pass

    probe, router = FastAPI(), APIRouter()
    before = {id(route) for route in probe.router.routes}
    router.add_api_route("/probe", endpoint)
    probe.include_router(router)
    added = {type(route) for route in probe.router.routes if id(route) not in before}
    lazy = [kind for kind in added - {APIRoute} if dataclasses.is_dataclass(kind)]
    return lazy[0] if len(lazy) == 1 else None


def _reduce_dataclass_route(route: Any) -> tuple[Callable[..., Any], tuple[()]]:
    # Rebuilt from the fields its constructor requires: the others (the lock, and the caches
    # it guards) start again empty and fill themselves on first use.
    required = {field.name: getattr(route, field.name) for field in dataclasses.fields(route)
                if field.init and field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING}
    kind: type = type(route)
    return functools.partial(kind, **required), ()
