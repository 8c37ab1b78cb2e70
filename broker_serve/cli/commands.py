"""The `broker-serve` command (also `python -m broker_serve`)."""

from __future__ import annotations

import asyncio
import math
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click
import orjson
import yaml
from pydantic import ValidationError

from ..credentials import without_credentials
from ..exceptions import BrokerServeError
from ..lifecycle import die_with_parent_if_asked
from ..observability.entry_point import run_entry_point
from ..observability.logging import setup_logging
from ..protocol.permissions import ROLES, rabbitmq_permissions
from ..settings import Settings

if TYPE_CHECKING:
    from ..state.store import Store

T = TypeVar("T")


def _settings(**overrides: object) -> Settings:
    try:
        return Settings.from_env(**overrides)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


_APP_DIR_HELP = ("Where a config's import paths are imported from [default: "
                 "$BROKER_SERVE_APP_DIR, else the working directory].")


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _set_log_format(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:  # through the environment, so the processes this one starts follow it too
        os.environ["BROKER_SERVE_LOG_FORMAT"] = value


_log_format_option = click.option(
    "--log-format", type=click.Choice(["text", "json"]), envvar="BROKER_SERVE_LOG_FORMAT",
    default=None, expose_value=False, callback=_set_log_format, is_eager=True,
    help="Log lines as text or as JSON objects [default: $BROKER_SERVE_LOG_FORMAT, else text].")


@click.group(help="Ray Serve's programming model on RabbitMQ and Redis.")
@click.version_option(package_name="broker-serve")
def cli() -> None:
    pass


# the processes of a cluster ---------------------------------------------------------------------
@cli.command(help="Run the controller of the cluster (one leads, others stand by). It serves "
                  "the REST API.")
@click.option("--dashboard-host", default=None,
              help="Interface of the REST API [default: $BROKER_SERVE_DASHBOARD_HOST, else "
                   "127.0.0.1].")
@click.option("--dashboard-port", type=int, default=None,
              help="Port of the REST API [default: $BROKER_SERVE_DASHBOARD_PORT, else 8265].")
@click.option("--app-dir", default=None, help=_APP_DIR_HELP)
@_log_format_option
def controller(dashboard_host: str | None, dashboard_port: int | None,
               app_dir: str | None) -> None:
    from ..controller import reconciler as module

    settings = _settings(dashboard_host=dashboard_host, dashboard_port=dashboard_port,
                         app_dir=_absolute(app_dir))
    setup_logging(settings.log_level, "controller")
    _use_uvloop()
    module.main(settings)


@cli.command(help="Run an HTTP proxy.")
@click.option("--host", default=None, help="Interface to listen on [default: 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port to listen on [default: 8000].")
@_log_format_option
def proxy(host: str | None, port: int | None) -> None:
    from ..config import HTTPOptions
    from ..proxy.server import serve_proxy

    settings = _settings()
    setup_logging(settings.log_level, "proxy")
    options = _stored_http_options(settings)
    updates = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    options = HTTPOptions.model_validate({**options.model_dump(), **updates})
    _use_uvloop()
    run_entry_point(serve_proxy(settings, options), "proxy")


def _stored_http_options(settings: Settings) -> Any:
    """The http_options `serve.start` stored for the cluster, if any."""
    return _read_store(settings, lambda store: store.http_options())


def _read_store(settings: Settings, read: Callable[[Store], Awaitable[T]]) -> T:
    """One read of the cluster's state, with a Store opened for it; Redis's errors become
    the command's error message."""
    from ..exceptions import ClusterUnavailable, StateError
    from ..state.store import Store

    async def with_store() -> T:
        store = Store(settings.redis_url, settings.cluster, settings.client_tls())
        try:
            return await read(store)
        finally:
            await store.close()

    try:
        return asyncio.run(with_store())
    except ClusterUnavailable as exc:
        raise click.ClickException(_unreachable(settings, exc)) from exc
    except StateError as exc:
        raise click.ClickException(f"Redis at {without_credentials(settings.redis_url)} failed: "
                                   f"{exc.__cause__ or exc}") from exc


def _unreachable(settings: Settings, exc: BaseException, doing: str = "") -> str:
    # Our message is "cannot reach Redis: <redis's>": name the URL instead of repeating it.
    return (f"cannot reach Redis at {without_credentials(settings.redis_url)}{doing}: "
            f"{exc.__cause__ or exc}")


@cli.command(help="Run a worker node that hosts replica processes.")
@click.option("--node-id", default=None, help="Stable id of this node [default: host-pid].")
@click.option("--num-cpus", type=float, default=None, help="CPUs to offer [default: all].")
@click.option("--num-gpus", type=float, default=0, show_default=True, help="GPUs to offer.")
@click.option("--resources", default="{}", show_default=True,
              help='Custom resources to offer, as JSON: \'{"model_slot": 4}\'.')
@click.option("--app-dir", default=None,
              help="Where replicas run and import a config's code from [default: "
                   "$BROKER_SERVE_APP_DIR, else the working directory].")
@click.option("--proxy/--no-proxy", default=None,
              help="Run an HTTP proxy on this node too [default: only if the cluster's proxy "
                   "location is EveryNode]. Never when it is Disabled.")
@click.option("--proxy-port", type=int, default=None,
              help="Port of this node's proxy [default: the cluster's http_options port].")
@click.option("--metrics-port", type=int, default=None,
              help="Port of the replicas' /metrics; 0 turns it off [default: "
                   "$BROKER_SERVE_METRICS_PORT, else 9500].")
@_log_format_option
def worker(node_id: str | None, num_cpus: float | None, num_gpus: float, resources: str,
           app_dir: str | None, proxy: bool | None, proxy_port: int | None,
           metrics_port: int | None) -> None:
    from ..node import worker as module

    try:
        offered = {"GPU": num_gpus, **orjson.loads(resources)} if num_gpus else \
            dict(orjson.loads(resources))
        offered = {str(name): float(amount) for name, amount in offered.items()}
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise click.BadParameter(f"expected a JSON object of numbers: {exc}",
                                 param_hint="--resources") from exc
    settings = _settings(app_dir=_absolute(app_dir), metrics_port=metrics_port)
    setup_logging(settings.log_level, "worker")
    module.main(settings, node_id, num_cpus, offered, proxy, proxy_port)


# local clusters -----------------------------------------------------------------------------
@cli.command(help="Start a local cluster (controller, proxy, worker) in the background.")
@click.option("--http-host", default="127.0.0.1", show_default=True)
@click.option("--http-port", type=int, default=8000, show_default=True)
@click.option("--dashboard-port", type=int, default=None,
              help="Port of the REST API [default: $BROKER_SERVE_DASHBOARD_PORT, else 8265].")
@click.option("--app-dir", default=None, help=_APP_DIR_HELP)
@_log_format_option
def start(http_host: str, http_port: int, dashboard_port: int | None,
          app_dir: str | None) -> None:
    from redis.exceptions import RedisError

    from ..client.local_cluster import LocalCluster
    from ..settings import state_dir

    settings = _settings(dashboard_port=dashboard_port, app_dir=_absolute(app_dir))
    if _controller_running(settings):
        raise click.ClickException(f"cluster {settings.cluster!r} is already running")
    cluster = LocalCluster(settings, http_host, http_port, detached=True)
    try:
        cluster.start()
    except (OSError, RedisError) as exc:  # ours, such as ClusterUnavailable, reach main()
        raise click.ClickException(str(exc)) from exc
    scheme = settings.server_tls().scheme
    click.echo(f"Started cluster {settings.cluster!r}: proxy on {scheme}://{http_host}:{http_port}, "
               f"REST API on {scheme}://{settings.dashboard_host}:{settings.dashboard_port}, "
               f"logs in {state_dir(settings.cluster)}")


@cli.command(help="Stop the local cluster that `broker-serve start` started.")
def stop() -> None:
    from ..client.local_cluster import stop_detached

    settings = _settings()
    stopped = stop_detached(settings.cluster)
    if stopped:
        click.echo(f"Stopped {', '.join(stopped)} of cluster {settings.cluster!r}.")
    else:
        click.echo(f"No local cluster {settings.cluster!r} was running.")


def _controller_running(settings: Settings) -> bool:
    """Whether a controller holds the lease (a killed one of this machine does not count)."""
    return _read_store(settings, lambda store: store.lease_holder()) is not None


# applications -------------------------------------------------------------------------------
@cli.command(help="Deploy IMPORT_PATH (module:app) and serve it in the foreground.")
@click.argument("import_path")
@click.option("--name", default="default", show_default=True, help="Application name.")
@click.option("--route-prefix", default=None, help="Route prefix [default: the app's or '/'].")
@click.option("--host", default=None, help="Proxy host, if a local cluster is started.")
@click.option("--port", type=int, default=None, help="Proxy port, if a local cluster is started.")
@_log_format_option
def run(import_path: str, name: str, route_prefix: str | None, host: str | None,
        port: int | None) -> None:
    from .. import serve

    setup_logging(_settings().log_level, "run")
    target = _import_app(import_path)
    if host or port:
        serve.start(http_options={k: v for k, v in {"host": host, "port": port}.items() if v})
    kwargs: dict[str, Any] = {"route_prefix": route_prefix} if route_prefix is not None else {}
    try:
        serve.run(target, name=name, **kwargs)
    except Exception as exc:  # pickling the user's code may raise anything: say it plainly
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Application {name!r} is running. Press Ctrl-C to stop.")
    try:
        _wait_for_interrupt()
    finally:
        click.echo("Shutting down.")
        serve.delete(name)  # a local cluster this command started stops at exit


def _wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM. Both handlers are set explicitly: a process started in
    the background by a shell inherits SIGINT ignored."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def _import_app(import_path: str, directory: str | None = None) -> Any:
    """The Application at `module:attribute` (or `module.attribute`), imported from
    `directory` (default: the working directory)."""
    from ..client.application import Application, Deployment
    from ..client.imports import import_attr

    sys.path.insert(0, os.path.abspath(directory or os.getcwd()))
    try:
        target = import_attr(import_path)
    except (ImportError, AttributeError, ValueError) as exc:
        raise click.ClickException(f"cannot import {import_path!r}: {exc}") from exc
    if isinstance(target, Deployment):
        target = target.bind()
    if not isinstance(target, Application):
        raise click.ClickException(
            f"{import_path} is {type(target).__name__}, not an Application (call .bind())"
        )
    return target


# configs and the REST API ----------------------------------------------------------------------
def _api_options(command: Any) -> Any:
    """--address and --token, for each command that calls the controller's REST API."""
    command = click.option(
        "--token", envvar="BROKER_SERVE_API_TOKEN", default=None,
        help="The REST API's token [default: $BROKER_SERVE_API_TOKEN, else the controller's "
             "token file in the state directory]. Of a comma-separated list (as controllers "
             "take while a token is rotated), the first is sent.")(command)
    return click.option(
        "--address", "-a", envvar="BROKER_SERVE_ADDRESS", default=None,
        help="The REST API [default: $BROKER_SERVE_ADDRESS, else "
             "http://127.0.0.1:$BROKER_SERVE_DASHBOARD_PORT (8265), https:// where "
             "$BROKER_SERVE_HTTPS_CERT_FILE is set].")(command)


class _Dumper(yaml.SafeDumper):
    """YAML as `serve status` prints it, with multi-line messages (tracebacks) as blocks."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def _call(address: str | None, token: str | None, method: str, path: str, body: Any = None,
          timeout: float = 60.0) -> Any:
    from .rest_client import ApiError, RestClient

    try:
        return RestClient(_settings(), address, token).request(method, path, body, timeout)
    except ApiError as exc:
        raise click.ClickException(str(exc)) from exc


def _read_config(path: str) -> Any:
    """A config file: multi-application (ServeDeploySchema) or a single application."""
    from pydantic import ValidationError

    from ..schema import ServeApplicationSchema, ServeDeploySchema

    try:
        with open(path, encoding="utf-8") as file:
            data = yaml.safe_load(file)
        if isinstance(data, dict) and "applications" in data:
            return ServeDeploySchema.model_validate(data)
        return ServeDeploySchema(applications=[ServeApplicationSchema.model_validate(data)])
    except (OSError, yaml.YAMLError) as exc:
        raise click.ClickException(f"cannot read {path}: {exc}") from exc
    except ValidationError as exc:
        raise click.ClickException(f"{path} is not a valid config:\n{exc}") from exc


@cli.command(help="Deploy the applications of CONFIG_FILE (Ray Serve's config format) through "
                  "the REST API. Applications it does not list are deleted.")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@_api_options
def deploy(config_file: str, address: str | None, token: str | None) -> None:
    config = _read_config(config_file)
    answer = _call(address, token, "PUT", "/api/serve/applications/",
                   config.model_dump(mode="json", exclude_unset=True),
                   _settings().build_timeout_s + 120)
    click.echo("Sent deploy request successfully.")
    for name in answer.get("deleted", []):
        click.echo(f"Application {name!r} is not in the config: deleting it.")
    failed = {name: outcome["message"] for name, outcome in answer["applications"].items()
              if outcome["result"] == "failed"}
    for name, message in failed.items():
        click.echo(f"Application {name!r} failed to deploy: {message}", err=True)
    click.echo("Run `broker-serve status` to follow the deployment.")
    if failed:
        sys.exit(1)


@cli.command(name="config", help="Print the config of each application deployed from one, as "
                                 "YAML documents.")
@click.option("--name", "-n", default=None, help="Only this application.")
@_api_options
def config_command(name: str | None, address: str | None, token: str | None) -> None:
    from ..schema import ServeInstanceDetails

    details = ServeInstanceDetails.model_validate(
        _call(address, token, "GET", "/api/serve/applications/"))
    configs = [app.deployed_app_config for app in details.applications.values()
               if app.deployed_app_config is not None and name in (None, app.name)]
    if not configs:
        click.echo("No configuration was found.")
        return
    click.echo("---\n".join(_yaml(c.model_dump(mode="json", exclude_unset=True))
                            for c in configs), nl=False)


@cli.command(help="Print the status of the cluster's applications as YAML. With --address (or "
                  "$BROKER_SERVE_ADDRESS) it asks the REST API, otherwise it reads Redis.")
@click.option("--name", "-n", default=None, help="Only this application.")
@_api_options
def status(name: str | None, address: str | None, token: str | None) -> None:
    if address:
        from ..schema import ServeInstanceDetails

        result = ServeInstanceDetails.model_validate(
            _call(address, token, "GET", "/api/serve/applications/")).to_status()
    else:
        from .. import serve

        result = serve.status()  # ours, such as ClusterUnavailable, reach main()
    data = result.for_display()
    if name is not None:
        data["applications"] = {k: v for k, v in data["applications"].items() if k == name}
    click.echo(_yaml(data), nl=False)


@cli.command(help="Print the AsyncAPI 3.0 document of the wire protocol for APP's queues, "
                  "or for every application's: what to publish to each deployment and what "
                  "comes back (docs/protocol.md). Reads Redis.")
@click.argument("app", required=False)
@click.option("--yaml", "as_yaml", is_flag=True, help="Print YAML instead of JSON.")
def asyncapi(app: str | None, as_yaml: bool) -> None:
    from .. import __version__
    from ..protocol.asyncapi import Server, document

    settings = _settings()
    records = _read_store(settings, lambda store: store.apps())
    if app is not None:
        if app not in records:
            raise click.ClickException(f"no application {app!r} in cluster "
                                       f"{settings.cluster!r}")
        records = {app: records[app]}
    apps = {name: list(record["deployments"]) for name, record in records.items()}
    spec = document(settings.cluster, apps, __version__, Server.from_url(settings.amqp_url))
    if as_yaml:
        click.echo(_yaml(spec), nl=False)
    else:
        click.echo(orjson.dumps(spec, option=orjson.OPT_INDENT_2).decode())


@cli.command(help="Print the rabbitmqctl command that gives USER the RabbitMQ permissions of "
                  "ROLE in this cluster (docs/security.md, \"Per-role RabbitMQ users\"). A "
                  "backend reaches only the deployments given with --grant APP/DEPLOYMENT.")
@click.argument("role", type=click.Choice(ROLES))
@click.argument("user")
@click.option("--vhost", "-p", default="/", show_default=True)
@click.option("--grant", "grants", multiple=True, metavar="APP/DEPLOYMENT",
              help="A deployment a backend may publish to (repeatable).")
def permissions(role: str, user: str, vhost: str, grants: tuple[str, ...]) -> None:
    if grants and role != "backend":
        raise click.UsageError("--grant is for the backend role: the others reach every "
                               "deployment")
    deployments = []
    for grant in grants:
        app, slash, deployment = grant.rpartition("/")
        if not slash or not app or not deployment:
            raise click.BadParameter(f"{grant!r} is not APP/DEPLOYMENT", param_hint="--grant")
        deployments.append((app, deployment))
    granted = rabbitmq_permissions(_settings().cluster, role, deployments)
    click.echo(granted.rabbitmqctl(user, vhost))


@cli.command(help="Set the number of replicas of one deployment, in place: the others keep "
                  "running (Ray 0.8's per-backend num_replicas).")
@click.argument("app")
@click.argument("deployment")
@click.argument("num_replicas", type=click.IntRange(min=1))
@_api_options
def scale(app: str, deployment: str, num_replicas: int, address: str | None,
          token: str | None) -> None:
    from urllib.parse import quote

    _call(address, token, "PATCH",
          f"/api/serve/applications/{quote(app, safe='')}/deployments/"
          f"{quote(deployment, safe='')}", {"num_replicas": num_replicas})
    click.echo(f"Deployment {deployment!r} of application {app!r} is scaling to "
               f"{num_replicas} replica(s).")


@cli.command(help="Write a config file (Ray Serve's format) for the applications at "
                  "IMPORT_PATHS (module:app), with the options their code sets.")
@click.argument("import_paths", nargs=-1, required=True)
@click.option("--app-dir", "-d", default=".", show_default=True,
              help="Directory to import the applications from.")
@click.option("--output-path", "-o", default=None, type=click.Path(dir_okay=False),
              help="File to write [default: standard output].")
def build(import_paths: tuple[str, ...], app_dir: str, output_path: str | None) -> None:
    from ..schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    applications = []
    for index, import_path in enumerate(import_paths, 1):
        app = _import_app(import_path, app_dir)
        name = f"app{index}"
        prefix = app.deployment.route_prefix or ("/" if len(import_paths) == 1 else f"/{name}")
        deployments: dict[str, DeploymentSchema] = {}
        for node in app.walk():
            options = node.deployment.config.model_dump(mode="json", exclude_unset=True)
            options = {k: v for k, v in options.items() if k in DeploymentSchema.model_fields}
            if options.get("num_replicas", 0) is None:  # "auto": the autoscaling_config says
                del options["num_replicas"]
            deployments.setdefault(node.deployment.name, DeploymentSchema(
                name=node.deployment.name, **options))
        applications.append(ServeApplicationSchema(
            name=name, route_prefix=prefix, import_path=import_path,
            deployments=list(deployments.values())))
    config = ServeDeploySchema(applications=applications)
    # Ray's `serve build` writes grpc_options with their defaults, for users to fill in; a
    # config whose list of servicer functions is empty leaves the cluster's gRPC as it is
    # (controller/declarative.py). http_options are left out: deploying the file would move
    # the cluster's stored address.
    options = config.model_dump(mode="json", include={
        "grpc_options": {"port", "grpc_servicer_functions"}})
    written = {**options, **config.model_dump(mode="json", exclude_unset=True)}
    text = ("# Written by `broker-serve build`; deploy it with `broker-serve deploy FILE`.\n\n"
            + yaml.safe_dump(written, sort_keys=False))
    if output_path is None:
        click.echo(text, nl=False)
        return
    with open(output_path, "w", encoding="utf-8") as file:
        file.write(text)
    click.echo(f"Wrote the config to {output_path}.")


@cli.command(help="Delete every application of the cluster. With --address (or "
                  "$BROKER_SERVE_ADDRESS) through the REST API, otherwise through Redis.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@_api_options
def shutdown(yes: bool, address: str | None, token: str | None) -> None:
    if not yes:
        click.confirm("Delete every application of the cluster?", abort=True)
    if address:
        _call(address, token, "DELETE", "/api/serve/applications/", timeout=120)
    else:
        from .. import serve

        serve.shutdown()
    click.echo("All applications deleted.")


# dead letters -----------------------------------------------------------------------------------
@cli.group(help="List, show, replay and purge the dead letters: failed jobs and the messages "
                "RabbitMQ dead-lettered (docs/protocol.md, \"Dead letters\"), through the "
                "REST API.")
def dead() -> None:
    pass


_DEAD_COLUMNS = ("id", "app", "deployment", "reason", "error", "kind", "attempts", "dead_at",
                 "size")


@dead.command(name="list", help="List the dead letters, oldest first.")
@click.option("--app", default=None, help="Only this application's.")
@click.option("--deployment", default=None, help="Only this deployment's.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="Read at most this many dead letters.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_api_options
def dead_list(app: str | None, deployment: str | None, limit: int, as_json: bool,
              address: str | None, token: str | None) -> None:
    from urllib.parse import urlencode

    query = {k: v for k, v in {"app": app, "deployment": deployment, "limit": limit}.items()
             if v is not None}
    answer = _call(address, token, "GET", f"/api/serve/dead/?{urlencode(query)}")
    if as_json:
        click.echo(orjson.dumps(answer["dead_letters"], option=orjson.OPT_INDENT_2).decode())
        return
    if not answer["dead_letters"]:
        click.echo("No dead letters.")
        return
    rows = [[_dead_cell(name, letter.get(name)) for name in _DEAD_COLUMNS]
            for letter in answer["dead_letters"]]
    widths = [max(len(name), *(len(row[i]) for row in rows))
              for i, name in enumerate(_DEAD_COLUMNS)]
    for row in [[name.upper().replace("_", " ") for name in _DEAD_COLUMNS], *rows]:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _dead_cell(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name == "dead_at":
        import datetime

        return datetime.datetime.fromtimestamp(value, datetime.UTC).strftime(
            "%Y-%m-%d %H:%M:%S")
    return str(value)


@dead.command(name="show", help="Print one dead letter, with a preview of its body, as YAML.")
@click.argument("letter_id", metavar="ID")
@_api_options
def dead_show(letter_id: str, address: str | None, token: str | None) -> None:
    from urllib.parse import quote

    click.echo(_yaml(_call(address, token, "GET",
                           f"/api/serve/dead/{quote(letter_id, safe='')}")), nl=False)


def _dead_selection(command: Any) -> Any:
    """IDs, or --app (and --deployment), or --all: which dead letters a command acts on."""
    for option in (
        click.option("--all", "everything", is_flag=True, help="Every dead letter."),
        click.option("--deployment", default=None, help="The dead letters of this deployment."),
        click.option("--app", default=None, help="The dead letters of this application."),
        click.argument("ids", nargs=-1, metavar="[ID]..."),
    ):
        command = option(command)
    return command


def _dead_selector(ids: tuple[str, ...], app: str | None, deployment: str | None,
                   everything: bool) -> dict[str, Any]:
    if everything == bool(ids or app or deployment):
        raise click.ClickException("name the dead letters: IDs, --app APP [--deployment "
                                   "DEPLOYMENT], or --all alone")
    if everything:
        return {"all": True}
    return {k: v for k, v in {"ids": list(ids), "app": app, "deployment": deployment}.items()
            if v}


@dead.command(name="replay", help="Publish dead letters again to the queues they came from "
                                  "(a job's record goes back to PENDING), then drop them.")
@_dead_selection
@_api_options
def dead_replay(ids: tuple[str, ...], app: str | None, deployment: str | None,
                everything: bool, address: str | None, token: str | None) -> None:
    answer = _call(address, token, "POST", "/api/serve/dead/replay",
                   _dead_selector(ids, app, deployment, everything))
    click.echo(f"Replayed {answer['replayed']} dead letter(s).")
    for letter_id, why in answer["kept"].items():
        click.echo(f"Kept {letter_id}: {why}.", err=True)
    if answer["kept"]:
        sys.exit(1)


@dead.command(name="purge", help="Drop dead letters for good.")
@_dead_selection
@_api_options
def dead_purge(ids: tuple[str, ...], app: str | None, deployment: str | None,
               everything: bool, address: str | None, token: str | None) -> None:
    answer = _call(address, token, "POST", "/api/serve/dead/purge",
                   _dead_selector(ids, app, deployment, everything))
    click.echo(f"Purged {answer['purged']} dead letter(s).")


@cli.command(help="Print latency percentiles (p50, p90, p95) and request counts per deployment "
                  "and per endpoint over windows, from the metrics history the cluster keeps "
                  "in Redis: every window up to the history window (gc_window_seconds) is "
                  "full at once. With --url it samples those Prometheus endpoints itself "
                  "instead, so a window fills in once the command has run that long.")
@click.option("--url", "urls", multiple=True,
              help="Read this metrics endpoint instead of the history, repeatable (a proxy's "
                   "/-/metrics, a worker node's /metrics, the controller's /metrics).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds between tables (with --url: between samples).")
@click.option("--windows", default="10,60,300", show_default=True,
              help="Window lengths in seconds, comma-separated.")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Stop after this many tables [default: run until Ctrl-C].")
def stats(urls: tuple[str, ...], interval: float, windows: str, count: int | None) -> None:
    from ..exceptions import ClusterUnavailable, StateError
    from ..observability import stats

    try:
        lengths = sorted({float(w) for w in windows.split(",") if w.strip()})
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--windows") from exc
    if not lengths or min(lengths) <= 0 or not all(math.isfinite(w) for w in lengths):
        raise click.BadParameter("give positive lengths", param_hint="--windows")
    settings = _settings()
    try:
        if urls:
            stats.run(settings, list(urls), interval, lengths, count, click.echo)
        else:
            stats.run_history(settings, interval, lengths, count, click.echo)
    except KeyboardInterrupt:
        pass
    except stats.WindowTooLong as exc:
        raise click.BadParameter(str(exc), param_hint="--windows") from exc
    except (ClusterUnavailable, StateError) as exc:
        raise click.ClickException(_unreachable(settings, exc, " to read the history")) from exc


def main() -> None:
    die_with_parent_if_asked()
    try:
        cli(prog_name="broker-serve")
    except BrokerServeError as exc:  # expected trouble, such as an unreachable cluster
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:  # noqa: BLE001 - the CLI's catch-all: a bug ends in one clear line
        if isinstance(exc, ValidationError) and exc.title == Settings.__name__:
            click.echo(f"Error: {exc}", err=True)  # names the BROKER_SERVE_ variable at fault
            sys.exit(1)
        traceback.print_exc()
        click.echo("Error: broker-serve failed unexpectedly; the traceback above says where.",
                   err=True)
        sys.exit(1)
