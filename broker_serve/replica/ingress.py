"""`serve.ingress`: a deployment class that serves an ASGI app, in Ray 2.x's three forms.

- `@serve.ingress(app)` on a class: FastAPI routes written as methods of the class get `self`
  injected as a dependency resolving to the replica's live instance, so one FastAPI app can be
  declared at import time and served by whichever process instantiates the class.
- `@serve.ingress(builder)`: a function that takes no arguments and returns the app. It is
  called in each replica after the constructor, so the app and what it holds are made where
  they run.
- `serve.ingress(app_or_builder)()`, with no class: a class of its own (`ASGIIngressDeployment`),
  whose constructor keeps whatever it is bound with, for `serve.deployment(...)`.

An app is frozen when it is decorated (`freeze.py`): routes, middleware and handlers added
later are not served, as in Ray.
"""

from __future__ import annotations

import copyreg
import dataclasses
import functools
import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, TypeVar, cast, overload

from starlette.datastructures import State
from starlette.types import ASGIApp

from ..client.application import INGRESS_ATTRIBUTE
from .freeze import freeze

if TYPE_CHECKING:
    from fastapi import FastAPI
    from fastapi.routing import APIRoute, APIWebSocketRoute

__all__ = ["asgi_app_of", "get_servable", "ingress", "serving_app", "set_servable"]

_C = TypeVar("_C", bound=type)

# On a route rebuilt for a class: which class. One FastAPI app may serve several classes.
_VIEW_ATTRIBUTE = "_bs_view_of"

# A replica process hosts exactly one deployment instance.
_servable: object | None = None


@dataclasses.dataclass(frozen=True)
class _Ingress:
    """What `ingress` leaves on the class: the frozen app, or the builder that makes one."""

    app: ASGIApp | None
    builder: Callable[[], ASGIApp] | None
    # `module:qualname` of the decorated class; its routes carry it (see `_VIEW_ATTRIBUTE`).
    view: str


class IngressDecorator(Protocol):
    @overload
    def __call__(self, cls: None = None) -> type: ...

    @overload
    def __call__(self, cls: _C) -> _C: ...


def ingress(app: ASGIApp | Callable[[], ASGIApp]) -> IngressDecorator:
    """Make the decorated class serve `app`: a FastAPI, Starlette or any ASGI app, or a
    function of no arguments that returns one (a builder, called in each replica)."""
    if not callable(app):
        raise TypeError(f"serve.ingress expects an ASGI app or a function returning one, got "
                        f"{type(app).__qualname__}")
    builder = _is_builder(app)
    _register_reducers()
    module = _caller_module()

    def decorator(cls: Any = None) -> Any:
        if cls is None:
            cls = _class_of_its_own(module)
        if not isinstance(cls, type):
            raise TypeError("serve.ingress decorates a class")
        if "__call__" in _own_and_inherited(cls):
            # Its requests go to the app; a __call__ would never run (Ray refuses it too).
            raise ValueError("Classes passed to @serve.ingress may not have __call__ method.")
        view = _view_key(cls)
        if builder:
            record = _Ingress(app=None, builder=cast("Callable[[], ASGIApp]", app), view=view)
        else:
            record = _Ingress(app=_frozen(cast("ASGIApp", app), view), builder=None, view=view)
        setattr(cls, INGRESS_ATTRIBUTE, record)
        return cls

    return decorator


def _is_builder(app: Callable[..., Any]) -> bool:
    """A plain function callable without arguments builds the app; one taking (scope,
    receive, send) is the app."""
    if not inspect.isfunction(app):
        return False
    try:
        inspect.signature(app).bind()
    except TypeError:
        return False
    if inspect.iscoroutinefunction(app) or inspect.isasyncgenfunction(app):
        raise TypeError(f"serve.ingress builder {app.__qualname__} must be a plain function "
                        "returning the app, not an async one")
    return True


def _caller_module() -> str:
    """The module that called `serve.ingress`: a class of its own is that module's, so that
    `serve.run` ships that module's code with it (build.py pickles the user's modules by value)."""
    frame = inspect.currentframe()
    caller = frame.f_back.f_back if frame and frame.f_back else None
    name = caller.f_globals.get("__name__") if caller else None
    return name if isinstance(name, str) else __name__


def _class_of_its_own(module: str) -> type:
    class ASGIIngressDeployment:
        """Serves the app alone. It keeps its constructor's arguments (handles to the
        deployments it was bound with, say), as Ray's does."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.args = args
            self.kwargs = kwargs

    ASGIIngressDeployment.__module__ = module
    return ASGIIngressDeployment


def _frozen(app: ASGIApp, view: str) -> ASGIApp:
    """The copy of `app` a class of `view` serves: its method routes bound to the instance,
    other classes' left out (as Ray 1.x programs decorate one app on several deployments)."""
    if inspect.isfunction(app):  # a plain ASGI function has no state to freeze (nor does Ray)
        return app
    if not _is_fastapi(app):
        return freeze(app)
    _bind_class_routes(app, view)
    frozen = freeze(app)
    _keep_own_view(frozen, view)
    return frozen


def serving_app(cls: type) -> ASGIApp | None:
    """In a replica of `cls`, after its constructor: the app it serves, if it is an ingress.
    A builder is called now, once per replica."""
    record: _Ingress | None = getattr(cls, INGRESS_ATTRIBUTE, None)
    if record is None:
        return None
    if record.builder is None:
        return record.app
    app = record.builder()
    if not callable(app):
        raise TypeError(f"the serve.ingress builder {record.builder.__qualname__} returned "
                        f"{type(app).__qualname__}, not an ASGI app")
    if _is_fastapi(app):
        # Normally a builder's app has no methods of the class; one it shares with the class
        # body (a module-level app it returns) gets `self` bound as a decorated app does.
        _bind_class_routes(app, record.view)
        _keep_own_view(app, record.view)
    return app


def _own_and_inherited(cls: type) -> set[str]:
    """The attribute names `cls` and its bases define, `object`'s left out."""
    return {name for klass in cls.__mro__ if klass is not object for name in vars(klass)}


def asgi_app_of(cls_or_instance: object) -> ASGIApp | None:
    """The frozen app `ingress` gave this class or instance, if any (None for a builder's)."""
    record: _Ingress | None = getattr(cls_or_instance, INGRESS_ATTRIBUTE, None)
    return record.app if record is not None else None


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


def _bind_class_routes(app: FastAPI, view: str) -> None:
    """Rebuild, in place, the routes whose endpoint is a method of the class `view` names."""
    from fastapi.routing import APIRoute, APIWebSocketRoute

    routes = app.router.routes
    for index, route in enumerate(routes):
        if (
            isinstance(route, (APIRoute, APIWebSocketRoute))
            and _is_method_of(route.endpoint, view)
            and _bind_self(route.endpoint)
        ):
            # FastAPI reads the endpoint's signature once, when the route is built.
            routes[index] = _rebuilt(route, app)
            setattr(routes[index], _VIEW_ATTRIBUTE, view)
    app.openapi_schema = None


def _keep_own_view(app: FastAPI, view: str) -> None:
    """Remove the routes bound to other classes that decorate the same app, so a path both
    define reaches this class's method, not the first one registered."""
    app.router.routes[:] = [route for route in app.router.routes
                            if getattr(route, _VIEW_ATTRIBUTE, view) == view]
    app.openapi_schema = None


def _view_key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _is_method_of(endpoint: Callable[..., Any], view: str) -> bool:
    # By qualname, not by class attribute: two methods may share a name (the
    # second `def root` shadows the first in the class, not in the app).
    return inspect.isfunction(endpoint) and view == (
        f"{endpoint.__module__}:{endpoint.__qualname__.rpartition('.')[0]}")


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
# modules travels by value, with its frozen app; freezing is a pickle round trip too. Two pieces
# of Starlette and FastAPI apps do not survive that as they are. The reducers below mend them
# through public interfaces only; copyreg is process-wide, so they are registered when an
# ingress is declared, not at import. tests/test_dependency_contracts.py pins both.


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


def _reduce_dataclass_route(route: Any) -> tuple[Callable[..., Any], tuple[type, dict[str, Any]]]:
    # Rebuilt from the fields its constructor requires: the others (the lock, and the caches
    # it guards) start again empty and fill themselves on first use. The fields are arguments,
    # not bound into the callable, so that freezing copies them.
    required = {field.name: getattr(route, field.name) for field in dataclasses.fields(route)
                if field.init and field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING}
    return _dataclass_from_fields, (type(route), required)


def _dataclass_from_fields(kind: type, fields: dict[str, Any]) -> Any:
    return kind(**fields)
