"""`@serve.deployment`, `Deployment` and `Application` (Ray's `ray.serve.deployment`).

The description of an app lives in `client/application.py`, which the client builds from.
`Deployment` here adds Ray 1.x's calls on a deployment, which reach the serve API above it,
and `get_deployment` / `list_deployments` give the deployments running, as Ray 1.x did.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar, cast, overload

from .client import application
from .client.api import delete, run
from .client.application import Application, merge_config
from .client.deployed import Deployed, ray1_deployment, ray1_deployments
from .client.handle import DeploymentHandle
from .config import DeploymentConfig

__all__ = ["Application", "Deployment", "deployment", "get_deployment", "list_deployments"]

T = TypeVar("T")


class Deployment(application.Deployment[T]):
    """A class or function decorated with `@serve.deployment`."""

    # The init arguments it runs with, for one `get_deployment` read back (Ray 1.x's).
    _init_args: tuple[Any, ...] = ()
    _init_kwargs: dict[str, Any] | None = None

    @property
    def init_args(self) -> tuple[Any, ...]:
        return self._init_args

    @property
    def init_kwargs(self) -> dict[str, Any]:
        return dict(self._init_kwargs or {})

    def options(self, **options: Any) -> Deployment[T]:
        copy = cast(Deployment[T], super().options(**options))
        copy._init_args, copy._init_kwargs = self._init_args, self._init_kwargs
        return copy

    # Ray 1.x: a deployment deployed on its own, as an application of its name.
    def deploy(self, *init_args: Any, _blocking: bool = True, **init_kwargs: Any) -> None:
        """Deploy this deployment alone, served at its route_prefix (default `/{name}`).
        Without arguments, with the init arguments it was read back with, if any."""
        if not init_args and not init_kwargs:
            init_args, init_kwargs = self.init_args, self.init_kwargs
        prefix = self.route_prefix if self.route_prefix is not None else f"/{self.name}"
        run(self.bind(*init_args, **init_kwargs), name=self.name, route_prefix=prefix)

    def get_handle(self, sync: bool | None = None) -> DeploymentHandle:
        """A handle to a deployment deployed with `.deploy()`."""
        return DeploymentHandle(self.name, self.name)

    def delete(self) -> None:
        """Delete a deployment deployed with `.deploy()`."""
        delete(self.name)


@overload
def deployment(_func_or_class: Callable[..., T]) -> Deployment[T]: ...


@overload
def deployment(_func_or_class: None = None, **options: Any) -> Callable[[Any], Deployment[Any]]: ...


def deployment(_func_or_class: Any = None, *, name: str | None = None,
               route_prefix: str | None = None, version: str | None = None,
               **options: Any) -> Any:
    """Turn a class or function into a Deployment, as `@serve.deployment` in Ray Serve."""

    def decorate(target: Any) -> Deployment[Any]:
        if not (inspect.isclass(target) or callable(target)):
            raise TypeError("@serve.deployment must decorate a class or a function")
        config = merge_config(DeploymentConfig(), dict(options))
        return Deployment(target, name or target.__name__, config, route_prefix, version)

    if _func_or_class is not None:
        return decorate(_func_or_class)
    return decorate


# Ray 1.x's serve.get_deployment and serve.list_deployments -------------------------------------
def get_deployment(name: str) -> Deployment[Any]:
    """The deployment `name` as it runs (code, options and init arguments): one deployed with
    `.deploy()`, else one of the default application. Raises KeyError, as Ray 1.x did."""
    deployed = ray1_deployment(name)
    if deployed is None:
        raise KeyError(f"Deployment {name} was not found. Did you call Deployment.deploy()?")
    return _read_back(deployed)


def list_deployments() -> dict[str, Deployment[Any]]:
    """Every deployment `get_deployment` finds, by name."""
    return {name: _read_back(deployed) for name, deployed in ray1_deployments().items()}


def _read_back(deployed: Deployed) -> Deployment[Any]:
    found: Deployment[Any] = Deployment(deployed.func_or_class, deployed.name, deployed.config,
                                        deployed.route_prefix)
    found._init_args, found._init_kwargs = deployed.init_args, deployed.init_kwargs
    return found
