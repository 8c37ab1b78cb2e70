"""Worker nodes: replicas spread over nodes, placement by resources, and a dead node's
replicas started elsewhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter

import requests

from broker_serve import serve
from broker_serve.client import api
from broker_serve.client.build import build_application

from .waiting import wait_for


def store_call(method: str, *args):
    runtime = api._connect()
    return runtime.run_sync(getattr(runtime.store, method)(*args))


def replicas_by_node(deployment: str) -> Counter[str]:
    records = store_call("replicas")
    return Counter(r.get("node") for r in records.values()
                   if r["deployment"] == deployment and r.get("state") == "RUNNING")


def deploy_without_waiting(target, name: str) -> None:
    """What serve.run writes, without waiting for RUNNING: this app cannot be placed."""
    runtime = api._connect()
    record, specs = build_application(target, name, None, runtime.names, runtime.secret)

    async def write() -> None:
        await runtime.store.put_app(record, specs)
        await runtime.store.announce("apps")

    runtime.run_sync(write())


@serve.deployment(num_replicas=4)
class Spread:
    def __call__(self) -> int:
        return os.getpid()


@serve.deployment(num_replicas=2, resources={"special": 1})
class Special:
    def __call__(self) -> str:
        return "special"


@serve.deployment(ray_actor_options={"num_cpus": 64})
class Huge:
    def __call__(self) -> str:
        return "never"


def test_two_nodes_share_replicas_by_resources_and_a_dead_node_is_replaced(cluster):
    serve.run(Spread.bind())  # also starts the local cluster and its worker node
    (first,) = store_call("nodes")
    second = subprocess.Popen(
        [sys.executable, "-m", "broker_serve", "worker", "--node-id", "second",
         "--num-cpus", "1", "--resources", '{"special": 2}'],
        env=cluster.env, start_new_session=True)
    try:
        wait_for(lambda: "second" in store_call("nodes"))
        serve.delete("default")
        serve.run(Spread.bind())
        assert replicas_by_node("Spread") == {first: 2, "second": 2}

        serve.run(Special.bind(), name="special", route_prefix="/special")
        assert replicas_by_node("Special") == {"second": 2}  # only it offers "special"

        deploy_without_waiting(Huge.bind(), "huge")
        pending = wait_for(lambda: (s := serve.status().applications.get("huge"))
                           and "Waiting for resources" in s.message and s)
        assert pending.status == "DEPLOYING"
        assert "CPU=64" in pending.message and "second: CPU=1" in pending.message

        os.killpg(second.pid, signal.SIGKILL)  # the node and its replicas die at once
        second.wait(10)
        wait_for(lambda: replicas_by_node("Spread") == {first: 4}, timeout=60)
        pids = {requests.get(cluster.url, timeout=30).json() for _ in range(40)}
        assert len(pids) == 4
        special = wait_for(lambda: (s := serve.status().applications["special"])
                           and "Waiting for resources" in s.message and s, timeout=30)
        assert "special=1" in special.message
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait(10)
