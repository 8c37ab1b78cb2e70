"""Declarative configs, the REST API with its token, and the CLI that uses them, end to end:
`broker-serve start`, then `deploy`, `config`, `status`, `scale`, `build` and `shutdown`, and
raw REST calls with and without the token."""

from __future__ import annotations

import copy
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from broker_serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from .conftest import ROOT, Cluster
from .waiting import wait_for

BROKER_SERVE = [sys.executable, "-m", "broker_serve"]

SHOP = '''
import os

from starlette.requests import Request

from broker_serve import serve


@serve.deployment
class Greeter:
    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting
        self.suffix = ""

    def reconfigure(self, config: dict) -> None:
        self.suffix = (config or {}).get("suffix", "")

    async def __call__(self, request: Request) -> dict:
        return {"greeting": self.greeting + self.suffix, "pid": os.getpid()}


greeter = Greeter.bind("hi")
'''

# An application builder, in a runtime_env working_dir of its own.
ECHOES = '''
from pydantic import BaseModel

from broker_serve import serve


class EchoArgs(BaseModel):
    word: str


@serve.deployment
class Echo:
    def __init__(self, word: str) -> None:
        self.word = word

    def __call__(self) -> str:
        return self.word


def build_echo(args: EchoArgs):
    return Echo.bind(args.word)
'''

# Counts its imports in imports.log, then fails to import a dependency.
BROKEN = '''
import pathlib

with open(pathlib.Path(__file__).with_name("imports.log"), "a") as log:
    log.write("imported\\n")

import a_dependency_that_is_not_installed  # noqa: F401
'''

CONFIG = {
    "applications": [
        {"name": "one", "route_prefix": "/one", "import_path": "shop:greeter",
         "deployments": [{"name": "Greeter", "user_config": {"suffix": "!"}}]},
        {"name": "two", "route_prefix": "/two", "import_path": "echoes:build_echo",
         "runtime_env": {"working_dir": "extra"}, "args": {"word": "hey"}},
    ],
}


def answer(url: str) -> requests.Response | None:
    try:
        response = requests.get(url, timeout=10)
    except requests.ConnectionError:
        return None
    return response if response.status_code == 200 else None


class Cli:
    def __init__(self, cluster: Cluster, app_dir: Path) -> None:
        self.env = cluster.env
        self.app_dir = app_dir
        self.api = f"http://127.0.0.1:{cluster.env['BROKER_SERVE_DASHBOARD_PORT']}"

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*BROKER_SERVE, *args], check=False, env=self.env,
                                cwd=self.app_dir, capture_output=True, text=True, timeout=120)
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def status(self) -> dict[str, Any]:
        return yaml.safe_load(self("status", "--address", self.api).stdout)

    @property
    def token(self) -> str:
        state = Path(self.env["BROKER_SERVE_STATE_DIR"]) / self.env["BROKER_SERVE_CLUSTER"]
        return (state / "api-token").read_text().strip()


@pytest.fixture
def cli(cluster: Cluster, tmp_path: Path) -> Iterator[Cli]:
    """A detached cluster whose controller and worker import from an app directory."""
    app_dir = tmp_path / "apps"
    app_dir.mkdir()
    (app_dir / "shop.py").write_text(SHOP)
    (app_dir / "broken.py").write_text(BROKEN)
    (app_dir / "extra").mkdir()
    (app_dir / "extra" / "echoes.py").write_text(ECHOES)
    runner = Cli(cluster, app_dir)
    runner("start", "--http-port", str(cluster.port), "--app-dir", str(app_dir))
    try:
        yield runner
    finally:
        runner("stop", check=False)


def test_config_file_deployed_scaled_and_redeployed_with_the_cli(cluster, cli):
    config = copy.deepcopy(CONFIG)
    config_file = cli.app_dir / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    deploy = cli("deploy", str(config_file))
    assert "Sent deploy request successfully." in deploy.stdout

    # Both applications serve: the config's user_config override, and the builder's args
    # and working_dir.
    first = wait_for(lambda: answer(f"{cluster.url}/one")).json()
    assert first["greeting"] == "hi!"
    assert wait_for(lambda: answer(f"{cluster.url}/two")).text == "hey"

    # `config` prints back what was deployed, one YAML document per application.
    printed = list(yaml.safe_load_all(cli("config").stdout))
    assert printed == config["applications"]
    status = wait_for(lambda: (s := cli.status())["applications"]["two"]["status"] == "RUNNING"
                      and s)
    assert status["applications"]["one"]["status"] == "RUNNING"
    assert status["applications"]["one"]["deployments"]["Greeter"]["replica_states"] == {
        "RUNNING": 1}

    # Scale in place: a second replica joins, the first one keeps running.
    assert "scaling to 2" in cli("scale", "one", "Greeter", "2").stdout
    wait_for(lambda: cli.status()["applications"]["one"]["deployments"]["Greeter"]
             ["replica_states"] == {"RUNNING": 2})
    pids = wait_for(lambda: _two_pids(f"{cluster.url}/one"))
    assert first["pid"] in pids
    assert {"name": "Greeter", "num_replicas": 2, "user_config": {"suffix": "!"}} in \
        yaml.safe_load(cli("config", "--name", "one").stdout)["deployments"]

    # A redeploy without `two` deletes it; `one` keeps its replicas (same code and config).
    del config["applications"][1]
    config_file.write_text(yaml.safe_dump(config))
    redeploy = cli("deploy", str(config_file))
    assert "'two' is not in the config" in redeploy.stdout
    wait_for(lambda: requests.get(f"{cluster.url}/two", timeout=10).status_code == 404)
    assert list(yaml.safe_load_all(cli("config").stdout)) == config["applications"]
    assert "two" not in cli.status()["applications"]
    assert answer(f"{cluster.url}/one").json()["pid"] in pids

    cli("shutdown", "-y", "--address", cli.api)
    assert requests.get(f"{cluster.url}/one", timeout=10).status_code == 404
    assert cli("config").stdout.strip() == "No configuration was found."


def _two_pids(url: str) -> set[int] | None:
    seen = {answer(url).json()["pid"] for _ in range(8)}  # type: ignore[union-attr]
    return seen if len(seen) == 2 else None


def test_rest_api_token_validation_and_failed_imports(cluster, cli):
    token_file = (Path(cluster.env["BROKER_SERVE_STATE_DIR"]) / cluster.name / "api-token")
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    applications = f"{cli.api}/api/serve/applications/"
    calls = [("GET", applications), ("PUT", applications), ("DELETE", applications),
             ("PATCH", f"{applications}one/deployments/Greeter"),
             ("GET", f"{cli.api}/api/serve/deployments/"),
             ("GET", f"{cli.api}/api/serve/deployments/status"),
             ("GET", f"{cli.api}/api/serve/capacity/")]
    for method, url in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": cli.token}):
            refused = requests.request(method, url, headers=headers, json=CONFIG, timeout=10)
            assert refused.status_code == 401, (method, url, headers)
            assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = cli("config", "--token", "wrong", check=False)
    assert wrong.returncode != 0 and "refused the token" in wrong.stderr

    auth = {"Authorization": f"Bearer {cli.token}"}
    assert requests.get(applications, headers=auth, timeout=10).json()["applications"] == {}
    v1 = requests.get(f"{cli.api}/api/serve/deployments/status", headers=auth, timeout=10)
    assert v1.json()["app_status"]["status"] == "NOT_STARTED"
    capacity = f"{cli.api}/api/serve/capacity/"
    assert requests.get(capacity, headers=auth, timeout=10).json() == {
        "target_replicas": 0, "running_replicas": 0}

    # Bad payloads: not JSON is 400, a schema violation 422 with pydantic's errors.
    not_json = requests.put(applications, headers=auth, data=b"{oops", timeout=10)
    assert not_json.status_code == 400
    invalid = requests.put(applications, headers=auth, timeout=10, json={"applications": [
        {"name": "a", "import_path": "shop:greeter", "route_prefix": "no-slash"}]})
    assert invalid.status_code == 422
    (error,) = invalid.json()["detail"]
    assert error["loc"] == ["applications", 0, "route_prefix"]
    assert "must start with '/'" in error["msg"]

    # An import error is DEPLOY_FAILED with the message, and is not retried by itself.
    put = requests.put(applications, headers=auth, timeout=120, json={"applications": [
        {"name": "broken", "route_prefix": "/broken", "import_path": "broken:app"}]})
    assert put.status_code == 200
    assert put.json()["applications"]["broken"]["result"] == "failed"
    details = requests.get(applications, headers=auth, timeout=10).json()
    broken = details["applications"]["broken"]
    assert broken["status"] == "DEPLOY_FAILED"
    assert "No module named 'a_dependency_that_is_not_installed'" in broken["message"]
    assert broken["deployed_app_config"]["import_path"] == "broken:app"
    status = cli("status").stdout  # through Redis, without --address
    assert "DEPLOY_FAILED" in status and "a_dependency_that_is_not_installed" in status
    time.sleep(3)
    assert (cli.app_dir / "imports.log").read_text().count("imported") == 1

    # The V1 API: one application, named default, replacing the others.
    v1_put = requests.put(f"{cli.api}/api/serve/deployments/", headers=auth, timeout=120,
                          json={"import_path": "broken:app", "route_prefix": "/v1"})
    assert v1_put.json() == {"applications": {"default": {
        "result": "failed", "message": v1_put.json()["applications"]["default"]["message"]}},
        "deleted": []}
    assert requests.get(f"{cli.api}/api/serve/deployments/", headers=auth, timeout=10).json() \
        == {"import_path": "broken:app", "route_prefix": "/v1"}
    v1 = requests.get(f"{cli.api}/api/serve/deployments/status", headers=auth, timeout=10).json()
    assert v1["name"] == "default" and v1["app_status"]["status"] == "DEPLOY_FAILED"
    assert "broken" not in cli.status()["applications"]

    # `build` writes a config that deploys (and replaces the failed application).
    cli("build", "shop:greeter", "-o", "built.yaml")
    built = yaml.safe_load((cli.app_dir / "built.yaml").read_text())
    assert built["applications"] == [{"name": "app1", "route_prefix": "/",
                                      "import_path": "shop:greeter",
                                      "deployments": [{"name": "Greeter"}]}]
    cli("deploy", "built.yaml")
    assert wait_for(lambda: answer(cluster.url)).json()["greeting"] == "hi"
    assert set(cli.status()["applications"]) == {"app1"}
    # What KEDA scales the worker nodes on (deploy/k8s): the one Greeter replica.
    def capacity_once_running() -> dict[str, int] | None:
        reading: dict[str, int] = requests.get(capacity, headers=auth, timeout=10).json()
        return reading if reading["running_replicas"] else None

    assert wait_for(capacity_once_running) == {"target_replicas": 1, "running_replicas": 1}


def test_schemas_follow_ray():
    example = yaml.safe_load((ROOT / "deploy" / "serve-config.yaml").read_text())
    config = ServeDeploySchema.model_validate(example)
    assert config.applications[0].import_path == "examples.hello:app"
    app = ServeApplicationSchema.model_validate(
        {"import_path": "text_ml.app", "deployments": [
            {"name": "Translator", "user_config": {"language": "french"},
             "max_concurrent_queries": 10, "ray_actor_options": {"num_cpus": 1},
             "placement_group_strategy": "PACK"}]})
    assert app.model_dump(exclude_unset=True)["deployments"][0]["name"] == "Translator"
    assert app.deployments[0].options() == {
        "user_config": {"language": "french"}, "max_concurrent_queries": 10,
        "ray_actor_options": {"num_cpus": 1.0}}
    with pytest.raises(ValueError, match="application names must be unique"):
        ServeDeploySchema.model_validate({"applications": [
            {"name": "a", "import_path": "m:a", "route_prefix": "/a"},
            {"name": "a", "import_path": "m:b", "route_prefix": "/b"}]})
    with pytest.raises(ValueError, match="route prefixes must be unique"):
        ServeDeploySchema.model_validate({"applications": [
            {"name": "a", "import_path": "m:a"}, {"name": "b", "import_path": "m:b"}]})
    with pytest.raises(ValueError, match="exclusive"):
        DeploymentSchema(name="d", num_replicas=2, autoscaling_config={"max_replicas": 3})
    with pytest.raises(ValueError, match="Extra inputs"):
        ServeApplicationSchema.model_validate({"import_path": "m:a", "unknown": 1})
    assert os.environ.get("BROKER_SERVE_API_TOKEN") is None  # the tests use the token file


def test_config_code_travels_by_reference(tmp_path, monkeypatch):
    """A worker imports a config's code: the pickle names the class behind @serve.deployment
    and carries a digest of the source, not the code."""
    import pickle

    import cloudpickle

    from broker_serve.client.imports import by_reference, code_digest, import_attr

    (tmp_path / "refmod.py").write_text(
        "from broker_serve import serve\n\n"
        "@serve.deployment\nclass Model:\n    def predict(self):\n        return 'unique-body'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    deployment = import_attr("refmod:Model")
    digest = code_digest(str(tmp_path))
    pickled = cloudpickle.dumps(by_reference(deployment.func_or_class, digest))
    assert b"unique-body" not in pickled and digest.encode() in pickled
    assert pickle.loads(pickled) is deployment.func_or_class
    (tmp_path / "refmod.py").write_text((tmp_path / "refmod.py").read_text() + "# changed\n")
    assert code_digest(str(tmp_path)) != digest


def test_a_second_controller_takes_the_rest_api_over_when_its_port_frees(cluster, monkeypatch):
    """Two controllers on one host: the second waits for the port, then serves the API."""
    import asyncio

    from broker_serve.controller import rest
    from broker_serve.settings import Settings
    from broker_serve.state.store import Store

    monkeypatch.setattr(rest, "LISTEN_RETRY_S", 0.1)
    settings = Settings.from_env()
    url = f"http://127.0.0.1:{settings.dashboard_port}/api/serve/applications/"

    def get(token: str) -> int:
        headers = {"Authorization": f"Bearer {token}"}
        return requests.get(url, headers=headers, timeout=5).status_code

    async def scenario() -> None:
        store = Store(settings.redis_url, settings.cluster)
        first = await rest.serve_rest_api(settings, store)
        second = await rest.serve_rest_api(settings, store)
        token = (Path(cluster.env["BROKER_SERVE_STATE_DIR"]) / cluster.name / "api-token"
                 ).read_text().strip()
        assert second.server is None  # waiting: the first one has the port
        assert await asyncio.to_thread(get, token) == 200
        await first.stop()
        for _ in range(50):
            if second.server is not None and second.server.started:
                break
            await asyncio.sleep(0.1)
        assert await asyncio.to_thread(get, token) == 200  # the same token file
        assert await asyncio.to_thread(get, "wrong") == 401
        await second.stop()
        await store.close()

    asyncio.run(scenario())
