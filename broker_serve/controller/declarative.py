"""Applying a config: the REST API's PUT, DELETE and scale (docs/architecture.md,
"Declarative configs and the REST API").

Each application of a config is built in a subprocess (`_build_app.py`) and written with the
same `state.apps.write_app` that `serve.run` uses. Applications the config does not list are deleted.
A build that fails marks its application DEPLOY_FAILED in `app_builds` and is not retried until
the next PUT. A config's `traffic` records replace those of the config before it, once its
applications are written (docs/architecture.md, "Traffic policy").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_after_delay, wait_fixed

from ..config import HTTPOptions, gRPCOptions
from ..credentials import HOW_TO_SET, cluster_secret
from ..exceptions import BrokerServeError, BuildFailed, ClusterSecretMissing, ProtocolError
from ..protocol import messages
from ..runtime_env import options as runtime_env_options
from ..runtime_env.cache import HostCache
from ..runtime_env.environment import Resolver, prepare, upload
from ..runtime_env.progress import ProgressReporter
from ..schema import ApplicationStatus, ServeApplicationSchema, ServeDeploySchema
from ..settings import Settings
from ..state.apps import app_version, write_app
from ..state.records import AppRecord
from ..state.store import Store, now
from ..state.traffic import make_traffic
from .api_token import ENV_VAR as TOKEN_VAR

log = logging.getLogger("broker_serve.controller.rest")

DELETE_TIMEOUT_S = 60.0
POLL_S = 0.1
_STDERR_TAIL = 4000


class UnknownTarget(BrokerServeError, LookupError):
    """No such application or deployment (404)."""


class Refused(BrokerServeError):
    """The request conflicts with the state of the cluster (409)."""


# PUT --------------------------------------------------------------------------------------------
async def apply_config(store: Store, settings: Settings,
                       config: ServeDeploySchema) -> dict[str, Any]:
    """Make `config` the cluster's applications. Returns each one's result and the deleted."""
    names = store.names
    secret = cluster_secret(settings)
    if not secret:  # nothing is built, nothing changes
        raise ClusterSecretMissing(f"this controller has no cluster secret to sign the "
                                   f"applications' definitions with: {HOW_TO_SET}")
    async with _deploy_lock(store):
        await _check_traffic_prefixes(store, config)
        wanted = {app.name for app in config.applications}
        for app in config.applications:
            await store.put_app_build(app.name, {
                "status": ApplicationStatus.DEPLOYING,
                "message": "building the application from its config",
                "deployed_at": now(), "expires": now() + _lock_ttl_s(),
            })
        await store.put_deploy_config(config)
        await _apply_http_options(store, settings, config, secret)
        gone = sorted(set(await store.apps()) - wanted)
        stale = sorted(set(await store.app_builds()) - wanted)
        await store.delete_field(names.apps, *gone)
        await store.delete_field(names.app_builds, *stale)
        await store.announce("apps")
        if gone:
            log.info("config applied: deleting application(s) %s", ", ".join(gone))
        limit = asyncio.Semaphore(os.cpu_count() or 1)
        results = await asyncio.gather(*(
            _deploy_one(store, settings, secret, app, wanted, limit)
            for app in config.applications))
        await _replace_traffic(store, config)
    return {"applications": dict(results), "deleted": gone}


async def _deploy_one(store: Store, settings: Settings, secret: bytes,
                      app: ServeApplicationSchema, replacing: set[str],
                      limit: asyncio.Semaphore) -> tuple[str, dict[str, str]]:
    try:
        async with limit:
            record, specs = await build_application(settings, secret, app, store)
        await upload(store, HostCache(settings.runtime_env_cache()), specs)
        await write_app(store, record, specs, replacing)
    except Exception as exc:  # one application's failure, whatever it is, must not fail the rest
        if isinstance(exc, (BuildFailed, ValueError)):
            log.warning("application %s failed to deploy: %s", app.name, exc)
        else:
            log.exception("deploying application %s failed", app.name)
        await store.put_app_build(app.name, {
            "status": ApplicationStatus.DEPLOY_FAILED, "message": str(exc), "deployed_at": now()})
        await store.announce("apps")
        return app.name, {"result": "failed", "message": str(exc)}
    log.info("application %s built from %s (version %s)", app.name, app.import_path,
             record["version"])
    return app.name, {"result": "built", "message": ""}


async def build_application(settings: Settings, secret: bytes, app: ServeApplicationSchema,
                            store: Store | None = None
                            ) -> tuple[AppRecord, dict[str, bytes]]:
    """The app record and specs, built by `python -m broker_serve.client.config_build` in the
    application's runtime_env, which is resolved and prepared on this host first; its
    progress goes to the application's status message (docs/architecture.md, "Runtime
    environments")."""
    app_dir = os.path.abspath(settings.app_dir or os.getcwd())
    where = f"application {app.name!r}"
    async def show(message: str) -> None:
        if store is not None:
            await store.put_app_build(app.name, {
                "status": ApplicationStatus.DEPLOYING, "message": message,
                "deployed_at": now(), "expires": now() + _lock_ttl_s()})

    progress = ProgressReporter(show)
    try:
        options = runtime_env_options.parse(app.runtime_env, where)
        resolver = Resolver.from_settings(settings, app_dir, progress)
        environment = await asyncio.to_thread(resolver.resolve, options, where)
        prepared = await prepare(environment, resolver.cache, store,
                                 settings.runtime_env_max_mb << 20, progress)
    finally:
        await progress.close()
    import_dir = prepared.cwd or app_dir
    request = orjson.dumps({
        "app": app.model_dump(mode="json", exclude_unset=True), "cluster": settings.cluster,
        "secret": secret.hex(), "import_dir": import_dir, "base_dir": app_dir,
        "packages": resolver.known,
    })
    # User code runs there: it gets the cluster's settings, not the REST API's token; the
    # runtime_env's variables, but not over the cluster's settings.
    env = {k: v for k, v in {**os.environ, **prepared.env_vars, **settings.env()}.items()
           if k != TOKEN_VAR}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*prepared.paths, env.get("PYTHONPATH")]))
    try:
        process = await asyncio.create_subprocess_exec(
            prepared.python, "-m", "broker_serve.client.config_build", cwd=import_dir, env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except OSError as exc:
        raise BuildFailed(f"cannot start the build of application {app.name!r} in "
                          f"{import_dir}: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(process.communicate(request), settings.build_timeout_s)
    except TimeoutError:
        raise BuildFailed(f"building application {app.name!r} took more than "
                          f"{settings.build_timeout_s:.0f}s (BROKER_SERVE_BUILD_TIMEOUT_S)"
                          ) from None
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    output = err.decode(errors="replace").strip()
    if output:
        log.info("the build of %s said:\n%s", app.name, output[-_STDERR_TAIL:])
    try:
        result = messages.unpack(out) if out else None
    except ProtocolError:  # the build died mid-answer: its stderr below says why
        result = None
    if not isinstance(result, dict):
        raise BuildFailed(f"the build of application {app.name!r} exited with code "
                          f"{process.returncode}:\n{output[-_STDERR_TAIL:]}")
    if "error" in result:
        raise BuildFailed(result["error"])
    return result["record"], result["specs"]


def local_working_dir(settings: Settings, app: ServeApplicationSchema) -> str | None:
    """The application's working_dir, if it is a local directory of this host."""
    working_dir = app.runtime_env.get("working_dir")
    if not isinstance(working_dir, str) or "://" in working_dir:
        return None
    path = os.path.join(os.path.abspath(settings.app_dir or os.getcwd()),
                        os.path.expanduser(working_dir))
    return os.path.abspath(path) if os.path.isdir(path) else None


async def _check_traffic_prefixes(store: Store, config: ServeDeploySchema) -> None:
    """A config's traffic may not take a route prefix that a record set otherwise (Python,
    REST) routes; the schema checked the rest."""
    for other in (await store.traffic()).values():
        if other.get("source") == "declarative" or other["route_prefix"] is None:
            continue
        for record in config.traffic:
            if record.route_prefix == other["route_prefix"] and record.name != other["name"]:
                raise Refused(f"traffic {record.name!r}: route_prefix {record.route_prefix!r} "
                              f"is routed by traffic {other['name']!r}; delete it first")


async def _replace_traffic(store: Store, config: ServeDeploySchema) -> None:
    """The config's traffic records, in place of the previous config's. Those set from
    Python or REST stay, unless the config names them."""
    wanted = {record.name for record in config.traffic}
    stale = [name for name, record in (await store.traffic()).items()
             if record.get("source") == "declarative" and name not in wanted]
    await store.delete_traffic(*stale)
    for record in config.traffic:
        await store.put_traffic(make_traffic(record.name, record.route_prefix, record.split,
                                             record.shadow, record.methods, "declarative"))
    if stale or config.traffic:
        await store.announce("traffic")


async def _apply_http_options(store: Store, settings: Settings,
                              config: ServeDeploySchema, secret: bytes) -> None:
    """The config's http_options and proxy_location, where it sets them, join the stored
    options; proxies read them when they start. Its grpc_options replace the stored ones when
    they name servicer functions; an empty list (what `broker-serve build` writes) leaves the
    cluster's gRPC as it is."""
    if "grpc_options" in config.model_fields_set and config.grpc_options.grpc_servicer_functions:
        # proxies pick them up within seconds
        await store.put_grpc_options(gRPCOptions.model_validate(config.grpc_options.model_dump()),
                                     _servicer_paths(settings, config), secret)
    changes: dict[str, Any] = {}
    if "http_options" in config.model_fields_set:
        changes.update(config.http_options.model_dump(exclude_unset=True))
    if "proxy_location" in config.model_fields_set:
        changes["location"] = config.proxy_location
    if not changes:
        return
    current = await store.http_options()
    updated = HTTPOptions.model_validate({**current.model_dump(), **changes})
    await store.put_http_options(updated)


def _servicer_paths(settings: Settings, config: ServeDeploySchema) -> list[str]:
    """Where the proxies import the `*_pb2_grpc` modules from: the app dir and each
    application's working_dir, as its replicas do (one whose working_dir is bad fails its
    own build)."""
    paths = [os.path.abspath(settings.app_dir or os.getcwd())]
    for app in config.applications:
        directory = local_working_dir(settings, app)
        if directory is not None and directory not in paths:
            paths.append(directory)
    return paths


# DELETE -----------------------------------------------------------------------------------------
async def delete_all(store: Store) -> list[str]:
    """Delete every application, the traffic records that route to them and the stored
    config (Ray's `serve shutdown`); wait until their statuses are gone."""
    names = store.names
    async with _deploy_lock(store):
        apps = sorted(await store.apps())
        await store.delete_field(names.apps, *apps)
        await store.forget_config()
        await store.delete_traffic(*await store.traffic())
        await store.announce("apps")
        await store.announce("traffic")

    async def statuses_gone() -> bool:
        return not await store.app_status_count()

    await AsyncRetrying(stop=stop_after_delay(DELETE_TIMEOUT_S), wait=wait_fixed(POLL_S),
                        retry=retry_if_result(lambda gone: not gone),
                        retry_error_callback=lambda state: None)(statuses_gone)
    return apps


# scale -----------------------------------------------------------------------------------------
async def scale(store: Store, app: str, deployment: str, num_replicas: int) -> None:
    """Set one deployment's `num_replicas` in place: a live option, so nothing restarts."""
    async with _deploy_lock(store):
        record = await store.app(app)
        if record is None:
            raise UnknownTarget(f"there is no application {app!r}")
        dep = record["deployments"].get(deployment)
        if dep is None:
            raise UnknownTarget(f"application {app!r} has no deployment {deployment!r}; it "
                                f"has {sorted(record['deployments'])}")
        if dep["config"].get("autoscaling_config"):
            raise Refused(f"deployment {deployment!r} autoscales: change its autoscaling_config "
                          "instead")
        dep["num_replicas"] = dep["config"]["num_replicas"] = num_replicas
        record["version"] = app_version(record["route_prefix"], record["deployments"])
        await store.replace_app(record)
        await store.announce("apps")
        if record.get("source") == "declarative":
            await _scale_stored_config(store, app, deployment, num_replicas)
    log.info("deployment %s of %s scaled to %d replica(s)", deployment, app, num_replicas)


async def _scale_stored_config(store: Store, app: str, deployment: str, n: int) -> None:
    config = await store.deploy_config_document()
    if not config:
        return
    for entry in config.get("applications", []):
        if entry.get("name", "default") == app:
            overrides = entry.setdefault("deployments", [])
            override = next((d for d in overrides if d["name"] == deployment), None)
            if override is None:
                overrides.append({"name": deployment, "num_replicas": n})
            else:
                override["num_replicas"] = n
    await store.put_deploy_config(config)


# the lock --------------------------------------------------------------------------------------
def _lock_ttl_s() -> float:
    """A deploy holds the lock while its applications build, and a minute more."""
    return Settings().build_timeout_s + 60


@contextlib.asynccontextmanager
async def _deploy_lock(store: Store) -> AsyncIterator[None]:
    """One config change at a time across every controller of the cluster."""
    key, token = store.names.deploy_lock, secrets.token_hex(8)
    ttl_s = _lock_ttl_s()

    def held_too_long(state: RetryCallState) -> NoReturn:
        raise Refused("another deploy has held the lock for too long")

    await AsyncRetrying(stop=stop_after_delay(ttl_s), wait=wait_fixed(POLL_S),
                        retry=retry_if_result(lambda taken: not taken),
                        retry_error_callback=held_too_long)(store.take_lock, key, token, ttl_s)
    try:
        yield
    finally:
        await store.release_lock(key, token)
