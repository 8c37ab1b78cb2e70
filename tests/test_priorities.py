"""Message priorities (docs/protocol.md, "Priorities"): `handle.options(priority=)` and the HTTP
header `X-Serve-Priority` order a deployment's queued requests, highest first and FIFO within
one; a deadline reorders only under `order_by_deadline`; every classic request queue is declared
with `x-max-priority: 9`, a quorum queue without.

The deployment runs one request at a time, and its first request waits for a file, so the
others queue behind it; each request appends its tag to a file as it starts.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pika
import pytest
import redis
import requests
from starlette.requests import Request

from broker_serve import serve
from broker_serve.client.handle import DeploymentHandle
from broker_serve.protocol import priorities

from .conftest import AMQP_URL, REDIS_URL
from .waiting import wait_for


@serve.deployment(max_ongoing_requests=1)
class Gated:
    """Runs one request at a time; `gate` waits for the file `open`."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    async def work(self, tag: str) -> str:
        with open(self.directory / "ran", "a") as ran:
            ran.write(tag + "\n")
        while tag == "gate" and not (self.directory / "open").exists():
            await asyncio.sleep(0.01)
        return tag

    async def __call__(self, request: Request) -> str:
        return await self.work(request.query_params["tag"])


@serve.deployment(queue_type="quorum")
class Durable:
    def __call__(self) -> str:
        return "ok"


def ran(directory: Path) -> list[str]:
    path = directory / "ran"
    return path.read_text().split() if path.exists() else []


def queue_depth(queue: str) -> int:
    """Messages waiting in a queue that exists (a passive declare of a missing one would be a
    channel error)."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def gate(handle: DeploymentHandle, directory: Path) -> object:
    """The request that holds the replica's one slot until `release`."""
    held = handle.work.remote("gate")
    wait_for(lambda: ran(directory) == ["gate"], timeout=30, interval=0.02)
    return held


def release(directory: Path) -> None:
    (directory / "open").write_text("")


def declared_arguments(cluster_name: str) -> dict[str, dict[str, object]]:
    """Each of the cluster's queues with its arguments, as RabbitMQ lists them."""
    listed = subprocess.run(["rabbitmqctl", "list_queues", "--quiet", "name", "arguments",
                             "--formatter", "json"], capture_output=True, text=True,
                            check=True, timeout=60).stdout
    return {entry["name"]: {name: value for name, _, value in entry["arguments"]}
            for entry in json.loads(listed) if entry["name"].startswith(f"bs.{cluster_name}.")}


def test_handle_calls_run_by_priority_fifo_within_one(cluster, tmp_path):
    handle = serve.run(Gated.bind(str(tmp_path)))
    held = gate(handle, tmp_path)
    queue = f"bs.{cluster.name}.default.Gated"
    order = [1, 5, 0, 9, 5, None, 1, 9]
    calls = []
    for n, priority in enumerate(order):
        called = handle if priority is None else handle.options(priority=priority)
        calls.append(called.work.remote(f"p{priority or 0}-{n}"))
        # Published in this order: each is in the queue before the next is made.
        wait_for(lambda n=n: queue_depth(queue) == n + 1, timeout=10, interval=0.02)
    release(tmp_path)
    tags = [call.result(timeout_s=30) for call in [held, *calls]]
    assert tags == ["gate"] + [f"p{p or 0}-{n}" for n, p in enumerate(order)]
    assert ran(tmp_path) == ["gate", "p9-3", "p9-7", "p5-1", "p5-4", "p1-0", "p1-6", "p0-2",
                             "p0-5"]
    assert Counter(ran(tmp_path)) == dict.fromkeys(ran(tmp_path), 1)


def test_the_priority_option_is_checked_and_kept():
    handle = DeploymentHandle("D", "app")
    for bad in (-1, 10, 1.5, "3", True):
        with pytest.raises(ValueError, match="priority must be an integer from 0 to 9"):
            handle.options(priority=bad)
    kept = handle.options(priority=7).options(relative_slo_ms=5).method_x
    assert kept.priority == 7 and kept.method_name == "method_x"
    assert kept.job_options.priority == 7  # jobs submitted through it too
    assert kept.options(priority=0).priority == 0
    assert handle.priority is None
    rebuilt = kept.__reduce__()
    assert rebuilt[0](*rebuilt[1]).priority == 7


def test_http_requests_run_by_x_serve_priority(cluster, tmp_path):
    handle = serve.run(Gated.bind(str(tmp_path)))
    held = gate(handle, tmp_path)
    queue = f"bs.{cluster.name}.default.Gated"
    order = ["2", None, "8", "2", "0"]
    with ThreadPoolExecutor(len(order)) as pool:
        answers = []
        for n, priority in enumerate(order):
            headers = {} if priority is None else {"X-Serve-Priority": priority}
            answers.append(pool.submit(requests.get, f"{cluster.url}/?tag=h{n}",
                                       headers=headers, timeout=30))
            wait_for(lambda n=n: queue_depth(queue) == n + 1, timeout=10, interval=0.02)
        release(tmp_path)
        assert [answer.result().text for answer in answers] == [f"h{n}" for n in range(5)]
    assert held.result(timeout_s=30) == "gate"
    assert ran(tmp_path) == ["gate", "h2", "h0", "h3", "h1", "h4"]


def test_a_bad_x_serve_priority_is_refused_before_it_is_published(cluster, tmp_path):
    serve.run(Gated.bind(str(tmp_path)))
    for bad in ("10", "-1", "high", "1.5", ""):
        answer = requests.get(f"{cluster.url}/?tag=bad", headers={"X-Serve-Priority": bad},
                              timeout=30)
        assert answer.status_code == 400, (bad, answer.text)
        assert "X-Serve-Priority must be an integer from 0 to 9" in answer.text, answer.text
    answer = requests.get(f"{cluster.url}/?tag=good", headers={"X-Serve-Priority": "9"},
                          timeout=30)
    assert answer.status_code == 200 and answer.text == "good"
    assert ran(tmp_path) == ["good"]


@pytest.mark.parametrize("ordered", [False, True], ids=["fifo", "order_by_deadline"])
def test_a_deadline_reorders_only_under_order_by_deadline(cluster, tmp_path, ordered):
    handle = serve.run(Gated.options(order_by_deadline=ordered).bind(str(tmp_path)))
    held = gate(handle, tmp_path)
    queue = f"bs.{cluster.name}.default.Gated"
    made = [
        ("none", handle),
        ("far", handle.options(relative_slo_ms=60_000)),  # deadline priority 1
        ("near", handle.options(relative_slo_ms=8_000)),  # deadline priority 2
        # An explicit priority wins over the deadline's, even 0.
        ("pinned", handle.options(relative_slo_ms=8_000, priority=0)),
    ]
    calls = []
    for n, (tag, called) in enumerate(made):
        calls.append(called.work.remote(tag))
        wait_for(lambda n=n: queue_depth(queue) == n + 1, timeout=10, interval=0.02)
    release(tmp_path)
    assert [call.result(timeout_s=30) for call in [held, *calls]] == \
        ["gate", "none", "far", "near", "pinned"]
    expected = ["near", "far", "none", "pinned"] if ordered else ["none", "far", "near", "pinned"]
    assert ran(tmp_path) == ["gate", *expected]


def test_classic_queues_have_priorities_and_quorum_ones_none(cluster, tmp_path):
    serve.run(Gated.bind(str(tmp_path)), name="classic", route_prefix="/classic")
    serve.run(Durable.bind(), name="durable", route_prefix="/durable")
    declared = declared_arguments(cluster.name)
    classic = declared[f"bs.{cluster.name}.classic.Gated"]
    durable = declared[f"bs.{cluster.name}.durable.Durable"]
    assert classic["x-max-priority"] == priorities.MAX_PRIORITY
    assert durable["x-queue-type"] == "quorum" and "x-max-priority" not in durable
    recorded = redis.Redis.from_url(REDIS_URL).hgetall(f"bs:{cluster.name}:queue_arguments")
    assert json.loads(recorded[f"bs.{cluster.name}.classic.Gated".encode()]) == classic
    assert json.loads(recorded[f"bs.{cluster.name}.durable.Durable".encode()]) == durable


def test_a_queue_declared_before_priorities_is_re_created_once_drained(cluster, tmp_path):
    """An upgraded cluster: the queue and its record as a cluster without priorities left
    them. The controller re-creates the (empty) queue with x-max-priority, and it orders."""
    queue = f"bs.{cluster.name}.default.Gated"
    old = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"bs.{cluster.name}.dead"}
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.queue_declare(f"bs.{cluster.name}.dead", durable=True)
        channel.queue_declare(queue, durable=True, arguments=old)
    finally:
        connection.close()
    redis.Redis.from_url(REDIS_URL).hset(f"bs:{cluster.name}:queue_arguments", queue,
                                         json.dumps(old))
    handle = serve.run(Gated.bind(str(tmp_path)))
    assert declared_arguments(cluster.name)[queue]["x-max-priority"] == priorities.MAX_PRIORITY
    held = gate(handle, tmp_path)
    low = handle.options(priority=1).work.remote("low")
    wait_for(lambda: queue_depth(queue) == 1, timeout=10, interval=0.02)
    high = handle.options(priority=2).work.remote("high")
    wait_for(lambda: queue_depth(queue) == 2, timeout=10, interval=0.02)
    release(tmp_path)
    assert [c.result(timeout_s=30) for c in (held, low, high)] == ["gate", "low", "high"]
    assert ran(tmp_path) == ["gate", "high", "low"]


def test_replicas_consume_again_after_their_queue_is_re_created(cluster, tmp_path):
    """An upgraded cluster with replicas running: the controller re-creates their queue with
    the new arguments once it is drained, RabbitMQ cancels their consumers, and they are
    replaced by replicas that consume the new queue. Nothing is left unconsumed."""
    queue = f"bs.{cluster.name}.default.Gated"
    handle = serve.run(Gated.bind(str(tmp_path)))
    assert handle.work.remote("before").result(timeout_s=30) == "before"
    client = redis.Redis.from_url(REDIS_URL)
    replicas = set(client.hkeys(f"bs:{cluster.name}:replicas"))
    old = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"bs.{cluster.name}.dead"}
    client.hset(f"bs:{cluster.name}:queue_arguments", queue, json.dumps(old))

    def replaced() -> bool:
        running = {rid for rid, record in client.hgetall(f"bs:{cluster.name}:replicas").items()
                   if json.loads(record)["state"] == "RUNNING"}
        return bool(running) and not running & replicas

    wait_for(replaced, timeout=60, interval=0.2)
    assert json.loads(client.hget(f"bs:{cluster.name}:queue_arguments", queue)) == \
        declared_arguments(cluster.name)[queue]
    assert [handle.work.remote(f"after{n}").result(timeout_s=30) for n in range(3)] == [
        "after0", "after1", "after2"]
