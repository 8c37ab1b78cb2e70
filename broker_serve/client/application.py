"""`Deployment` and `Application`: the user's description of an app, as the client builds it.

A `Deployment` wraps the user's class or function with its options. `.bind()` gives an
`Application`: a graph whose nodes are deployments with their constructor arguments, where an
argument that is itself an `Application` becomes a handle to that deployment in the replica.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from ..config import AutoscalingConfig, DeploymentConfig

T = TypeVar("T")

_OPTION_NAMES = set(DeploymentConfig.model_fields)

# The class attribute `serve.ingress` (replica/ingress.py) leaves on the classes it makes serve
# an ASGI app. It is named here, below the replica layer, so that building an application can
# tell its ingress deployments apart (Ray allows one per application).
INGRESS_ATTRIBUTE = "_bs_ingress"


def is_asgi_ingress(func_or_class: Any) -> bool:
    """Whether `func_or_class` is a class decorated with `serve.ingress` (or inherits one)."""
    return isinstance(func_or_class, type) and hasattr(func_or_class, INGRESS_ATTRIBUTE)


class Deployment(Generic[T]):
    """A class or function decorated with `@serve.deployment`."""

    def __init__(
        self,
        func_or_class: Any,
        name: str,
        config: DeploymentConfig,
        route_prefix: str | None = None,
        version: str | None = None,
    ) -> None:
        if not name or "." in name or "#" in name:
            raise ValueError(f"invalid deployment name {name!r}: it must be non-empty, no '.' or '#'")
        if version is not None and (not isinstance(version, str) or not version):
            raise TypeError(f"version must be a non-empty string, got {version!r}")
        self.func_or_class = func_or_class
        self._name = name
        self._config = config
        self._route_prefix = route_prefix
        self._version = version

    @property
    def name(self) -> str:
        return self._name

    @property
    def config(self) -> DeploymentConfig:
        return self._config

    @property
    def num_replicas(self) -> int | None:
        return self._config.num_replicas

    @property
    def max_ongoing_requests(self) -> int:
        return self._config.max_ongoing_requests

    @property
    def user_config(self) -> Any:
        return self._config.user_config

    @property
    def route_prefix(self) -> str | None:
        return self._route_prefix

    @property
    def version(self) -> str | None:
        """The version the user gave, if any: while it stays the same, a redeploy keeps the
        running replicas (docs/architecture.md, "Versions and live options")."""
        return self._version

    def options(self, *, name: str | None = None, route_prefix: str | None = None,
                version: str | None = None, **options: Any) -> Deployment[T]:
        """A copy of this deployment with some options changed."""
        config = merge_config(self._config, options)
        return type(self)(
            self.func_or_class,
            name or self._name,
            config,
            route_prefix if route_prefix is not None else self._route_prefix,
            version if version is not None else self._version,
        )

    def bind(self, *args: Any, **kwargs: Any) -> Application:
        return Application(self, args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            "Deployments cannot be constructed directly: use `.bind()` and `serve.run()`."
        )

    def __repr__(self) -> str:
        return f"Deployment(name={self._name!r})"


class Application:
    """A deployment bound to its constructor arguments; other Applications may be among them."""

    def __init__(self, deployment: Deployment[Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self.deployment = deployment
        self.args = args
        self.kwargs = kwargs

    def walk(self) -> list[Application]:
        """Every Application in the graph, children before parents, each once."""
        seen: dict[int, Application] = {}

        def visit(node: Application) -> None:
            if id(node) in seen:
                return
            for value in [*node.args, *node.kwargs.values()]:
                for child in _applications_in(value):
                    visit(child)
            seen[id(node)] = node

        visit(self)
        return list(seen.values())

    def __repr__(self) -> str:
        return f"Application({self.deployment.name!r})"


def _applications_in(value: Any) -> list[Application]:
    if isinstance(value, Application):
        return [value]
    if isinstance(value, (list, tuple, set)):
        return [app for item in value for app in _applications_in(item)]
    if isinstance(value, dict):
        return [app for item in value.values() for app in _applications_in(item)]
    return []


def merge_config(config: DeploymentConfig, options: dict[str, Any]) -> DeploymentConfig:
    unknown = set(options) - _OPTION_NAMES - {"max_concurrent_queries"}
    if unknown:
        raise TypeError(f"unknown deployment option(s): {', '.join(sorted(unknown))}")
    if "max_concurrent_queries" in options:  # the name before Ray 2.7
        options.setdefault("max_ongoing_requests", options.pop("max_concurrent_queries"))
    data = config.model_dump(exclude_unset=True)
    if options.get("num_replicas") == "auto":
        options["num_replicas"] = None
        options.setdefault("autoscaling_config", AutoscalingConfig(max_replicas=100))
    if isinstance(options.get("autoscaling_config"), AutoscalingConfig):
        options["autoscaling_config"] = options["autoscaling_config"].model_dump()
    data.update(options)
    return DeploymentConfig.model_validate(data)
