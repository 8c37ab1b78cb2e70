"""The tree shows the architecture (docs/architecture.md, "Where things live"), and keeps it."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "broker_serve"
PARTS = ("cli", "client", "controller", "node", "observability", "protocol", "proxy", "replica",
         "state", "transport")

# Ray's module paths, with names Ray programs import from them.
RAY_PATHS = {
    "serve": ["deployment", "run", "ingress", "batch", "multiplexed", "get_app_handle"],
    "config": ["AutoscalingConfig", "DeploymentConfig", "HTTPOptions", "gRPCOptions"],
    "schema": ["ServeDeploySchema", "ServeApplicationSchema", "ServeInstanceDetails"],
    "handle": ["DeploymentHandle", "DeploymentResponse", "DeploymentResponseGenerator"],
    "deployment": ["Application", "Deployment", "deployment"],
    "context": ["ReplicaContext", "get_replica_context"],
    "batching": ["batch"],
    "multiplex": ["multiplexed", "get_multiplexed_model_id"],
    "exceptions": ["BrokerServeError", "RayServeException"],
}


def test_imports_run_downward():
    lint_imports = pathlib.Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([lint_imports, "--no-cache"], cwd=PACKAGE.parent, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout


def test_the_contract_names_every_part():
    contract = (PACKAGE.parent / ".importlinter").read_text()
    top_level = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    for name in (*PARTS, *top_level):
        assert f"broker_serve.{name}" in contract, f"{name} has no layer in .importlinter"


@pytest.mark.parametrize("part", PARTS)
def test_each_part_is_a_package_that_says_what_it_is(part):
    init = PACKAGE / part / "__init__.py"
    assert ast.get_docstring(ast.parse(init.read_text())), f"{part}/__init__.py has no docstring"
    for module in (PACKAGE / part).glob("*.py"):
        assert ast.get_docstring(ast.parse(module.read_text())), f"{module} has no docstring"


def test_no_flat_private_modules_at_the_top():
    private = sorted(p.name for p in PACKAGE.glob("_*.py") if p.name not in
                     ("__init__.py", "__main__.py"))
    assert private == []


@pytest.mark.parametrize(("module", "names"), sorted(RAY_PATHS.items()))
def test_ray_module_paths_stay_importable(module, names):
    imported = importlib.import_module(f"broker_serve.{module}")
    for name in names:
        assert getattr(imported, name) is not None, f"broker_serve.{module}.{name}"


def test_facades_give_the_same_objects_as_serve():
    from broker_serve import batching, deployment, handle, multiplex, serve

    assert deployment.Deployment is serve.Deployment
    assert handle.DeploymentHandle is serve.DeploymentHandle
    assert batching.batch is serve.batch
    assert multiplex.multiplexed is serve.multiplexed


def test_ray1_calls_live_on_the_public_deployment():
    from broker_serve import serve

    @serve.deployment
    def f() -> str:
        return "x"

    assert isinstance(f, serve.Deployment)
    assert isinstance(f.options(name="g"), serve.Deployment)
    for call in ("deploy", "get_handle", "delete", "bind", "options"):
        assert callable(getattr(f, call))
