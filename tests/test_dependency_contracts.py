"""What broker-serve relies on in uvicorn, Starlette, FastAPI, prometheus-client and Linux, where
no documented API says it. Each test breaks if a new release changes what its adapter relies on:

- uvicorn installs its signal handlers in `Server.capture_signals` (http_server.py `HttpServer`);
- a Starlette `State` and FastAPI's lazily included routers survive cloudpickle once an ingress is
  declared (replica/ingress.py's reducers);
- counters written by several processes in multiprocess mode read back as one histogram
  (observability/metrics.py `CountedHistogram`, `HistogramsOfCounters`);
- a child asked to die with its parent gets SIGTERM when the parent dies (lifecycle.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from types import FrameType

import cloudpickle
import pytest
import uvicorn
from fastapi import APIRouter, FastAPI
from prometheus_client import multiprocess

from broker_serve.http_server import HttpServer
from broker_serve.lifecycle import PARENT_PID_ENV, die_with_parent_env
from broker_serve.observability import metrics
from broker_serve.replica.ingress import ingress

PROJECT_ROOT = Path(__file__).resolve().parent.parent


# uvicorn ----------------------------------------------------------------------------------------
async def _handlers_while_serving(server: uvicorn.Server) -> object:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    handler = signal.getsignal(signal.SIGTERM)
    server.should_exit = True
    await task
    return handler


async def _app(scope: object, receive: object, send: object) -> None:
    pass


def _config() -> uvicorn.Config:
    return uvicorn.Config(_app, loop="none", lifespan="off", log_config=None,
                          log_level="warning")


def test_uvicorn_installs_its_signal_handlers_in_capture_signals_only() -> None:
    def ours(signum: int, frame: FrameType | None) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        # Plain uvicorn takes SIGTERM while it serves: that is what `HttpServer` turns off.
        plain = asyncio.run(_handlers_while_serving(uvicorn.Server(_config())))
        assert plain is not ours
        assert signal.getsignal(signal.SIGTERM) is ours  # and gives it back
        ours_server = HttpServer(_config(), on_started=lambda: None)
        assert asyncio.run(_handlers_while_serving(ours_server)) is ours
    finally:
        signal.signal(signal.SIGTERM, previous)


# Starlette and FastAPI under cloudpickle ---------------------------------------------------------
def test_an_ingress_app_with_state_and_an_included_router_survives_cloudpickle() -> None:
    app = FastAPI()
    app.state.currency = "EUR"
    admin = APIRouter()

    @admin.get("/ping")
    def ping() -> str:
        return "pong"

    app.include_router(admin, prefix="/admin")

    @ingress(app)
    class Shop:
        pass

    copy = cloudpickle.loads(cloudpickle.dumps(app))
    assert copy.state.currency == "EUR"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from starlette.testclient import TestClient
    assert TestClient(copy).get("/admin/ping").json() == "pong"
    assert TestClient(app).get("/admin/ping").json() == "pong"  # the original still serves


# prometheus-client multiprocess mode ------------------------------------------------------------
WRITER = """
import sys
from broker_serve.observability import metrics

counted = metrics.CountedHistogram("t_seconds", "A test histogram.", ["method"])
local = metrics.LocalHistogram()
for value in map(float, sys.argv[1:]):
    local.observe(value)
local.move_into(counted.labels("m"))
"""


def test_counters_of_several_processes_read_back_as_one_histogram(tmp_path: Path) -> None:
    for observed in (["0.0003", "0.7"], ["0.0003", "45"]):
        subprocess.run([sys.executable, "-c", WRITER, *observed], check=True, timeout=60,
                       env={**os.environ, metrics.MULTIPROC_ENV: str(tmp_path),
                            "PYTHONPATH": str(PROJECT_ROOT)})
    collector = multiprocess.MultiProcessCollector(None, path=str(tmp_path))
    (histogram,) = metrics.HistogramsOfCounters(collector).collect()
    assert histogram.type == "histogram" and histogram.documentation == "A test histogram."
    values = {(s.name, s.labels.get("le")): s.value for s in histogram.samples}
    assert values[("t_seconds_bucket", "0.0001")] == 0
    assert values[("t_seconds_bucket", "0.0005")] == 2
    assert values[("t_seconds_bucket", "1.0")] == 3
    assert values[("t_seconds_bucket", "+Inf")] == 4
    assert values[("t_seconds_count", None)] == 4
    assert values[("t_seconds_sum", None)] == pytest.approx(0.0006 + 45.7)
    assert all(s.labels.get("method") == "m" for s in histogram.samples)


# Linux: PR_SET_PDEATHSIG ------------------------------------------------------------------------
CHILD = """
import os, sys, time
from broker_serve.lifecycle import PARENT_PID_ENV, die_with_parent_if_asked
die_with_parent_if_asked()
print(PARENT_PID_ENV in os.environ, flush=True)  # not passed on to its own children
time.sleep(60)
"""

PARENT = """
import subprocess, sys, time
from broker_serve.lifecycle import die_with_parent_env
import os
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]],
                         env={**os.environ, **die_with_parent_env()}, stdout=subprocess.PIPE)
print(child.pid, child.stdout.readline().decode().strip(), flush=True)
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_asked_to_die_with_its_parent_does() -> None:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], env=env,
                              stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        pid, inherited = parent.stdout.readline().decode().split()
        assert inherited == "False"
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(int(pid))
    finally:
        parent.kill()
        parent.wait(10)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its new parent) counts as gone.
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_whose_parent_is_gone_already_exits() -> None:
    script = textwrap.dedent("""
        from broker_serve.lifecycle import die_with_parent_if_asked
        die_with_parent_if_asked()
        print("still running")
    """)
    # Says its parent is a process that is not its parent: as after a reparenting.
    not_the_parent = str(os.getpid() + 1_000_000)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60,
                          env={**os.environ, PARENT_PID_ENV: not_the_parent,
                               "PYTHONPATH": str(PROJECT_ROOT)})
    assert done.returncode == 1 and b"still running" not in done.stdout
    assert b"exited before this one started" in done.stderr
    assert die_with_parent_env() == {PARENT_PID_ENV: str(os.getpid())}
