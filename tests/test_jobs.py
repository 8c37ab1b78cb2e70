"""Jobs (docs/architecture.md, "Jobs"; docs/protocol.md, "Jobs"): requests nobody waits for,
run by replicas, with their results kept in Redis, through real RabbitMQ, Redis, HTTP and
replica processes."""

from __future__ import annotations

import requests
from starlette.requests import Request

from broker_serve import serve


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
