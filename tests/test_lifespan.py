"""The ingress app's ASGI lifespan in each replica, as Ray runs it: startup hooks after the
constructor and before the first request, their state in requests, shutdown hooks after the
last request when the replica stops (delete, redeploy, downscale), and a startup that raises
failing the deploy with its error."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import requests
from fastapi import FastAPI, Request
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from broker_serve import DeployFailed, serve

from .lifecycle_marks import events, exited, note
from .waiting import wait_for

CONCURRENT = 32


def pids_answering(url: str, count: int) -> dict[int, dict[str, Any]]:
    """Ask until `count` replicas answered; their answers by pid."""
    answers: dict[int, dict[str, Any]] = {}

    def all_seen() -> bool:
        answer = requests.get(url, timeout=30).json()
        answers[answer["pid"]] = answer
        return len(answers) >= count

    wait_for(all_seen, timeout=60, interval=0)
    return answers


def test_on_event_hooks_run_in_each_replica_around_its_requests(cluster, tmp_path):
    marks = str(tmp_path)
    app = FastAPI()

    @app.on_event("startup")
    def load() -> None:
        note(marks, "startup")
        app.state.loaded_by = os.getpid()

    @app.on_event("shutdown")
    async def unload() -> None:
        await asyncio.sleep(0)
        note(marks, "shutdown")

    @serve.deployment(num_replicas=2)
    @serve.ingress(app)
    class Service:
        def __init__(self) -> None:
            note(marks, "init")

        @app.get("/")
        def root(self) -> dict[str, int]:
            return {"pid": os.getpid(), "loaded_by": app.state.loaded_by}

        def __del__(self) -> None:
            note(marks, "del")

    serve.run(Service.bind())
    answers = pids_answering(cluster.url, 2)
    assert all(answer["loaded_by"] == pid for pid, answer in answers.items())
    assert events(tmp_path) == {pid: ["init", "startup"] for pid in answers}

    serve.delete("default")
    wait_for(lambda: all(exited(pid) for pid in answers))
    # The constructor first, as in Ray; __del__ after the shutdown hooks, and only once.
    assert events(tmp_path) == {pid: ["init", "startup", "shutdown", "del"] for pid in answers}


def test_lifespan_state_reaches_each_request_and_app_state_too(cluster, tmp_path):
    marks = str(tmp_path)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        app.state.greeting = "hello"
        note(marks, "startup")
        yield {"model": f"weights of {os.getpid()}"}
        note(marks, "shutdown")

    app = FastAPI(lifespan=lifespan)

    @serve.deployment
    @serve.ingress(app)
    class Model:
        @app.get("/")
        def predict(self, request: Request) -> dict[str, Any]:
            leaked = getattr(request.state, "mine", None)
            request.state.mine = "set by one request"  # its own copy of the state
            return {"pid": os.getpid(), "model": request.state.model, "leaked": leaked,
                    "greeting": request.app.state.greeting}

    serve.run(Model.bind())
    first = requests.get(cluster.url, timeout=30).json()
    second = requests.get(cluster.url, timeout=30).json()
    pid = first["pid"]
    expected = {"pid": pid, "model": f"weights of {pid}", "leaked": None, "greeting": "hello"}
    assert first == second == expected

    serve.delete("default")
    wait_for(lambda: exited(pid))
    assert events(tmp_path) == {pid: ["startup", "shutdown"]}


def test_a_starlette_lifespan_runs_and_an_app_without_lifespan_still_serves(cluster):
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, str]]:
        yield {"ready": "ready"}

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.state.ready)

    starlette_app = Starlette(routes=[Route("/", home)], lifespan=lifespan)

    async def bare(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # as uvicorn's lifespan="auto": not supported, not fatal
            raise RuntimeError(f"{scope['type']} is not supported")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"bare"})

    @serve.deployment
    @serve.ingress(starlette_app)
    class WithLifespan:
        pass

    @serve.deployment
    @serve.ingress(bare)
    class WithoutLifespan:
        pass

    serve.run(WithLifespan.bind(), name="starlette", route_prefix="/starlette")
    serve.run(WithoutLifespan.bind(), name="bare", route_prefix="/bare")
    assert requests.get(f"{cluster.url}/starlette", timeout=30).text == "ready"
    assert requests.get(f"{cluster.url}/bare", timeout=30).text == "bare"


@pytest.mark.parametrize("style", ["on_event", "lifespan"])
def test_a_startup_that_raises_fails_the_deploy_with_its_error(cluster, style):
    if style == "on_event":
        app = FastAPI()

        @app.on_event("startup")
        def load() -> None:
            raise FileNotFoundError("no weights at /models/resnet")
    else:
        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            raise FileNotFoundError("no weights at /models/resnet")
            yield

        app = FastAPI(lifespan=lifespan)

    @serve.deployment
    @serve.ingress(app)
    class Service:
        @app.get("/")
        def root(self) -> str:
            return "unreachable"

    with pytest.raises(DeployFailed, match="FileNotFoundError: no weights at /models/resnet"):
        serve.run(Service.bind())
    assert serve.status().applications["default"].status == "DEPLOY_FAILED"


def service_of(marks: str) -> Any:
    """A deployment whose replicas note their lifespan and every request they serve."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        note(marks, "startup")
        yield {"ready": "ready"}
        await asyncio.sleep(0.3)  # a slow shutdown: the next version serves meanwhile
        note(marks, "shutdown")

    app = FastAPI(lifespan=lifespan)

    @serve.deployment(max_ongoing_requests=4, graceful_shutdown_timeout_s=30)
    @serve.ingress(app)
    class Service:
        def __init__(self, version: str) -> None:
            self.version = version
            note(marks, "init")

        @app.get("/")
        async def root(self, request: Request, n: int) -> dict[str, Any]:
            note(marks, f"served-{n}")
            await asyncio.sleep(0.25)
            return {"n": n, "pid": os.getpid(), "version": self.version,
                    "ready": request.state.ready}

        def __del__(self) -> None:
            note(marks, "del")

    return Service


def test_a_redeploy_under_concurrent_requests_answers_each_once_and_runs_the_hooks(
        cluster, tmp_path):
    Service = service_of(str(tmp_path))
    serve.run(Service.bind("v1"))
    old = requests.get(cluster.url, params={"n": -1}, timeout=30).json()["pid"]
    answers: dict[int, requests.Response] = {}

    def call(n: int) -> None:
        answers[n] = requests.get(cluster.url, params={"n": n}, timeout=90)

    callers = [threading.Thread(target=call, args=(n,)) for n in range(CONCURRENT)]
    for caller in callers:
        caller.start()
    # Some are running on the old replica when the new version is deployed.
    wait_for(lambda: len(events(tmp_path)[old]) >= 5, interval=0.01)
    serve.run(Service.bind("v2"))
    for caller in callers:
        caller.join(90)

    assert sorted(answers) == list(range(CONCURRENT))
    for n, response in answers.items():
        assert response.status_code == 200, response.text
        assert response.json()["n"] == n and response.json()["ready"] == "ready"
    wait_for(lambda: exited(old))
    by_pid = events(tmp_path)
    served = [event for noted in by_pid.values() for event in noted if event.startswith("served")]
    assert sorted(served) == sorted(f"served-{n}" for n in range(-1, CONCURRENT))  # each once
    # The old replica: its shutdown hooks after its last request, then __del__.
    assert by_pid[old][:2] == ["init", "startup"] and by_pid[old][-2:] == ["shutdown", "del"]
    assert all(event.startswith("served") for event in by_pid[old][2:-2])
    new = [pid for pid in by_pid if pid != old]
    assert len(new) == 1 and by_pid[new[0]][:2] == ["init", "startup"]
    assert "shutdown" not in by_pid[new[0]]
    assert {answer.json()["version"] for answer in answers.values()} <= {"v1", "v2"}


def test_downscaling_runs_the_hooks_and_del_of_the_replica_it_stops(cluster, tmp_path):
    Service = service_of(str(tmp_path))
    # A version keeps the replicas while only num_replicas changes.
    serve.run(Service.options(num_replicas=2, version="1").bind("v1"))
    wait_for(lambda: len([noted for noted in events(tmp_path).values()
                          if noted[:2] == ["init", "startup"]]) == 2, timeout=60)
    serve.run(Service.options(num_replicas=1, version="1").bind("v1"))

    def one_stopped() -> bool:
        ended = [pid for pid, noted in events(tmp_path).items() if noted[-1:] == ["del"]]
        return len(ended) == 1 and exited(ended[0])

    wait_for(one_stopped, timeout=60)
    by_pid = events(tmp_path)
    assert sorted(by_pid.values()) == [["init", "startup"], ["init", "startup", "shutdown", "del"]]
    kept = next(pid for pid, noted in by_pid.items() if noted == ["init", "startup"])
    assert requests.get(cluster.url, params={"n": 1}, timeout=30).json()["pid"] == kept
