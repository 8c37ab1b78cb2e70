"""Controller HA: a standby takes over within seconds while serving never stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import requests

from broker_serve import serve
from broker_serve.client import api


@serve.deployment
class Echo:
    def __call__(self) -> str:
        return "ok"


def leader() -> str | None:
    runtime = api._connect()
    return runtime.run_sync(runtime.store.lease_value())


def test_standby_takes_over_and_requests_keep_succeeding(cluster):
    serve.run(Echo.bind())
    first = leader()
    standby = subprocess.Popen([sys.executable, "-m", "broker_serve", "controller"],
                               env=cluster.env, start_new_session=True)
    failures: list[str] = []
    served = 0
    stop = threading.Event()

    def load() -> None:
        nonlocal served
        with requests.Session() as session:
            while not stop.is_set():
                response = session.get(cluster.url, timeout=30)
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")
                served += 1

    client = threading.Thread(target=load)
    client.start()
    try:
        time.sleep(1)
        assert leader() == first  # the standby waits
        os.kill(int(first.rsplit("-", 1)[1]), signal.SIGKILL)
        killed = time.monotonic()
        while leader() in (None, first):
            assert time.monotonic() - killed < 10, "no standby took over"
            time.sleep(0.1)
        took_over = time.monotonic() - killed
        # The new leader acts: it scales the deployment.
        serve.run(Echo.options(num_replicas=2).bind())
        status = serve.status().applications["default"].deployments["Echo"]
        assert status.replica_states.get("RUNNING") == 2
    finally:
        stop.set()
        client.join(30)
        serve.delete("default")  # while a controller leads, so the replicas stop
        standby.send_signal(signal.SIGTERM)
        standby.wait(20)
    assert not failures, failures[:3]
    assert served > 50
    assert took_over < 8
