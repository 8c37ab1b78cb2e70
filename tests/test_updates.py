"""Live updates and replica health: reconfigure() and scaling in place, rolling code updates
under load, check_health(), and requests that kill every replica they reach."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import requests

from broker_serve import serve

from .waiting import wait_for


# A version= keeps replicas across serve.run calls while only live options change.
@serve.deployment(user_config={"greeting": "hi"}, version="1")
class Greeter:
    def __init__(self) -> None:
        self.greeting = ""
        self.reconfigured = 0

    def reconfigure(self, config: dict[str, str]) -> None:
        self.greeting = config["greeting"]
        self.reconfigured += 1

    def __call__(self) -> dict[str, object]:
        return {"greeting": self.greeting, "pid": os.getpid(), "times": self.reconfigured}


def test_user_config_and_num_replicas_change_without_restart(cluster):
    serve.run(Greeter.bind())
    first = requests.get(cluster.url, timeout=30).json()
    assert first["greeting"] == "hi" and first["times"] == 1

    # serve.run returns once the live replica took the new user_config.
    serve.run(Greeter.options(user_config={"greeting": "hello"}).bind())
    second = requests.get(cluster.url, timeout=30).json()
    assert second == {"greeting": "hello", "pid": first["pid"], "times": 2}

    serve.run(Greeter.options(user_config={"greeting": "hello"}, num_replicas=2).bind())
    pids = {requests.get(cluster.url, timeout=30).json()["pid"] for _ in range(30)}
    assert len(pids) == 2 and first["pid"] in pids  # scaled in place: the first one stayed


@serve.deployment(num_replicas=2, max_ongoing_requests=4, graceful_shutdown_timeout_s=10)
class Versioned:
    def __init__(self, version: str) -> None:
        self.version = version

    async def __call__(self) -> str:
        return self.version


def test_rolling_code_update_under_load_fails_no_request(cluster):
    serve.run(Versioned.bind("v1"))
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                response = session.get(cluster.url, timeout=30)
                seen.append((response.status_code, response.text))

    clients = [threading.Thread(target=load) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        wait_for(lambda: len(seen) > 50)
        serve.run(Versioned.bind("v2"))
        mark = len(seen)
        wait_for(lambda: len(seen) > mark + 100)
    finally:
        stop.set()
        for client in clients:
            client.join(30)
    failures = [entry for entry in seen if entry[0] != 200]
    assert not failures, failures[:5]
    bodies = [body for _, body in seen]
    assert bodies[0] == "v1" and bodies[-1] == "v2"
    assert set(bodies) == {"v1", "v2"}


@serve.deployment(health_check_period_s=0.3, health_check_timeout_s=2)
class Fragile:
    def __init__(self, sick_file: str) -> None:
        self.sick_file = Path(sick_file)

    def check_health(self) -> None:
        if self.sick_file.exists() and self.sick_file.read_text() == str(os.getpid()):
            raise RuntimeError("told to be sick")

    def __call__(self) -> int:
        return os.getpid()


def test_a_replica_failing_its_health_check_is_replaced(cluster, tmp_path):
    sick = tmp_path / "sick"
    serve.run(Fragile.bind(str(sick)))
    pid = requests.get(cluster.url, timeout=30).json()
    sick.write_text(str(pid))
    replaced = wait_for(lambda: (r := requests.get(cluster.url, timeout=30)).status_code == 200
                        and r.json() != pid and r.json())
    assert replaced != pid
    wait_for(lambda: serve.status().applications["default"].status == "RUNNING")


@serve.deployment(num_replicas=2)
class Crashy:
    def __call__(self, request) -> str:
        if request.query_params.get("poison"):
            os._exit(1)  # the replica process dies with the request unacked
        return "fine"


def test_a_request_that_kills_every_replica_is_dead_lettered_with_a_5xx(cluster):
    serve.run(Crashy.bind())
    started = time.monotonic()
    response = requests.get(cluster.url, params={"poison": "1"}, timeout=120)
    assert response.status_code == 502
    assert "died each time" in response.text and "dead-lettered" in response.text
    assert time.monotonic() - started < 90
    # The replicas were replaced and serve everything else.
    wait_for(lambda: requests.get(cluster.url, timeout=30).text == "fine", timeout=60)
