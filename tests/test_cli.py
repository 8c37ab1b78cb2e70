"""The `broker-serve` command, run as a user runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests
import yaml

from .conftest import ROOT

BROKER_SERVE = [sys.executable, "-m", "broker_serve"]


def _wait_for(url: str, timeout: float = 60) -> requests.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = requests.get(url, timeout=5)
            if response.status_code == 200:
                return response
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer 200 within {timeout}s")


def _children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _gone(pids: list[int], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_run_then_curl_then_ctrl_c(cluster):
    # In a process group of its own, as a shell runs a command in the foreground.
    process = subprocess.Popen([*BROKER_SERVE, "run", "examples.hello:app"], cwd=ROOT,
                               env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, process_group=0)
    try:
        answer = _wait_for(f"{cluster.url}/?name=curl").json()
        assert answer["message"] == "Hello, curl!"
        curl = subprocess.run(["curl", "-sN", f"{cluster.url}/stream?count=3"],
                              capture_output=True, text=True, timeout=30)
        assert curl.stdout == "0\n1\n2\n"
        children = _children_of(process.pid)
        assert len(children) == 3  # controller, proxy, worker node
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "Shutting down." in output
    # The app was deleted by the cluster's own controller, not left behind by a dead one.
    assert "no controller is running" not in output, output
    assert "Traceback" not in output, output
    assert _gone(children), "the local cluster outlived `broker-serve run`"


def test_start_status_stop(cluster):
    start = subprocess.run([*BROKER_SERVE, "start", "--http-port", str(cluster.port)],
                           env=cluster.env, capture_output=True, text=True, timeout=90)
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        again = subprocess.run([*BROKER_SERVE, "start"], env=cluster.env, capture_output=True,
                               text=True, timeout=30)
        assert again.returncode != 0 and "already running" in again.stderr
        deploy = cluster.run_script(
            "from broker_serve import serve\n"
            "@serve.deployment\n"
            "def f():\n"
            "    return 'detached'\n"
            "serve.run(f.bind(), name='app1', route_prefix='/f')\n"
        )
        assert deploy.returncode == 0, deploy.stderr
        # The driver exited; the detached cluster keeps serving its app.
        assert _wait_for(f"{cluster.url}/f").text == "detached"
        status = subprocess.run([*BROKER_SERVE, "status"], env=cluster.env,
                                capture_output=True, text=True, timeout=30)
        parsed = yaml.safe_load(status.stdout)
        assert parsed["applications"]["app1"]["status"] == "RUNNING"
        assert parsed["applications"]["app1"]["deployments"]["f"]["replica_states"] == {
            "RUNNING": 1}
        shutdown = subprocess.run([*BROKER_SERVE, "shutdown", "-y"], env=cluster.env,
                                  capture_output=True, text=True, timeout=60)
        assert shutdown.returncode == 0, shutdown.stderr
        assert requests.get(f"{cluster.url}/f").status_code == 404
    finally:
        stop = subprocess.run([*BROKER_SERVE, "stop"], env=cluster.env, capture_output=True,
                              text=True, timeout=60)
    assert "Stopped" in stop.stdout
    state = Path(cluster.env["BROKER_SERVE_STATE_DIR"]) / cluster.name
    assert not (state / "pids.json").exists()
    assert (state / "controller.log").exists()


def test_python_dash_m_is_the_same_command():
    result = subprocess.run([*BROKER_SERVE, "--help"], capture_output=True, text=True,
                            env={**os.environ})
    assert result.returncode == 0
    for command in ("start", "stop", "run", "status", "controller", "proxy", "worker",
                    "shutdown"):
        assert command in result.stdout


def test_an_unreachable_cluster_is_one_error_line(cluster):
    env = {**cluster.env, "BROKER_SERVE_REDIS_URL": "redis://127.0.0.1:1/0"}  # nothing there
    result = subprocess.run([*BROKER_SERVE, "status"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("Error: "), result.stderr
    assert "Redis" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_shutdown_of_an_unreachable_cluster_raises(cluster):
    """Not a silent no-op: the applications may still be running."""
    env = {**cluster.env, "BROKER_SERVE_REDIS_URL": "redis://127.0.0.1:1/0"}  # nothing there
    script = ("from broker_serve import ClusterUnavailable, serve\n"
              "try:\n"
              "    serve.shutdown()\n"
              "except ClusterUnavailable as exc:\n"
              "    print('raised:', exc)\n")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("raised: cannot reach Redis"), result.stdout


def test_a_command_that_cannot_reach_redis_says_where_once(cluster):
    env = {**cluster.env, "BROKER_SERVE_REDIS_URL": "redis://127.0.0.1:1/0"}  # nothing there
    result = subprocess.run([*BROKER_SERVE, "start"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: cannot reach Redis at redis://127.0.0.1:1/0: "), \
        result.stderr
    assert result.stderr.count("cannot reach Redis") == 1, result.stderr
    assert "Traceback" not in result.stderr
