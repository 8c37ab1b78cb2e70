"""`@serve.deployment`, `Deployment` and `Application` (Ray's `ray.serve.deployment`).

The description of an app lives in `client/application.py`, which the client builds from.
`Deployment` here adds Ray 1.x's calls on a deployment, which reach the serve API above it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar, overload

from .client import application
from .client.api import delete, run
from .client.application import Application, merge_config
from .client.handle import DeploymentHandle
from .config import DeploymentConfig

__all__ = ["Application", "Deployment", "deployment"]

T = TypeVar("T")


class Deployment(application.Deployment[T]):
    """A class or function decorated with `@serve.deployment`."""

    # Ray 1.x: a deployment deployed on its own, as an application of its name.
    def deploy(self, *init_args: Any, _blocking: bool = True, **init_kwargs: Any) -> None:
        """Deploy this deployment alone, served at its route_prefix (default `/{name}`)."""
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
