"""The `broker-serve` command (also `python -m broker_serve`)."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from typing import Any

import click
import orjson
import yaml

from ._logging import setup_logging
from ._settings import Settings


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@click.group(help="Ray Serve's programming model on RabbitMQ and Redis.")
@click.version_option(package_name="broker-serve")
def cli() -> None:
    pass


# the processes of a cluster ---------------------------------------------------------------------
@cli.command(help="Run the controller of the cluster (one leads, others stand by).")
def controller() -> None:
    from . import controller as module

    settings = _settings()
    setup_logging(settings.log_level, "controller")
    _use_uvloop()
    module.main(settings)


@cli.command(help="Run an HTTP proxy.")
@click.option("--host", default=None, help="Interface to listen on [default: 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port to listen on [default: 8000].")
def proxy(host: str | None, port: int | None) -> None:
    from .config import HTTPOptions
    from .proxy import serve_proxy

    settings = _settings()
    setup_logging(settings.log_level, "proxy")
    options = _stored_http_options(settings)
    updates = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    options = HTTPOptions.model_validate({**options.model_dump(), **updates})
    _use_uvloop()
    asyncio.run(serve_proxy(settings, options))


def _stored_http_options(settings: Settings) -> Any:
    """The http_options `serve.start` stored for the cluster, if any."""
    import redis

    from ._names import Names
    from .config import HTTPOptions

    client = redis.Redis.from_url(settings.redis_url)
    try:
        raw = client.get(Names(settings.cluster).http_options)
    except redis.RedisError as exc:
        raise click.ClickException(f"cannot reach Redis at {settings.redis_url}: {exc}") from exc
    finally:
        client.close()
    return HTTPOptions.model_validate_json(raw) if raw else HTTPOptions()


@cli.command(help="Run a worker node that hosts replica processes.")
@click.option("--node-id", default=None, help="Stable id of this node [default: host-pid].")
@click.option("--num-cpus", type=float, default=None, help="CPUs to offer [default: all].")
@click.option("--num-gpus", type=float, default=0, show_default=True, help="GPUs to offer.")
@click.option("--resources", default="{}", show_default=True,
              help='Custom resources to offer, as JSON: \'{"model_slot": 4}\'.')
def worker(node_id: str | None, num_cpus: float | None, num_gpus: float, resources: str) -> None:
    from . import worker as module

    try:
        offered = {"GPU": num_gpus, **orjson.loads(resources)} if num_gpus else \
            dict(orjson.loads(resources))
        offered = {str(name): float(amount) for name, amount in offered.items()}
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise click.BadParameter(f"expected a JSON object of numbers: {exc}",
                                 param_hint="--resources") from exc
    settings = _settings()
    setup_logging(settings.log_level, "worker")
    module.main(settings, node_id, num_cpus, offered)


# local clusters -----------------------------------------------------------------------------
@cli.command(help="Start a local cluster (controller, proxy, worker) in the background.")
@click.option("--http-host", default="127.0.0.1", show_default=True)
@click.option("--http-port", type=int, default=8000, show_default=True)
def start(http_host: str, http_port: int) -> None:
    from ._local import LocalCluster, state_dir

    settings = _settings()
    if _controller_running(settings):
        raise click.ClickException(f"cluster {settings.cluster!r} is already running")
    cluster = LocalCluster(settings, http_host, http_port, detached=True)
    try:
        cluster.start()
    except Exception as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"Started cluster {settings.cluster!r}: proxy on http://{http_host}:{http_port}, "
               f"logs in {state_dir(settings.cluster)}")


@cli.command(help="Stop the local cluster that `broker-serve start` started.")
def stop() -> None:
    from ._local import stop_detached

    settings = _settings()
    stopped = stop_detached(settings.cluster)
    if stopped:
        click.echo(f"Stopped {', '.join(stopped)} of cluster {settings.cluster!r}.")
    else:
        click.echo(f"No local cluster {settings.cluster!r} was running.")


def _controller_running(settings: Settings) -> bool:
    import redis

    from ._names import Names

    client = redis.Redis.from_url(settings.redis_url)
    try:
        return bool(client.exists(Names(settings.cluster).controller_lease))
    except redis.RedisError as exc:
        raise click.ClickException(f"cannot reach Redis at {settings.redis_url}: {exc}") from exc
    finally:
        client.close()


# applications -------------------------------------------------------------------------------
@cli.command(help="Deploy IMPORT_PATH (module:app) and serve it in the foreground.")
@click.argument("import_path")
@click.option("--name", default="default", show_default=True, help="Application name.")
@click.option("--route-prefix", default=None, help="Route prefix [default: the app's or '/'].")
@click.option("--host", default=None, help="Proxy host, if a local cluster is started.")
@click.option("--port", type=int, default=None, help="Proxy port, if a local cluster is started.")
def run(import_path: str, name: str, route_prefix: str | None, host: str | None,
        port: int | None) -> None:
    from . import serve

    setup_logging(_settings().log_level, "run")
    target = _import_app(import_path)
    if host or port:
        serve.start(http_options={k: v for k, v in {"host": host, "port": port}.items() if v})
    kwargs = {"route_prefix": route_prefix} if route_prefix is not None else {}
    try:
        serve.run(target, name=name, **kwargs)
    except Exception as exc:
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


def _import_app(import_path: str) -> Any:
    from .deployment import Application, Deployment

    if ":" not in import_path:
        raise click.ClickException(f"expected module:attribute, got {import_path!r}")
    module_name, attribute = import_path.split(":", 1)
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.ClickException(f"cannot import {module_name!r}: {exc}") from exc
    target = getattr(module, attribute, None)
    if isinstance(target, Deployment):
        target = target.bind()
    if not isinstance(target, Application):
        raise click.ClickException(
            f"{import_path} is {type(target).__name__}, not an Application (call .bind())"
        )
    return target


@cli.command(help="Print the status of the cluster's applications as YAML.")
def status() -> None:
    from . import serve

    try:
        result = serve.status()
    except Exception as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(yaml.safe_dump(result.model_dump(mode="json"), sort_keys=False), nl=False)


@cli.command(help="Delete every application of the cluster.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
def shutdown(yes: bool) -> None:
    from . import serve

    if not yes:
        click.confirm("Delete every application of the cluster?", abort=True)
    serve.shutdown()
    click.echo("All applications deleted.")


def main() -> None:
    cli(prog_name="broker-serve")
