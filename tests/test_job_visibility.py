"""Jobs made visible: the controller's job metrics, `pending_jobs` in serve.status(), and the
autoscaler counting queued jobs (docs/architecture.md, "Observability" and "Jobs"), through
real RabbitMQ, Redis, HTTP, controller and replica processes."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import requests
from starlette.requests import Request

from broker_serve import serve

from .conftest import REDIS_URL
from .test_observability import Scrape, scrape, value
from .waiting import wait_for

ASYNC = {"Prefer": "respond-async"}


def submit(url: str, headers: dict[str, str] | None = None) -> str:
    answer = requests.post(url, headers={**ASYNC, **(headers or {})}, timeout=30)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def result(cluster, job_id: str) -> requests.Response:
    """The job's result once it has finished (each GET waits up to 20 s for it)."""
    def finished() -> list[requests.Response]:  # a list: a Response of status >= 400 is false
        answer = requests.get(f"{cluster.url}/-/jobs/{job_id}/result", params={"wait_s": 20},
                              timeout=40)
        return [] if answer.status_code == 202 else [answer]

    return wait_for(finished, timeout=120, interval=0)[0]


def record(cluster, job_id: str) -> dict[str, object]:
    answer = requests.get(f"{cluster.url}/-/jobs/{job_id}", timeout=30)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def controller_metrics(cluster, until: Callable[[Scrape], bool]) -> Scrape:
    """The controller's metrics, once a scrape shows `until` (it reads Redis when scraped)."""
    url = f"http://127.0.0.1:{cluster.env['BROKER_SERVE_DASHBOARD_PORT']}/metrics"

    def scraped() -> list[Scrape]:
        samples = scrape(url)
        return [samples] if until(samples) else []

    return wait_for(scraped)[0]


# scaling from zero --------------------------------------------------------------------------------
@serve.deployment(
    autoscaling_config=dict(min_replicas=0, max_replicas=2, target_ongoing_requests=1,
                            metrics_interval_s=0.25, look_back_period_s=1, upscale_delay_s=0,
                            downscale_delay_s=60),
)
class FromZero:
    async def __call__(self, request: Request) -> str:
        return f"ran {request.query_params['n']}"


def test_a_job_submitted_at_zero_replicas_scales_the_deployment_up_and_succeeds(cluster):
    serve.run(FromZero.bind(), route_prefix="/zero")
    deployment = serve.status().applications["default"].deployments["FromZero"]
    assert deployment.replica_states.get("RUNNING", 0) == 0
    job_id = submit(f"{cluster.url}/zero?n=1")
    answer = result(cluster, job_id)
    assert answer.status_code == 200, answer.text
    assert answer.text == "ran 1"
    assert record(cluster, job_id)["status"] == "SUCCEEDED"
    # The queued job was the autoscaler's reason (the status may lag the replica it started).
    deployment = serve.status().applications["default"].deployments["FromZero"]
    assert deployment.autoscaling is not None
    assert deployment.autoscaling.target_replicas >= 1
    assert "waiting at zero replicas" in deployment.autoscaling.last_decision


# the controller's job metrics ---------------------------------------------------------------------
@serve.deployment(job_config={"max_retries": 1, "retry_wait": {"wait": "fixed", "seconds": 0.1}})
class Outcomes:
    async def __call__(self, request: Request) -> str:
        if request.url.path.endswith("/fail"):
            raise ValueError("this job fails every time")
        return "ok"


def test_the_controller_exports_job_counts_retries_and_dead_letters(cluster):
    serve.run(Outcomes.bind(), route_prefix="/outcomes")
    where = {"application": "default", "deployment": "Outcomes"}
    # Known deployments start with zero totals, so the first job counts in rate().
    first = controller_metrics(cluster, lambda samples: any(
        name == "broker_serve_job_retries_total" for name, _ in samples))
    assert value(first, "broker_serve_jobs_finished_total", **where, status="SUCCEEDED") == 0
    assert value(first, "broker_serve_job_retries_total", **where) == 0
    assert value(first, "broker_serve_dead_letters") == 0

    succeeded = submit(f"{cluster.url}/outcomes/ok")
    failed = submit(f"{cluster.url}/outcomes/fail", {"X-Serve-Priority": "3"})
    assert result(cluster, succeeded).status_code == 200
    answer = result(cluster, failed)
    assert answer.status_code == 500 and answer.json()["error"] == "ValueError", answer.text
    assert record(cluster, failed)["attempts"] == 2  # one retry, then dead-lettered

    samples = controller_metrics(
        cluster, lambda samples: value(samples, "broker_serve_dead_letters") == 1)
    assert value(samples, "broker_serve_jobs_finished_total", **where, status="SUCCEEDED") == 1
    assert value(samples, "broker_serve_jobs_finished_total", **where, status="FAILED") == 1
    assert value(samples, "broker_serve_jobs_finished_total", **where, status="CANCELLED") == 0
    assert value(samples, "broker_serve_job_retries_total", **where) == 1
    assert value(samples, "broker_serve_job_dead_letters_total", **where) == 1
    # Nothing is open now: the gauges of the priorities the jobs had are back at zero.
    gauges = {dict(labels)["priority"]: v for (name, labels), v in samples.items()
              if name == "broker_serve_jobs" and dict(labels)["deployment"] == "Outcomes"}
    assert set(gauges) == {"0", "3"} and set(gauges.values()) == {0}, gauges

    # A deleted deployment's series go; the dead-letter queue (the cluster's) stays.
    serve.delete("default")

    samples = controller_metrics(cluster, lambda samples: not any(
        dict(labels).get("deployment") == "Outcomes" for _, labels in samples))
    assert value(samples, "broker_serve_dead_letters") == 1


def rest_details(cluster) -> dict[str, Any]:
    """`GET /api/serve/applications/` (what `broker-serve status --address` shows)."""
    state = Path(cluster.env["BROKER_SERVE_STATE_DIR"]) / cluster.name
    token = (state / "api-token").read_text().strip()
    answer = requests.get(
        f"http://127.0.0.1:{cluster.env['BROKER_SERVE_DASHBOARD_PORT']}/api/serve/applications/",
        headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


# pending jobs in serve.status() -------------------------------------------------------------------
@serve.deployment(max_ongoing_requests=1)
class Blocker:
    """Each job waits until the test pushes to its Redis list: the test holds the replica."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.redis = aioredis.Redis.from_url(REDIS_URL)

    async def __call__(self, request: Request) -> str:
        await self.redis.blpop([self.key], timeout=60)
        return "released"


def test_status_counts_the_jobs_queued_behind_a_running_one(cluster):
    key = f"bs:{cluster.name}:test:release:{secrets.token_hex(4)}"
    serve.run(Blocker.bind(key), route_prefix="/block")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        running = submit(f"{cluster.url}/block")
        wait_for(lambda: record(cluster, running)["status"] == "RUNNING", timeout=60)
        queued = submit(f"{cluster.url}/block", {"X-Serve-Priority": "7"})
        assert record(cluster, queued)["status"] == "PENDING"
        deployment = serve.status().applications["default"].deployments["Blocker"]
        assert deployment.pending_jobs == 1
        assert rest_details(cluster)["applications"]["default"]["deployments"]["Blocker"][
            "pending_jobs"] == 1

        where = {"application": "default", "deployment": "Blocker"}
        samples = controller_metrics(cluster, lambda samples: value(
            samples, "broker_serve_jobs", **where, status="PENDING", priority="7") == 1)
        assert value(samples, "broker_serve_jobs", **where, status="RUNNING", priority="0") == 1
        assert value(samples, "broker_serve_jobs", **where, status="PENDING", priority="0") == 0

        client.rpush(key, "go", "go")
        for job_id in (running, queued):
            assert result(cluster, job_id).text == "released"
        assert serve.status().applications["default"].deployments["Blocker"].pending_jobs == 0
    finally:
        client.rpush(key, "go", "go")  # never leave a replica blocked
        client.delete(key)
        client.close()


@pytest.mark.parametrize("counts, expected", [
    ({}, {}),
    ({"PENDING|0|a|D": 2, "PENDING|9|a|D": 1, "RUNNING|0|a|D": 4, "SUCCEEDED|0|a|D": 7,
      "PENDING|0|b|E": 0, "retries|a|D": 3, "dead|a|D": 1}, {("a", "D"): 3, ("b", "E"): 0}),
])
def test_pending_jobs_are_summed_over_priorities(counts, expected):
    from broker_serve.state.status import pending_jobs

    assert pending_jobs(counts) == expected
