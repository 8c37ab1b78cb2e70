"""The per-process runtime (an anyio blocking portal) and the settings read from the environment."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from broker_serve.client import api
from broker_serve.client.runtime import current_runtime, get_runtime, reset_runtime
from broker_serve.exceptions import DeployFailed
from broker_serve.settings import Settings, state_dir


def test_settings_come_from_the_environment_when_read(monkeypatch, tmp_path):
    monkeypatch.setenv("BROKER_SERVE_CLUSTER", "from-env")
    monkeypatch.setenv("BROKER_SERVE_DEPLOY_TIMEOUT_S", "7")
    monkeypatch.setenv("BROKER_SERVE_HTTP_KEEP_ALIVE_TIMEOUT_S", "")
    monkeypatch.setenv("BROKER_SERVE_ACCESS_LOG", "No")
    monkeypatch.setenv("BROKER_SERVE_LOG_FORMAT", "JSON")
    monkeypatch.setenv("BROKER_SERVE_API_TOKEN", " secret \n")
    monkeypatch.setenv("BROKER_SERVE_STATE_DIR", str(tmp_path))
    settings = Settings.from_env(app_dir=None, dashboard_port=1234)
    assert settings.cluster == "from-env" and settings.dashboard_port == 1234
    assert settings.deploy_timeout_s == 7.0 and settings.http_keep_alive_timeout_s is None
    assert settings.access_log is False and settings.log_format == "json"
    assert settings.api_token == "secret" and settings.app_dir is None
    assert state_dir("c") == Path(tmp_path) / "c"
    assert settings.env()["BROKER_SERVE_DASHBOARD_PORT"] == "1234"


def test_settings_keep_their_validation_errors(monkeypatch):
    with pytest.raises(ValueError, match="invalid cluster name 'a b'"):
        Settings.from_env(cluster="a b")
    monkeypatch.setenv("BROKER_SERVE_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="BROKER_SERVE_LOG_FORMAT must be one of text, json"):
        Settings.from_env()


def test_run_sync_waits_times_out_and_refuses_the_loop_thread(cluster):
    runtime = get_runtime()
    assert runtime.run_sync(asyncio.sleep(0.01, "done")) == "done"
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        runtime.run_sync(asyncio.sleep(5), timeout=0.1)
    assert time.monotonic() - started < 1

    async def blocking_inside_the_loop() -> None:
        runtime.run_sync(asyncio.sleep(0))

    with pytest.raises(RuntimeError, match="use `await`"):
        runtime.run_sync(blocking_inside_the_loop())


def test_a_forked_child_starts_its_own_runtime(cluster):
    runtime = get_runtime()
    pid = os.fork()
    if pid == 0:  # the child: its parent's portal thread did not come along
        try:
            fresh = current_runtime() is None and get_runtime() is not runtime
            os._exit(0 if fresh else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert current_runtime() is runtime


def test_reset_runtime_stops_its_thread(cluster):
    import threading

    get_runtime()
    before = threading.active_count()
    reset_runtime()
    assert current_runtime() is None
    assert threading.active_count() < before  # the portal's thread (and its loop's executor)


def test_a_deploy_that_hangs_is_deploy_failed_not_a_timeout(monkeypatch):
    class HangingRuntime:
        settings = Settings(deploy_timeout_s=0.0)

        def run_sync(self, coro, timeout=None):
            coro.close()
            raise TimeoutError

    async def deploy(*args):
        pass

    monkeypatch.setattr(api, "_deploy", deploy)
    with pytest.raises(DeployFailed, match="was not deployed within 30s") as info:
        api._deploy_and_wait(HangingRuntime(), {"name": "app"}, {})  # type: ignore[arg-type]
    assert not isinstance(info.value, TimeoutError)


def test_a_cluster_that_does_not_answer_is_cluster_unavailable(monkeypatch):
    import threading

    from broker_serve.client import runtime as runtime_module
    from broker_serve.exceptions import ClusterUnavailable

    async def hang(self) -> None:
        await asyncio.sleep(60)

    monkeypatch.setattr(runtime_module.Runtime, "start", hang)
    monkeypatch.setattr(runtime_module, "START_TIMEOUT_S", 0.2)
    before = threading.active_count()
    with pytest.raises(ClusterUnavailable, match="did not answer within 0s"):
        get_runtime()
    assert current_runtime() is None
    assert threading.active_count() == before  # its portal thread stopped
