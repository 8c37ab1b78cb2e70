"""Jobs (docs/architecture.md, "Jobs"; docs/protocol.md, "Jobs"): requests nobody waits for,
run by replicas, with their results kept in Redis, through real RabbitMQ, Redis, HTTP and
replica processes."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pika
import pytest
import redis
import requests
from starlette.requests import Request

from broker_serve import serve
from broker_serve.exceptions import RequestCancelledError

from .conftest import AMQP_URL, REDIS_URL
from .waiting import wait_for


@serve.deployment(max_ongoing_requests=4)
class Echo:
    async def __call__(self, request: Request) -> dict[str, object]:
        body = await request.body()
        return {"path": request.url.path, "body": body.decode(), "q": request.query_params.get("q")}


def test_an_http_job_answers_202_and_its_result_is_the_synchronous_response(cluster):
    serve.run(Echo.bind(), route_prefix="/echo")
    submitted = requests.post(f"{cluster.url}/echo/x?q=1", data=b"hello",
                              headers={"Prefer": "respond-async"}, timeout=30)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert submitted.headers["location"] == f"/-/jobs/{job_id}"
    assert submitted.headers["preference-applied"] == "respond-async"
    result = requests.get(f"{cluster.url}/-/jobs/{job_id}/result", params={"wait_s": 20},
                          timeout=30)
    assert result.status_code == 200, result.text
    assert result.json() == {"path": "/echo/x", "body": "hello", "q": "1"}
    assert result.headers["content-type"] == "application/json"
    status = requests.get(f"{cluster.url}/-/jobs/{job_id}", timeout=30).json()
    assert status["status"] == "SUCCEEDED"
    assert status["attempts"] == 1
    assert status["app"] == "default" and status["deployment"] == "Echo"
    assert status["finished_at"] >= status["started_at"] >= status["submitted_at"]
    # Bad input is refused before anything is published, and unknown ids are 404.
    bad = requests.post(f"{cluster.url}/echo", headers={"Prefer": "respond-async",
                                                        "X-Serve-Priority": "12"}, timeout=30)
    assert bad.status_code == 400 and "X-Serve-Priority" in bad.text
    assert requests.get(f"{cluster.url}/-/jobs/nope", timeout=30).status_code == 404
    assert requests.get(f"{cluster.url}/-/jobs/nope/result", timeout=30).status_code == 404
    assert requests.delete(f"{cluster.url}/-/jobs/nope", timeout=30).status_code == 404
    assert requests.post(f"{cluster.url}/nowhere", headers={"Prefer": "respond-async"},
                         timeout=30).status_code == 404


@serve.deployment(max_ongoing_requests=8)
class Sync:
    """A sync handler, as the first wave's bugs needed: each job counts its runs in Redis."""

    def __init__(self, namespace: str) -> None:
        self.redis = redis.Redis.from_url(REDIS_URL)
        self.namespace = namespace

    def __call__(self, request: Request) -> str:
        token = request.query_params["token"]
        self.redis.incr(f"{self.namespace}:ran:{token}")
        return token


def test_concurrent_http_jobs_each_run_exactly_once(cluster):
    namespace = f"bs:{cluster.name}:test"
    serve.run(Sync.options(num_replicas=2).bind(namespace), route_prefix="/sync")

    def submit(n: int) -> str:
        answer = requests.get(f"{cluster.url}/sync", params={"token": f"t{n}"},
                              headers={"Prefer": "respond-async"}, timeout=30)
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])

    def result(job_id: str) -> str:
        answer = requests.get(f"{cluster.url}/-/jobs/{job_id}/result",
                              params={"wait_s": 30}, timeout=40)
        assert answer.status_code == 200, answer.text
        return answer.text

    with ThreadPoolExecutor(32) as pool:
        ids = list(pool.map(submit, range(256)))
        texts = list(pool.map(result, ids))
    assert texts == [f"t{n}" for n in range(256)]
    client = redis.Redis.from_url(REDIS_URL)
    assert [int(client.get(f"{namespace}:ran:t{n}") or 0) for n in range(256)] == [1] * 256


@serve.deployment(max_ongoing_requests=2,
                  job_config={"max_retries": 2, "retry_wait": {"wait": "fixed", "seconds": 0.05}})
class Flaky:
    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def fail_times(self, key: str, times: int) -> str:
        self.calls[key] = self.calls.get(key, 0) + 1
        if self.calls[key] <= times:
            raise ValueError(f"{key} failed on call {self.calls[key]}")
        return f"{key} ok after {self.calls[key]} calls"

    async def count(self, n: int):
        for i in range(n):
            yield i

    def pair(self, a: int) -> tuple[int, int]:
        return (a, a + 1)

    def add(self, a: int, b: int) -> int:
        return a + b

    def __call__(self, a: int, b: int) -> int:
        return a * b


def test_handle_jobs_retry_and_return_values_streams_and_exceptions(cluster):
    handle = serve.run(Flaky.bind())
    ok = handle.fail_times.submit("a", 2)  # fails twice, then succeeds: 3 attempts
    assert ok.result(timeout_s=30) == "a ok after 3 calls"
    info = ok.info()
    assert info["status"] == "SUCCEEDED" and info["attempts"] == 3
    assert info["error"] == "ValueError"  # the last failure stays on the record
    assert handle.count.submit(3).result(timeout_s=30) == [0, 1, 2]
    assert handle.pair.submit(4).result(timeout_s=30) == (4, 5)
    failing = handle.fail_times.submit("b", 10)  # 1 + max_retries attempts, all failing
    with pytest.raises(ValueError, match="b failed on call 3"):
        failing.result(timeout_s=30)
    assert failing.status() == serve.JobStatus.FAILED
    assert failing.info()["attempts"] == 3
    # A job's own options override the deployment's job_config.
    once = handle.options(max_retries=0).fail_times.submit("c", 1)
    with pytest.raises(ValueError, match="c failed on call 1"):
        once.result(timeout_s=30)
    assert once.info()["attempts"] == 1
    with pytest.raises(ValueError, match="max_retries"):
        handle.options(max_retries=-1)
    # Any process reads a job by its id, and a driver's own event loop may await it.
    assert serve.get_job(ok.id).result(timeout_s=5) == "a ok after 3 calls"
    assert asyncio.run(handle.add.submit(2, 3).result_async(timeout_s=30)) == 5
    assert handle.submit(2, 3).result(timeout_s=30) == 6  # the handle itself: __call__


def test_a_result_is_fetched_after_its_submitter_exited(cluster):
    serve.run(Flaky.bind())
    submitted = cluster.run_script(textwrap.dedent("""
        from broker_serve import serve
        job = serve.get_app_handle("default").pair.submit(20)
        print(job.id)
        print(job.status().value)
    """))
    assert submitted.returncode == 0, submitted.stderr
    job_id, status = submitted.stdout.split()[-2:]
    assert status in ("PENDING", "RUNNING", "SUCCEEDED")
    assert serve.get_job(job_id).result(timeout_s=30) == (20, 21)


@serve.deployment(max_ongoing_requests=1)
class Gated:
    """Runs one job at a time; the first waits for a file, so the others queue behind it.
    Each run appends its name to a file, and a cancelled one writes that down too."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    async def run(self, name: str) -> str:
        with open(self.directory / "ran", "a") as ran:
            ran.write(name + "\n")
        if name == "gate":
            try:
                while not (self.directory / "open").exists():
                    await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                (self.directory / "cancelled").write_text(name)
                raise
        return name


def _ran(directory: Path) -> list[str]:
    path = directory / "ran"
    return path.read_text().split() if path.exists() else []


def test_cancelling_a_queued_and_a_running_job(cluster, tmp_path):
    handle = serve.run(Gated.bind(str(tmp_path)))
    gate = handle.run.submit("gate")
    wait_for(lambda: _ran(tmp_path) == ["gate"])
    queued = handle.run.submit("queued")
    assert queued.status() == serve.JobStatus.PENDING
    assert queued.cancel() == serve.JobStatus.PENDING
    assert queued.status() == serve.JobStatus.CANCELLED
    with pytest.raises(RequestCancelledError):
        queued.result(timeout_s=5)
    # The running one: over HTTP, as a foreign caller would.
    answer = requests.delete(f"{cluster.url}/-/jobs/{gate.id}", timeout=30)
    assert answer.status_code == 202, answer.text
    assert gate.status() in (serve.JobStatus.RUNNING, serve.JobStatus.CANCELLED)
    with pytest.raises(RequestCancelledError):
        gate.result(timeout_s=30)
    assert (tmp_path / "cancelled").read_text() == "gate"
    # The cancelled queued job is acked unrun when the replica reaches it.
    last = handle.run.submit("last")
    assert last.result(timeout_s=30) == "last"
    assert _ran(tmp_path) == ["gate", "last"]
    assert requests.get(f"{cluster.url}/-/jobs/{gate.id}/result", timeout=30).status_code == 499
    assert requests.delete(f"{cluster.url}/-/jobs/{last.id}", timeout=30).status_code == 409


def test_a_job_past_its_deadline_never_starts(cluster, tmp_path):
    handle = serve.run(Gated.bind(str(tmp_path)))
    handle.run.submit("gate")
    wait_for(lambda: _ran(tmp_path) == ["gate"])
    late = handle.options(deadline_s=0.5).run.submit("late")
    # Still queued, it shows as FAILED once its deadline has passed: it will never start.
    wait_for(lambda: late.info()["status"] == "FAILED", timeout=10)
    assert late.info()["error"] == "DeadlineExceeded"
    (tmp_path / "open").write_text("")
    answer = requests.get(f"{cluster.url}/-/jobs/{late.id}/result", params={"wait_s": 20},
                          timeout=30)
    assert answer.status_code == 408, answer.text
    assert _ran(tmp_path) == ["gate"]
    with pytest.raises(Exception, match="deadline"):
        late.result(timeout_s=5)


def test_queued_jobs_run_by_priority(cluster, tmp_path):
    handle = serve.run(Gated.bind(str(tmp_path)))
    handle.run.submit("gate")
    wait_for(lambda: _ran(tmp_path) == ["gate"])
    jobs = []
    for n, priority in enumerate([1, 5, 0, 9, 5, 1]):
        jobs.append(handle.options(priority=priority).run.submit(f"p{priority}-{n}"))
        # Published in order: each is confirmed before the next is submitted.
        assert jobs[-1].status() == serve.JobStatus.PENDING
    (tmp_path / "open").write_text("")
    for job in jobs:
        job.result(timeout_s=30)
    assert _ran(tmp_path) == ["gate", "p9-3", "p5-1", "p5-4", "p1-0", "p1-5", "p0-2"]


@serve.deployment(max_ongoing_requests=1, num_replicas=2)
class Mortal:
    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    async def work(self) -> str:
        first = self.directory / "first"
        if not first.exists():
            first.write_text(str(os.getpid()))
            await asyncio.sleep(600)  # killed before it ends
        return f"done in {os.getpid()}"


def test_a_job_survives_a_sigkilled_replica(cluster, tmp_path):
    handle = serve.run(Mortal.bind(str(tmp_path)))
    job = handle.work.submit()
    pid = int(wait_for(lambda: (tmp_path / "first").exists()
                       and (tmp_path / "first").read_text()))
    assert job.status() == serve.JobStatus.RUNNING
    os.kill(pid, signal.SIGKILL)
    assert job.result(timeout_s=60).startswith("done in ")
    assert job.result(timeout_s=5) != f"done in {pid}"
    info = job.info()
    assert info["attempts"] == 2 and info["status"] == "SUCCEEDED"


def test_a_foreign_client_submits_a_job_as_the_protocol_says(cluster):
    """docs/protocol.md, "Example: a job from another language", with pika and msgpack only."""
    serve.run(Flaky.bind())
    job_id = secrets.token_hex(16)
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            "", f"bs.{cluster.name}.default.Flaky",
            msgpack.packb({"method": "add", "args": [1, 2], "kwargs": {}}),
            pika.BasicProperties(type="call", content_type="application/msgpack",
                                 message_id=job_id, correlation_id=job_id, delivery_mode=2,
                                 priority=5, headers={"bs-version": 1, "bs-job": 3600}),
            mandatory=True)
    finally:
        connection.close()

    def finished() -> dict[str, object] | None:
        answer = requests.get(f"{cluster.url}/-/jobs/{job_id}", timeout=10)
        if answer.status_code == 404:  # no replica has taken it yet
            return None
        body = answer.json()
        return body if body["status"] == "SUCCEEDED" else None

    record = wait_for(finished, timeout=30)
    assert record["priority"] == 5 and record["kind"] == "call"
    result = requests.get(f"{cluster.url}/-/jobs/{job_id}/result", timeout=10)
    assert result.status_code == 200 and result.json() == 3
    # The record is a plain Redis hash, readable without broker-serve.
    stored = redis.Redis.from_url(REDIS_URL).hgetall(f"bs:{cluster.name}:job:{job_id}")
    assert stored[b"status"] == b"SUCCEEDED"
    assert msgpack.unpackb(stored[b"result"]) == [["result", {"value": 3, "more": False}]]


@serve.deployment(job_config={"max_retries": 3, "retry_wait": {"wait": "fixed", "seconds": 0.05}})
class AlwaysFails:
    async def __call__(self, request: Request) -> str:
        raise ValueError("this job fails every time")


def test_an_http_job_takes_its_options_from_x_serve_headers(cluster):
    serve.run(AlwaysFails.bind(), route_prefix="/fails")
    url = f"{cluster.url}/fails"
    options = {"X-Serve-Priority": "4", "X-Serve-Max-Retries": "1", "X-Serve-Job-Ttl-S": "120",
               "X-Serve-Job-Deadline-S": "600"}
    before = time.time()
    submitted = requests.post(url, headers={"Prefer": "respond-async", **options}, timeout=30)
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    result = requests.get(f"{cluster.url}/-/jobs/{job_id}/result", params={"wait_s": 20},
                          timeout=30)
    assert result.status_code == 500 and result.json()["error"] == "ValueError", result.text
    record = requests.get(f"{cluster.url}/-/jobs/{job_id}", timeout=30).json()
    # The header's max_retries, not the deployment's 3: one retry, so two attempts.
    assert record["status"] == "FAILED" and record["attempts"] == 2, record
    assert record["max_retries"] == 1 and record["priority"] == 4
    assert before + 600 <= record["deadline_at"] <= time.time() + 600
    stored = redis.Redis.from_url(REDIS_URL)
    key = f"bs:{cluster.name}:job:{job_id}"
    assert stored.hget(key, "ttl_s") == b"120" and 0 < stored.ttl(key) <= 120
    for header, bad in (("X-Serve-Max-Retries", "101"), ("X-Serve-Job-Ttl-S", "0"),
                        ("X-Serve-Job-Deadline-S", "soon"), ("X-Serve-Job-Deadline-S", "-1")):
        refused = requests.post(url, headers={"Prefer": "respond-async", header: bad},
                                timeout=30)
        assert refused.status_code == 400 and header.lower() in refused.text.lower(), (
            header, bad, refused.text)


def test_malformed_jobs_fail_with_a_reason_and_are_dead_lettered(cluster):
    serve.run(Echo.bind(), route_prefix="/echo")
    queue = f"bs.{cluster.name}.default.Echo"
    http = {"scope": {"method": "GET", "path": "/echo"}, "body": b"", "more_body": False}
    cases = {
        "bad-ttl": ("http", {"bs-version": 1, "bs-job": "soon"}, http),
        "more-body": ("http", {"bs-version": 1, "bs-job": 60}, {**http, "more_body": True}),
        "websocket": ("websocket", {"bs-version": 1, "bs-job": 60}, {"scope": {"path": "/"}}),
        "bad-wait": ("http", {"bs-version": 1, "bs-job": 60, "bs-retry-wait": "{\"wait\": 1}"},
                     http),
    }
    ids = {case: secrets.token_hex(16) for case in cases}
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        for case, (kind, headers, body) in cases.items():
            channel.basic_publish("", queue, msgpack.packb(body), pika.BasicProperties(
                type=kind, message_id=ids[case], correlation_id=ids[case], delivery_mode=2,
                headers=headers), mandatory=True)

        def ended(job_id: str) -> dict[str, object] | None:
            answer = requests.get(f"{cluster.url}/-/jobs/{job_id}", timeout=10)
            return answer.json() if answer.status_code == 200 and answer.json()[
                "status"] == "FAILED" else None

        for case, job_id in ids.items():
            record = wait_for(lambda job_id=job_id: ended(job_id), timeout=30)
            assert record["error"] in ("MalformedMessage",), (case, record)
        dead = {}
        for _ in range(len(cases)):
            method, properties, _body = channel.basic_get(f"bs.{cluster.name}.dead")
            assert method is not None
            dead[properties.message_id] = properties.headers
            channel.basic_ack(method.delivery_tag)
        assert set(dead) == set(ids.values())
        for headers in dead.values():
            assert headers["bs-dead-reason"] == "malformed"
            assert headers["bs-dead-queue"] == queue
            assert headers["bs-dead-error"] == "MalformedMessage"
    finally:
        connection.close()


def test_job_config_in_code_and_in_a_config_file_is_checked():
    from pydantic import ValidationError

    from broker_serve.client.application import merge_config
    from broker_serve.config import DeploymentConfig
    from broker_serve.protocol.jobs import retry_delay_s
    from broker_serve.schema import DeploymentSchema

    options = DeploymentSchema(name="X", job_config={
        "max_retries": 1, "retry_wait": {"wait": "incrementing", "start": 1, "increment": 2},
        "result_ttl_s": 60}).options()
    config = merge_config(DeploymentConfig(), options)
    assert config.job_config.max_retries == 1 and config.job_config.result_ttl_s == 60
    assert [retry_delay_s(config.job_config.retry_wait, n) for n in (1, 2, 3)] == [1, 3, 5]
    assert DeploymentConfig().job_config.max_retries == 3
    for bad in ({"max_retries": -1}, {"result_ttl_s": 0}, {"retry_wait": {"wait": "soon"}},
                {"retries": 2}):
        with pytest.raises(ValidationError):
            DeploymentSchema(name="X", job_config=bad)
    from broker_serve.client.handle import DeploymentHandle

    handle = DeploymentHandle("Echo", "default")
    for bad in ({"deadline_s": 0}, {"result_ttl_s": 0}, {"max_retries": 101},
                {"retry_wait": {"wait": "soon"}}):
        with pytest.raises(ValueError):
            handle.options(**bad)
    kept = handle.options(max_retries=1).options(deadline_s=5).method_x
    assert kept.job_options.max_retries == 1 and kept.job_options.deadline_s == 5


@serve.deployment(max_ongoing_requests=2,
                  job_config={"max_retries": 1, "retry_wait": {"wait": "fixed", "seconds": 0.05}})
class Recovering:
    """Fails until a file exists: the fix an operator deploys before replaying."""

    def __init__(self, directory: str) -> None:
        self.fixed = Path(directory) / "fixed"

    def work(self, n: int) -> int:
        if not self.fixed.exists():
            raise RuntimeError(f"not fixed yet ({n})")
        return n * 10


def test_retries_then_dead_letter_then_replay_ending_in_success(cluster, tmp_path):
    handle = serve.run(Recovering.bind(str(tmp_path)))
    job = handle.work.submit(4)
    with pytest.raises(RuntimeError, match="not fixed yet"):
        job.result(timeout_s=30)
    info = job.info()
    assert info["status"] == "FAILED" and info["attempts"] == 2
    api = f"http://127.0.0.1:{cluster.env['BROKER_SERVE_DASHBOARD_PORT']}"
    state = Path(cluster.env["BROKER_SERVE_STATE_DIR"]) / cluster.name
    auth = {"Authorization": f"Bearer {(state / 'api-token').read_text().strip()}"}
    listed = requests.get(f"{api}/api/serve/dead", headers=auth, timeout=30)
    assert listed.status_code == 200, listed.text
    [dead] = [entry for entry in listed.json()["dead_letters"] if entry["id"] == job.id]
    assert dead["reason"] == "retries-exhausted" and dead["error"] == "RuntimeError"
    assert dead["app"] == "default" and dead["deployment"] == "Recovering"
    (tmp_path / "fixed").write_text("")
    replayed = requests.post(f"{api}/api/serve/dead/replay", json={"ids": [job.id]},
                             headers=auth, timeout=30)
    assert replayed.status_code == 200, replayed.text
    assert serve.get_job(job.id).result(timeout_s=30) == 40
    info = job.info()
    assert info["status"] == "SUCCEEDED" and info["replays"] == 1 and info["attempts"] == 1
    after = requests.get(f"{api}/api/serve/dead", headers=auth, timeout=30).json()
    assert [entry for entry in after["dead_letters"] if entry["id"] == job.id] == []
