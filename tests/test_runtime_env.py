"""runtime_env end to end, as Ray Serve users write it: the seed's V1 config deploying from a
zip served over HTTP, env_vars, py_modules and pip per application and per deployment, the
caches reused by a second deploy, and each bad input failing its deploy with a clear message
while the running version keeps serving (docs/architecture.md, "Runtime environments")."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import Cluster, free_port
from .runtime_env_files import FileServer, file_server, pure_python_wheel, zip_of
from .waiting import wait_for

BROKER_SERVE = [sys.executable, "-m", "broker_serve"]

# Ray's serve_config_examples text_ml.py, with its models replaced by string work: the same
# deployments, handle call and user_config.
TEXT_ML = '''
from starlette.requests import Request

from broker_serve import serve
from broker_serve.handle import DeploymentHandle


@serve.deployment
class Translator:
    def __init__(self) -> None:
        self.language = "english"

    def reconfigure(self, config: dict) -> None:
        self.language = config.get("language", "english")

    def translate(self, text: str) -> str:
        return f"[{self.language}{MARK}] {text}"


@serve.deployment
class Summarizer:
    def __init__(self, translator: DeploymentHandle) -> None:
        self.translator = translator

    def summarize(self, text: str) -> str:
        return text.split(". ")[0]

    async def __call__(self, http_request: Request) -> str:
        english_text: str = await http_request.json()
        return await self.translator.translate.remote(self.summarize(english_text))


app = Summarizer.bind(Translator.bind())
'''


def text_ml_archive(mark: str = "") -> bytes:
    """As GitHub serves `archive/HEAD.zip`: everything inside one top-level folder."""
    return zip_of({"serve_config_examples-HEAD/": "",
                   "serve_config_examples-HEAD/README.md": "examples\n",
                   "serve_config_examples-HEAD/text_ml.py": TEXT_ML.replace("{MARK}", mark)})


# Reports what its replica runs with.
PROBE = '''
import os
import sys

from broker_serve import serve


@serve.deployment
class Probe:
    def __init__(self, built_with: str | None) -> None:
        self.built_with = built_with

    def __call__(self) -> dict:
        import bs_probe_pkg  # from pip
        import helper  # from py_modules

        return {"greeting": os.environ.get("GREETING"), "level": os.environ.get("LEVEL"),
                "cluster_setting": os.environ.get("BROKER_SERVE_CLUSTER"),
                "cwd": os.getcwd(), "helper": helper.VALUE, "pkg": bs_probe_pkg.VALUE,
                "pkg_file": bs_probe_pkg.__file__, "prefix": sys.prefix, "pid": os.getpid(),
                "built_with": self.built_with}


def build(args: dict) -> serve.Application:
    """Runs in the config's build subprocess only: what it saw of the env_vars."""
    return Probe.bind(os.environ.get("GREETING"))
'''


class Api:
    def __init__(self, cluster: Cluster, app_dir: Path) -> None:
        self.cluster = cluster
        self.app_dir = app_dir
        self.url = f"http://127.0.0.1:{cluster.env['BROKER_SERVE_DASHBOARD_PORT']}"
        self.cache = Path(cluster.env["BROKER_SERVE_STATE_DIR"]) / "runtime_env"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*BROKER_SERVE, *args], env=self.cluster.env, cwd=self.app_dir,
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0 or not check, result.stdout + result.stderr
        return result

    @property
    def auth(self) -> dict[str, str]:
        state = Path(self.cluster.env["BROKER_SERVE_STATE_DIR"]) / self.cluster.name
        return {"Authorization": f"Bearer {(state / 'api-token').read_text().strip()}"}

    def put(self, path: str, body: Any) -> dict[str, Any]:
        answer = requests.put(f"{self.url}{path}", json=body, headers=self.auth, timeout=300)
        assert answer.status_code == 200, answer.text
        result: dict[str, Any] = answer.json()
        return result

    def applications(self) -> dict[str, Any]:
        answer = requests.get(f"{self.url}/api/serve/applications/", headers=self.auth,
                              timeout=10)
        result: dict[str, Any] = answer.json()["applications"]
        return result

    def running(self, name: str) -> dict[str, Any] | None:
        app = self.applications().get(name)
        return app if app and app["status"] == "RUNNING" else None


@pytest.fixture
def files() -> Iterator[FileServer]:
    with file_server() as server:
        yield server


def start(cluster: Cluster, tmp_path: Path, **env: str) -> Api:
    app_dir = tmp_path / "apps"
    app_dir.mkdir(exist_ok=True)
    cluster.env.update(env)
    api = Api(cluster, app_dir)
    api.cli("start", "--http-port", str(cluster.port), "--app-dir", str(app_dir))
    return api


@pytest.fixture
def api(cluster: Cluster, tmp_path: Path) -> Iterator[Api]:
    started = start(cluster, tmp_path)
    try:
        yield started
    finally:
        started.cli("stop", check=False)


def post_text(cluster: Cluster, text: str) -> str | None:
    try:
        answer = requests.post(cluster.url, json=text, timeout=30)
    except requests.ConnectionError:
        return None
    return answer.text if answer.status_code == 200 else None


def test_the_seed_v1_config_deploys_from_a_zip_served_over_http(cluster, api, files):
    files.files["/archive/HEAD.zip"] = text_ml_archive()
    # Seed 002's V1 example, its working_dir moved to the loopback server.
    config = {
        "import_path": "text_ml:app",
        "runtime_env": {"working_dir": files.url("/archive/HEAD.zip")},
        "deployments": [
            {"name": "Translator", "user_config": {"language": "french"}},
            {"name": "Summarizer"},
        ],
    }
    result = api.put("/api/serve/deployments/", config)
    assert result["applications"]["default"]["result"] == "built", result
    assert wait_for(lambda: post_text(cluster, "Hello world. It is sunny."), 60) == \
        '[french] Hello world'
    # The ingress answers once its route is ready; the application is RUNNING once the
    # controller's next pass has seen every deployment ready.
    def app_status() -> str:
        return str(requests.get(f"{api.url}/api/serve/deployments/status", headers=api.auth,
                                timeout=10).json()["app_status"]["status"])

    assert wait_for(lambda: app_status() != "DEPLOYING", 30) and app_status() == "RUNNING"

    # 32 clients at once: every request answered, each with its own text, once.
    texts = [f"request {n}. tail" for n in range(256)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda text: post_text(cluster, text), texts))
    assert answers == [f'[french] request {n}' for n in range(256)]

    # A second deploy of the same config reads the archive again (to notice a change), but
    # the same content is the same version: nothing restarts, nothing is extracted again.
    versions = _versions(api.applications()["default"])
    (package,) = [p for p in (api.cache / "packages").iterdir() if p.is_dir()]
    extracted = (package / "serve_config_examples-HEAD" / "text_ml.py").stat().st_mtime_ns
    hits = files.hits["/archive/HEAD.zip"]
    assert api.put("/api/serve/deployments/", config)["applications"]["default"]["result"] \
        == "built"
    assert files.hits["/archive/HEAD.zip"] == hits + 1
    assert _versions(api.applications()["default"]) == versions
    assert (package / "serve_config_examples-HEAD" / "text_ml.py").stat().st_mtime_ns \
        == extracted
    assert post_text(cluster, "Still. here") == '[french] Still'

    # A changed archive at the same URL is a new version, and rolls out.
    files.files["/archive/HEAD.zip"] = text_ml_archive(mark="-v2")
    api.put("/api/serve/deployments/", config)
    assert wait_for(lambda: post_text(cluster, "New. code") == '[french-v2] New', 60)
    assert _versions(api.applications()["default"]) != versions


def _versions(app: dict[str, Any]) -> dict[str, str]:
    return {name: {r["replica_id"] for r in dep["replicas"]}
            for name, dep in app["deployments"].items()}


def test_env_vars_py_modules_and_pip_reach_the_replicas_and_their_caches_are_reused(
        cluster, api, files, tmp_path):
    (api.app_dir / "probe_dir").mkdir()
    (api.app_dir / "probe_dir" / "probe.py").write_text(PROBE)
    (api.app_dir / "mods" / "helper").mkdir(parents=True)
    (api.app_dir / "mods" / "helper" / "__init__.py").write_text("VALUE = 'helper module'\n")
    wheel = pure_python_wheel(tmp_path, "bs_probe_pkg", "1.0", "VALUE = 'from pip'\n")
    assert importlib.util.find_spec("bs_probe_pkg") is None
    config = {"applications": [{
        "name": "probe", "route_prefix": "/probe", "import_path": "probe:build",
        "runtime_env": {"working_dir": "probe_dir", "py_modules": ["mods/helper"],
                        "pip": [str(wheel)], "env_vars": {"GREETING": "hello", "LEVEL": "app",
                                                          "BROKER_SERVE_CLUSTER": "not-mine"}},
        "deployments": [{"name": "Probe", "ray_actor_options": {
            "runtime_env": {"env_vars": {"LEVEL": "deployment"}}}}],
    }]}
    messages: list[str] = []
    watching = threading.Event()
    watcher = threading.Thread(target=_watch_messages, args=(api, "probe", messages, watching))
    watcher.start()
    try:
        assert api.put("/api/serve/applications/", config)["applications"]["probe"]["result"] \
            == "built"
    finally:
        watching.set()
        watcher.join()
    assert any("pip requirement" in message for message in messages), messages

    seen = wait_for(lambda: _get_json(f"{cluster.url}/probe"), 60)
    assert seen["greeting"] == "hello"
    assert seen["built_with"] == "hello"  # the build subprocess had the env_vars too
    assert seen["level"] == "deployment"  # the deployment's env_vars win, name by name
    assert seen["cluster_setting"] == cluster.name  # the cluster's settings win over env_vars
    assert seen["helper"] == "helper module"
    assert seen["pkg"] == "from pip"
    venvs = api.cache / "venvs"
    assert seen["pkg_file"].startswith(str(venvs)) and seen["prefix"].startswith(str(venvs))
    assert seen["cwd"].startswith(str(api.cache / "packages"))
    assert importlib.util.find_spec("bs_probe_pkg") is None  # not in broker-serve's own

    # The second deploy reuses the venv and the packages: nothing is built again and the
    # replica keeps running.
    (venv,) = [p for p in venvs.iterdir() if p.is_dir()]
    built = (venv / ".ready").stat().st_mtime_ns
    packages = sorted(p.name for p in (api.cache / "packages").iterdir() if p.is_dir())
    assert api.put("/api/serve/applications/", config)["applications"]["probe"]["result"] \
        == "built"
    assert (venv / ".ready").stat().st_mtime_ns == built
    assert sorted(p.name for p in (api.cache / "packages").iterdir() if p.is_dir()) == packages
    assert _get_json(f"{cluster.url}/probe")["pid"] == seen["pid"]


def _watch_messages(api: Api, name: str, messages: list[str], stop: threading.Event) -> None:
    while not stop.wait(0.05):
        app = api.applications().get(name)
        if app and app["message"] and app["message"] not in messages:
            messages.append(app["message"])


def _get_json(url: str) -> dict[str, Any] | None:
    try:
        answer = requests.get(url, timeout=30)
    except requests.ConnectionError:
        return None
    return answer.json() if answer.status_code == 200 else None


def test_bad_runtime_envs_fail_their_deploy_clearly_and_the_running_version_serves(
        cluster, files, tmp_path):
    api = start(cluster, tmp_path, BROKER_SERVE_RUNTIME_ENV_MAX_MB="4")
    try:
        _bad_inputs(cluster, api, files)
    finally:
        api.cli("stop", check=False)


def _bad_inputs(cluster: Cluster, api: Api, files: FileServer) -> None:
    files.files["/archive/HEAD.zip"] = text_ml_archive()
    keeper = {"name": "keeper", "route_prefix": "/", "import_path": "text_ml:app",
              "runtime_env": {"working_dir": files.url("/archive/HEAD.zip")},
              "deployments": [{"name": "Translator", "user_config": {"language": "german"}}]}
    api.put("/api/serve/applications/", {"applications": [keeper]})
    assert wait_for(lambda: post_text(cluster, "Guten. Tag"), 60) == '[german] Guten'
    running = _versions(api.applications()["keeper"])

    files.files["/not-a-zip.zip"] = b"<html>this is a web page</html>"
    files.files["/bomb.zip"] = zip_of({"repo/zeros.bin": b"\0" * (8 << 20)})
    files.files["/escape.zip"] = zip_of({"repo/app.py": "", "repo/../../escaped.py": "x"})
    closed = f"http://127.0.0.1:{free_port()}/gone.zip"
    bad = {
        "unreachable": ({"working_dir": closed}, f"fetching {closed} failed"),
        "missing": ({"working_dir": files.url("/absent.zip")}, "HTTP 404"),
        "notzip": ({"working_dir": files.url("/not-a-zip.zip")}, "not a zip archive"),
        "bomb": ({"working_dir": files.url("/bomb.zip")},
                 "holds 8.0 MiB once extracted, over the limit of 4.0 MiB"),
        "escape": ({"py_modules": [files.url("/escape.zip")]}, "escapes the directory"),
        "conda": ({"conda": {"dependencies": ["numpy"]}},
                  "runtime_env ['conda'] of application 'conda' is not supported"),
        "pip": ({"pip": {"packages": ["bs-no-such-package-xyz==0.0.1"],
                         "pip_install_options": ["--no-index"]}},
                "No matching distribution found for bs-no-such-package-xyz"),
    }
    # the keeper too, with an archive that no longer exists: its old version must serve on
    broken_keeper = {**keeper, "runtime_env": {"working_dir": files.url("/deleted.zip")}}
    applications = [broken_keeper] + [
        {"name": name, "route_prefix": f"/{name}", "import_path": "text_ml:app",
         "runtime_env": runtime_env} for name, (runtime_env, _) in bad.items()]
    result = api.put("/api/serve/applications/", {"applications": applications})
    statuses = api.applications()
    for name, (_, expected) in {**bad, "keeper": (None, "HTTP 404")}.items():
        assert result["applications"][name]["result"] == "failed", name
        assert expected in result["applications"][name]["message"], (name, result)
        assert statuses[name]["status"] == "DEPLOY_FAILED", name
        assert expected in statuses[name]["message"], name
    assert "runtime_env of application 'bomb'" in statuses["bomb"]["message"]

    # The keeper's replicas still serve its first version.
    assert post_text(cluster, "Noch. da") == '[german] Noch'
    assert _versions(api.applications()["keeper"]) == running
    # Nothing half-extracted or half-built is left: one package (the keeper's), one folder.
    packages = api.cache / "packages"
    assert sorted(p.name for p in packages.iterdir() if p.is_dir()) == [
        p.name.removesuffix(".zip") for p in packages.glob("*.zip")]
    assert [p for p in packages.iterdir() if ".tmp-" in p.name] == []
    assert [p for p in (api.cache / "venvs").iterdir() if p.is_dir()] == []
    assert Counter(files.hits)["/bomb.zip"] == 1


DRIVER = '''
import os

from broker_serve import serve


@serve.deployment(ray_actor_options={"runtime_env": {
    "working_dir": "code", "env_vars": {"FROM_CODE": "yes"}}})
class Where:
    def __call__(self) -> dict:
        import in_working_dir

        return {"env": os.environ.get("FROM_CODE"), "value": in_working_dir.VALUE,
                "cwd": os.getcwd()}


print("ANSWER", serve.run(Where.bind()).remote().result())
'''


def test_a_deployment_runtime_env_in_code_works_with_serve_run(cluster, tmp_path):
    driver_dir = tmp_path / "driver"
    (driver_dir / "code").mkdir(parents=True)
    (driver_dir / "code" / "in_working_dir.py").write_text("VALUE = 'packed by the driver'\n")
    result = cluster.run_script(DRIVER, cwd=driver_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("ANSWER"))
    answer = eval(line.removeprefix("ANSWER "))  # a dict's repr, printed by the script
    assert answer["env"] == "yes" and answer["value"] == "packed by the driver"
    assert answer["cwd"].startswith(cluster.env["BROKER_SERVE_STATE_DIR"])


FAILING_DRIVER = '''
from broker_serve import serve
from broker_serve.exceptions import DeployFailed


@serve.deployment(ray_actor_options={"runtime_env": {"pip": {
    "packages": ["bs-no-such-package-xyz==0.0.1"], "pip_install_options": ["--no-index"]}}})
class NeverInstalled:
    def __call__(self) -> str:
        return "unreachable"


try:
    serve.run(NeverInstalled.bind())
except DeployFailed as exc:
    print("FAILED", exc)
'''


def test_a_failed_install_on_a_node_fails_the_deploy_with_pips_error(cluster, tmp_path):
    """Only nodes build a deployment's own pip environment (here, from `serve.run`): the
    replicas fail to start with pip's error, and the deploy fails with it."""
    result = cluster.run_script(FAILING_DRIVER, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" in result.stdout, result.stdout + result.stderr
    assert "preparing the runtime_env failed" in result.stdout
    assert "No matching distribution found for bs-no-such-package-xyz" in result.stdout
    assert not [p for p in (Path(cluster.env["BROKER_SERVE_STATE_DIR"]) / "runtime_env" /
                            "venvs").iterdir() if p.is_dir()]
