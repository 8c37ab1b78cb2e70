"""Redeploying: each `serve.run` restarts replicas unless the deployment carries a `version=`,
as in Ray Serve; a config's unchanged application restarts nothing."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path

import requests

from broker_serve import serve

from .waiting import wait_for


@serve.deployment
class Pid:
    def __call__(self) -> int:
        return os.getpid()


@serve.deployment(version="1", user_config={"word": "a"})
class Kept:
    def __init__(self, code: str = "first") -> None:
        self.code = code
        self.word = ""

    def reconfigure(self, config: dict[str, str]) -> None:
        self.word = config["word"]

    def __call__(self) -> dict[str, object]:
        return {"pid": os.getpid(), "code": self.code, "word": self.word}


def _get(cluster, path: str = "/") -> object:
    response = requests.get(f"{cluster.url}{path}", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_each_run_without_a_version_restarts_the_replicas(cluster):
    serve.run(Pid.bind())
    first = _get(cluster)
    serve.run(Pid.bind())  # the same code: still a new version, as Ray gives it
    second = _get(cluster)
    assert second != first
    assert serve.status().applications["default"].status == "RUNNING"


def test_a_version_keeps_the_replicas_until_it_changes(cluster):
    serve.run(Kept.bind())
    first = _get(cluster)
    assert first["code"] == "first" and first["word"] == "a"

    serve.run(Kept.bind())  # same version: nothing restarts
    assert _get(cluster) == first

    # A live option applies in place under the same version.
    serve.run(Kept.options(user_config={"word": "b"}).bind())
    assert _get(cluster) == {**first, "word": "b"}

    # Same version, other arguments: Ray keeps the replicas, and so the first definition.
    serve.run(Kept.options(user_config={"word": "b"}).bind("second"))
    assert _get(cluster) == {**first, "word": "b"}

    # A new version rolls out the code it ships.
    serve.run(Kept.options(version="2", user_config={"word": "b"}).bind("second"))
    third = _get(cluster)
    assert third["pid"] != first["pid"] and third["code"] == "second"


def test_an_option_that_needs_a_restart_restarts_even_under_a_version(cluster):
    serve.run(Kept.bind())
    first = _get(cluster)
    serve.run(Kept.options(max_ongoing_requests=7).bind())
    assert _get(cluster)["pid"] != first["pid"]


@serve.deployment(num_replicas=2, max_ongoing_requests=16, graceful_shutdown_timeout_s=10)
class Journal:
    """Appends each request's id to a file, so the test sees every run of every request."""

    def __init__(self, journal: str) -> None:
        self.journal = Path(journal)

    def __call__(self, request) -> str:
        request_id = request.query_params["id"]
        with self.journal.open("a") as out:
            out.write(f"{request_id}\n")
        return request_id


def test_redeploys_under_32_concurrent_clients_run_each_request_exactly_once(cluster, tmp_path):
    journal = tmp_path / "journal"
    journal.touch()
    serve.run(Journal.bind(str(journal)))
    sent: list[str] = []
    answers: list[tuple[str, int, str]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as session:
            for _ in range(400):  # bounded even if the deploys hang
                if stop.is_set():
                    return
                request_id = uuid.uuid4().hex
                with lock:
                    sent.append(request_id)
                response = session.get(cluster.url, params={"id": request_id}, timeout=60)
                with lock:
                    answers.append((request_id, response.status_code, response.text))

    clients = [threading.Thread(target=client) for _ in range(32)]
    for thread in clients:
        thread.start()
    try:
        wait_for(lambda: len(answers) > 100, timeout=60)
        for _ in range(2):  # unchanged code, so each run is a rolling restart
            serve.run(Journal.bind(str(journal)))
        mark = len(answers)
        wait_for(lambda: len(answers) > mark + 100, timeout=60)
    finally:
        stop.set()
        for thread in clients:
            thread.join(90)
    assert not any(thread.is_alive() for thread in clients)
    failures = [answer for answer in answers if answer[1] != 200]
    assert not failures, failures[:5]
    assert [answer[2] for answer in answers] == [answer[0] for answer in answers]
    ran = journal.read_text().split()
    assert sorted(ran) == sorted(sent), "a request ran twice or not at all"
