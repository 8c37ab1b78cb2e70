"""`serve.run(app, _local_testing_mode=True)`, and the serve API's functions that know of it.

The application is built as `serve.run` builds it for a cluster (`client/build.py`: the same
signed definitions, bound deployments made handles), then deployed into this process's
`LocalRuntime`. What one process cannot do as a cluster does is refused here, naming the mode
(docs/architecture.md, "Local testing mode").
"""

from __future__ import annotations

from typing import Any

from ..client import api
from ..client.application import Application, is_asgi_ingress
from ..client.build import build_application
from ..client.handle import DeploymentHandle
from ..client.runtime import current_runtime, get_runtime, reset_runtime
from ..config import HTTPOptions, gRPCOptions
from ..exceptions import LocalTestingModeError
from ..schema import ServeStatus
from .runtime import LocalRuntime

_MODE = "local testing mode (serve.run(..., _local_testing_mode=True))"


def run(target: Application, *, blocking: bool = False,
        name: str = api.DEFAULT_APP_NAME, route_prefix: Any = api._DEFAULT_PREFIX,
        logging_config: Any = None, _local_testing_mode: bool = False) -> DeploymentHandle:
    """Deploy an application and return a handle to its ingress deployment; with
    `_local_testing_mode`, into this process, with no broker, Redis or other process."""
    local = _local_runtime()
    if not _local_testing_mode:
        if local is not None:
            raise LocalTestingModeError(f"this process runs applications in {_MODE}: call "
                                        "serve.shutdown() before deploying to a cluster")
        return api.run(target, blocking=blocking, name=name, route_prefix=route_prefix,
                       logging_config=logging_config)
    app, prefix = api.checked_target(target, name, route_prefix)
    if blocking:
        raise LocalTestingModeError(f"blocking=True waits for HTTP requests, and {_MODE} "
                                    "serves no HTTP: call the returned handle instead")
    _refuse_what_differs(app, name)
    runtime = local or _start()
    record, specs = build_application(app, name, prefix, runtime.names, runtime.secret)
    runtime.run_sync(runtime.deploy(record, specs))
    return DeploymentHandle(record["ingress"], name)


def delete(name: str, _blocking: bool = True) -> None:
    """Delete an application: its replicas stop and its route goes away."""
    local = _local_runtime()
    if local is None:
        api.delete(name, _blocking)
        return
    local.run_sync(local.delete(name))


def shutdown() -> None:
    """Delete every application (in local testing mode, stop them in this process)."""
    if _local_runtime() is None:
        api.shutdown()
        return
    reset_runtime()


def status() -> ServeStatus:
    _refuse_if_local("serve.status()")
    return api.status()


def start(http_options: HTTPOptions | dict[str, Any] | None = None, *, detached: bool = True,
          proxy_location: Any = None,
          grpc_options: gRPCOptions | dict[str, Any] | None = None, **kwargs: Any) -> None:
    """Connect to (or start) a cluster with these HTTP and gRPC options (`client/api.py`)."""
    _refuse_if_local("serve.start()")
    api.start(http_options, detached=detached, proxy_location=proxy_location,
              grpc_options=grpc_options, **kwargs)


def _local_runtime() -> LocalRuntime | None:
    runtime = current_runtime()
    return runtime if isinstance(runtime, LocalRuntime) else None


def _start() -> LocalRuntime:
    if current_runtime() is not None:
        raise LocalTestingModeError(f"this process is connected to a cluster; call "
                                    f"serve.shutdown() before running in {_MODE}")
    runtime = get_runtime(make=LocalRuntime)
    assert isinstance(runtime, LocalRuntime)
    return runtime


def _refuse_if_local(what: str) -> None:
    if _local_runtime() is not None:
        raise LocalTestingModeError(f"{what} needs a cluster's control state; {_MODE} has "
                                    "none")


def _refuse_what_differs(app: Application, name: str) -> None:
    """What one process cannot do as a cluster does is refused, not ignored."""
    for node in app.walk():
        deployment = node.deployment
        where = f"deployment {deployment.name!r} of application {name!r}"
        if is_asgi_ingress(deployment.func_or_class):
            raise LocalTestingModeError(
                f"{where} is an HTTP ingress (@serve.ingress), and {_MODE} serves no HTTP: "
                "test it on a cluster, or test the deployments it calls through handles")
        if deployment.config.ray_actor_options.get("runtime_env"):
            raise LocalTestingModeError(
                f"{where} has a runtime_env, and {_MODE} runs every deployment in this "
                "process, in its environment")
        if (deployment.config.autoscaling_config is not None
                or deployment.config.target_replicas() != 1):
            raise LocalTestingModeError(
                f"{where} asks for more than one replica (num_replicas or "
                f"autoscaling_config), and {_MODE} runs exactly one: use num_replicas=1 "
                "(e.g. .options(num_replicas=1)) in the test")
