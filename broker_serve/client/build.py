"""Building an application: from the graph of bound deployments to the record and the signed
definition of each deployment that the controller deploys (docs/architecture.md, "Deploying").

`serve.run` builds in the driver; a config application builds in `config_build.py`'s subprocess.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
import sysconfig
from collections.abc import Callable
from typing import Any

import cloudpickle
import orjson

from ..config import LIVE_OPTIONS, DeploymentConfig, user_config_hash
from ..credentials import HOW_TO_SET
from ..exceptions import ClusterSecretMissing, RayServeException
from ..protocol import messages
from ..protocol.call_values import dumps_signed
from ..protocol.names import Names
from ..runtime_env import options as runtime_env_options
from ..runtime_env.environment import Resolver, environment_digest, seal
from ..settings import Settings
from ..state.apps import app_version
from ..state.records import AppRecord, DeploymentEntry
from ..state.store import now
from .application import Application, is_asgi_ingress
from .handle import DeploymentHandle


def build_application(app: Application, name: str, route_prefix: str | None, names: Names, secret: bytes,
           *, reference: Callable[[Any], Any] | None = None, sys_path: list[str] | None = None,
           resolver: Resolver | None = None, runtime_env: dict[str, Any] | None = None
           ) -> tuple[AppRecord, dict[str, bytes]]:
    """The application record and the signed definition of each deployment.

    A driver's own modules travel by value. An application a config names (`config_build.py`)
    passes `reference`, which gives what to pickle in place of each class or function (an
    import reference, so worker nodes import the user's code), and the `sys_path` its replicas
    need. Each deployment's `ray_actor_options.runtime_env`, laid over the application's
    `runtime_env`, is resolved by `resolver` into the environment its spec carries
    (docs/architecture.md, "Runtime environments").
    """
    if not secret:
        raise ClusterSecretMissing("this process has no cluster secret to sign the "
                                   f"application's definitions with: {HOW_TO_SET}")
    nodes = app.walk()
    dep_names: dict[int, str] = {}
    taken: set[str] = set()
    for node in nodes:
        base = candidate = node.deployment.name
        suffix = 0
        while candidate in taken:
            suffix += 1
            candidate = f"{base}_{suffix}"
        taken.add(candidate)
        dep_names[id(node)] = candidate
    refuse_two_ingresses(name, [dep_names[id(node)] for node in nodes
                                if is_asgi_ingress(node.deployment.func_or_class)])

    def to_handle(value: Any) -> Any:
        if isinstance(value, Application):
            return DeploymentHandle(dep_names[id(value)], name)
        if isinstance(value, list):
            return [to_handle(v) for v in value]
        if isinstance(value, tuple):
            return tuple(to_handle(v) for v in value)
        if isinstance(value, dict):
            return {k: to_handle(v) for k, v in value.items()}
        return value

    sys_path = driver_paths() if sys_path is None else sys_path
    cluster_queue_type = Settings().queue_type
    deployments: dict[str, DeploymentEntry] = {}
    specs: dict[str, bytes] = {}
    for node in nodes:
        dep_name, dep = dep_names[id(node)], node.deployment
        if reference is None:
            pickle_user_module_by_value(dep.func_or_class)
        config = dep.config.model_dump(mode="json")
        config["queue_type"] = queue_type(dep.config, cluster_queue_type)
        definition = {
            "func_or_class": reference(dep.func_or_class) if reference else dep.func_or_class,
            "args": to_handle(list(node.args)),
            "kwargs": to_handle(dict(node.kwargs)),
            # The live options are read from the app record, so changing them keeps the version.
            "config": {k: v for k, v in config.items() if k not in LIVE_OPTIONS},
        }
        pickled, sig = dumps_signed(definition, secret)
        spec: dict[str, Any] = {"pickled": pickled, "sig": sig, "sys_path": sys_path}
        versioned, restart_options = pickled, definition["config"]
        options = runtime_env_options.parse(
            runtime_env_options.merge(runtime_env, dep.config.ray_actor_options.get("runtime_env")),
            where := f"deployment {dep_name!r} of application {name!r}")
        if not options.is_empty:
            resolver = resolver or Resolver.from_settings(Settings(), os.getcwd())
            environment = resolver.resolve(options, where)
            assert environment is not None
            spec.update(seal(environment, secret))
            env_digest = environment_digest(environment)
            # A changed archive or requirement makes a new version, whatever else stays.
            versioned += b"\0environment\0" + env_digest.encode()
            restart_options = {**restart_options, "environment": env_digest}
        version = deployment_version(dep.version, versioned, restart_options,
                                     from_config=reference is not None)
        specs[names.spec(name, dep_name, version)] = messages.pack(spec)
        deployments[dep_name] = {
            "version": version,
            "queue": names.request_queue(name, dep_name),
            "num_replicas": dep.config.target_replicas(),
            "graceful_shutdown_timeout_s": dep.config.graceful_shutdown_timeout_s,
            "config": config,
            "user_config_hash": user_config_hash(config.get("user_config")),
        }
    ingress = dep_names[id(app)]
    record: AppRecord = {"name": name, "route_prefix": route_prefix, "ingress": ingress,
                         "version": app_version(route_prefix, deployments),
                         "deployments": deployments, "deployed_at": now()}
    return record, specs


def queue_type(config: DeploymentConfig, cluster_default: str) -> str:
    """The deployment's own queue type, else the cluster's, except that an ordered deployment
    (order_by_deadline) keeps a classic queue: quorum queues have no priorities."""
    if config.queue_type is not None:
        return config.queue_type
    return "classic" if config.order_by_deadline else cluster_default


def deployment_version(user_version: str | None, pickled: bytes, restart_options: dict[str, Any],
                       *, from_config: bool) -> str:
    """What decides whether a redeploy restarts a deployment's replicas, as in Ray Serve.

    - A `version=` the user gave: replicas are kept while it and the options that need a
      restart stay the same, whatever the code (the first definition of a version is the one
      stored: `Store.put_app`).
    - A config's application: the hash of its definition, so a PUT of an unchanged config
      restarts nothing and a changed file rolls out.
    - Otherwise (`serve.run`, `.deploy()`): a new version each time, so each run restarts the
      replicas on the code it ships.
    """
    if user_version is not None:
        options = orjson.dumps(restart_options, option=orjson.OPT_SORT_KEYS)
        return hashlib.sha256(b"version\0" + user_version.encode() + b"\0" + options
                              ).hexdigest()[:16]
    if from_config:
        return hashlib.sha256(pickled).hexdigest()[:16]
    return secrets.token_hex(8)


def refuse_two_ingresses(app_name: str, ingresses: list[str]) -> None:
    """Ray allows one `serve.ingress` deployment per application, and says so in these words
    (naming FastAPI even for another ASGI app)."""
    if len(ingresses) > 1:
        raise RayServeException(
            f'Found multiple FastAPI deployments in application "{app_name}" '
            f"({', '.join(ingresses)}). Please only include one deployment with @serve.ingress "
            "in your application to avoid this issue.")


def driver_paths() -> list[str]:
    """Where a replica looks for modules the driver imported by reference."""
    paths = [os.getcwd()]
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if main_file:
        paths.insert(0, os.path.dirname(os.path.abspath(main_file)))
    return paths


def pickle_user_module_by_value(target: Any) -> None:
    """Ship the user's own module inside the pickle, so a worker on another host needs no copy.

    `__main__` is always pickled by value. Installed packages are left to import by name.
    """
    module = sys.modules.get(getattr(target, "__module__", "") or "")
    path = getattr(module, "__file__", None)
    if module is None or module.__name__ == "__main__" or path is None:
        return
    if module.__name__.split(".")[0] == "broker_serve":
        return
    installed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")}
    if any(os.path.abspath(path).startswith(os.path.abspath(p)) for p in installed):
        return
    cloudpickle.register_pickle_by_value(module)
