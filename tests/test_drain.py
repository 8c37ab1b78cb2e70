"""Graceful shutdown: a stopping replica finishes what it can within
graceful_shutdown_timeout_s, and what it cannot finish is requeued and answered elsewhere."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import requests

from broker_serve import serve


@serve.deployment(graceful_shutdown_timeout_s=1, graceful_shutdown_wait_loop_s=0.1)
class Worker:
    def __init__(self, version: str) -> None:
        self.version = version

    async def __call__(self, request) -> dict[str, object]:
        await asyncio.sleep(float(request.query_params.get("sleep", 0)))
        return {"version": self.version, "pid": os.getpid()}


def test_unfinished_requests_of_a_stopping_replica_are_requeued(cluster):
    serve.run(Worker.bind("v1"))
    old_pid = requests.get(cluster.url, timeout=30).json()["pid"]
    results: dict[str, requests.Response] = {}

    def call(name: str, sleep: float) -> None:
        results[name] = requests.get(cluster.url, params={"sleep": sleep}, timeout=60)

    quick = threading.Thread(target=call, args=("quick", 0.5))
    slow = threading.Thread(target=call, args=("slow", 4))
    quick.start()
    slow.start()
    time.sleep(0.2)  # both run on the v1 replica
    started = time.monotonic()
    serve.run(Worker.bind("v2"))  # a new version: the v1 replica is stopped
    quick.join(60)
    slow.join(60)
    # The quick one finished within the grace period, on the old replica.
    assert results["quick"].status_code == 200
    assert results["quick"].json() == {"version": "v1", "pid": old_pid}
    # The slow one outlived the grace period: cancelled there, requeued, run again by v2.
    assert results["slow"].status_code == 200, results["slow"].text
    assert results["slow"].json()["version"] == "v2"
    assert time.monotonic() - started > 4
