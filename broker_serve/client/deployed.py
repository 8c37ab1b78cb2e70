"""A running deployment read back as the client built it: its code, init arguments and options,
from the application record and the signed spec in Redis (docs/architecture.md, "Deploying").

Ray 1.x's `serve.get_deployment(name)` and `serve.list_deployments()` return such deployments,
and Ray 0.8's `serve.set_backend_config` redeploys a backend from one when a change needs new
replicas. The spec is signed with the cluster secret, so only the cluster's own definitions
are unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import DeploymentConfig
from ..protocol import messages
from ..protocol.call_values import loads_signed
from ..state.records import AppRecord
from .api import DEFAULT_APP_NAME
from .runtime import Runtime, current_runtime, get_runtime


@dataclass(frozen=True)
class Deployed:
    """One deployment of a running application, as it was deployed."""

    app: str
    name: str
    func_or_class: Any
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]
    config: DeploymentConfig
    route_prefix: str | None  # the application's, for its ingress; else None


def read_deployed(app: str, deployment: str) -> Deployed | None:
    """Deployment `deployment` of application `app`, or None if there is none."""
    runtime = current_runtime() or get_runtime()
    return runtime.run_sync(_read(runtime, app, deployment))


def ray1_deployment(name: str) -> Deployed | None:
    """The deployment Ray 1.x calls `name` (see `ray1_deployments`), or None."""
    runtime = current_runtime() or get_runtime()

    async def read() -> Deployed | None:
        apps = await runtime.store.apps()
        app = _ray1_names(apps).get(name)
        return None if app is None else await _from_record(runtime, apps[app], name)

    return runtime.run_sync(read())


def ray1_deployments() -> dict[str, Deployed]:
    """The deployments Ray 1.x names alone, by name: each deployed with `.deploy()` (an
    application of its own name), and each of the default application unless one of those
    has its name."""
    runtime = current_runtime() or get_runtime()

    async def read() -> dict[str, Deployed]:
        apps = await runtime.store.apps()
        found = {}
        for name, app in sorted(_ray1_names(apps).items()):
            deployed = await _from_record(runtime, apps[app], name)
            if deployed is not None:
                found[name] = deployed
        return found

    return runtime.run_sync(read())


def _ray1_names(apps: dict[str, AppRecord]) -> dict[str, str]:
    """Deployment name -> the application Ray 1.x finds it in."""
    default = apps.get(DEFAULT_APP_NAME)
    names = dict.fromkeys(default["deployments"] if default else (), DEFAULT_APP_NAME)
    names.update({app: app for app, record in apps.items() if app in record["deployments"]})
    return names


async def _read(runtime: Runtime, app: str, deployment: str) -> Deployed | None:
    record = await runtime.store.app(app)
    return None if record is None else await _from_record(runtime, record, deployment)


async def _from_record(runtime: Runtime, record: AppRecord, deployment: str) -> Deployed | None:
    entry = record["deployments"].get(deployment)
    if entry is None:
        return None
    blob = await runtime.store.spec(record["name"], deployment, entry["version"])
    if blob is None:  # deleted meanwhile
        return None
    spec = messages.unpack(blob)
    definition = loads_signed(spec["pickled"], spec["sig"], runtime.secret,
                              "the deployment's definition")
    ingress = record["ingress"] == deployment
    return Deployed(
        app=record["name"], name=deployment, func_or_class=definition["func_or_class"],
        init_args=tuple(definition["args"]), init_kwargs=dict(definition["kwargs"]),
        # The record's config holds the live options as they are now, the spec's as built.
        config=DeploymentConfig.model_validate(entry["config"]),
        route_prefix=record["route_prefix"] if ingress else None,
    )
