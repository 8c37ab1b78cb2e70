"""The build subprocess of a config application: `python -m broker_serve.client.config_build`.

The controller runs it in the application's import directory, in the application's runtime_env
(its interpreter, `PYTHONPATH` and `env_vars`), with, on stdin, the JSON
`{"app": <ServeApplicationSchema>, "cluster", "secret" (hex), "import_dir", "base_dir",
"packages"}`: where to import from, what relative runtime_env paths are relative to, and the
packages the controller already resolved for the application's runtime_env, by
`"<kind>:<source>"`.
It imports the application, applies the config's per-deployment overrides, and builds it with
`build.build_application`, as `serve.run` does, pickling the user's code by reference. On stdout it
writes msgpack: `{"record", "specs"}`, or `{"error"}` with the traceback. User code runs with
fd 1 pointing to stderr, so whatever it prints cannot corrupt the answer.

It runs in a process of its own so that user code never runs in the controller, a broken import
cannot take the controller down, and each application gets a fresh `sys.modules`.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import traceback
import typing
from typing import Any, BinaryIO

import orjson
from pydantic import BaseModel

from ..exceptions import BuildFailed, RayServeException
from ..protocol import messages
from ..protocol.names import Names
from ..runtime_env.environment import Resolver
from ..schema import ServeApplicationSchema
from ..settings import Settings
from .application import Application, Deployment
from .build import build_application
from .imports import by_reference, code_digest, import_attr


def main() -> None:
    answer = _claim_stdout()
    request = orjson.loads(sys.stdin.buffer.read())
    try:
        result: dict[str, Any] = build(request)
    except BuildFailed as exc:  # a mistake in the config or the code it names: no traceback
        result = {"error": str(exc)}
    # User code may raise anything; it becomes the answer.
    except BaseException as exc:  # noqa: BLE001
        name = request.get("app", {}).get("name", "default")
        path = request.get("app", {}).get("import_path", "?")
        result = {"error": f"Building application {name!r} from {path!r} failed:\n"
                           f"{user_traceback(exc)}"}
    answer.write(messages.pack(result))
    answer.flush()


def user_traceback(exc: BaseException) -> str:
    """The traceback without the frames of broker-serve and importlib: what the user's code
    did. A module that is not found is only its error line."""
    ours = os.path.dirname(os.path.abspath(__file__)) + os.sep
    report = traceback.TracebackException.from_exception(exc)
    report.stack = traceback.StackSummary.from_list([
        frame for frame in report.stack
        if not frame.filename.startswith((ours, "<frozen importlib"))
        and os.sep + "importlib" + os.sep not in frame.filename])
    return "".join(report.format()).rstrip()


def _claim_stdout() -> BinaryIO:
    """Keep fd 1 for the answer, and point fd 1 (and sys.stdout) at stderr for user code."""
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return answer


def build(request: dict[str, Any]) -> dict[str, Any]:

    config = ServeApplicationSchema.model_validate(request["app"])
    import_dir = request["import_dir"]
    sys.path.insert(0, import_dir)
    resolver = Resolver.from_settings(Settings(), request.get("base_dir") or import_dir)
    resolver.known.update(request.get("packages") or {})
    app = load_application(config)
    route_prefix = (config.route_prefix if "route_prefix" in config.model_fields_set
                    else app.deployment.route_prefix or "/")
    reference = functools.partial(by_reference, code_digest=code_digest(import_dir))
    try:
        record, specs = build_application(
            app, config.name, route_prefix, Names(request["cluster"]),
            bytes.fromhex(request["secret"]), reference=reference,
            # the worker node puts its app dir and the runtime_env's folders on PYTHONPATH
            sys_path=[], resolver=resolver, runtime_env=config.runtime_env,
        )
    except RayServeException as exc:  # an application Ray refuses (two ingresses): its words
        raise BuildFailed(str(exc)) from exc
    record["source"] = "declarative"
    return {"record": record, "specs": specs}


def load_application(config: ServeApplicationSchema) -> Application:
    """The application `import_path` names, with `args` given and overrides applied."""
    target = import_attr(config.import_path)
    if isinstance(target, (Application, Deployment)):
        if config.args:
            raise BuildFailed(f"{config.import_path} is an application, not a builder "
                             "function: it cannot take `args`")
        app = target.bind() if isinstance(target, Deployment) else target
    elif callable(target):
        app = _call_builder(target, config.args)
    else:
        raise BuildFailed(f"{config.import_path} is a {type(target).__name__}, not an "
                         "application, a deployment or an application builder")
    apply_overrides(app, config)
    return app


def _call_builder(builder: Any, args: dict[str, Any]) -> Application:
    """Ray's application builder: `builder(args)`, validated into the parameter's pydantic
    model when it is annotated with one."""
    parameters = list(inspect.signature(builder).parameters.values())
    if not parameters:
        result = builder()
    else:
        try:
            hint = typing.get_type_hints(builder).get(parameters[0].name)
        except Exception:  # noqa: BLE001 - unresolvable user hints mean no hint
            hint = None
        value: Any = args
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            value = hint.model_validate(args)
        result = builder(value)
    if isinstance(result, Deployment):
        result = result.bind()
    if not isinstance(result, Application):
        raise BuildFailed(f"the application builder returned a {type(result).__name__}, not "
                         "an application (call .bind())")
    return result


def apply_overrides(app: Application, config: ServeApplicationSchema) -> None:
    by_name: dict[str, list[Application]] = {}
    for node in app.walk():
        by_name.setdefault(node.deployment.name, []).append(node)
    for override in config.deployments:
        nodes = by_name.get(override.name)
        if not nodes:
            raise BuildFailed(f"deployment {override.name!r} is not in application "
                             f"{config.name!r}; it has {sorted(by_name)}")
        for node in nodes:
            try:
                node.deployment = node.deployment.options(**override.options())
            except (TypeError, ValueError) as exc:
                raise BuildFailed(f"the config's options for deployment {override.name!r} of "
                                 f"application {config.name!r} are invalid: {exc}") from exc


if __name__ == "__main__":
    main()
