"""A job survives a broker restart (`rabbitmqctl stop_app`/`start_app`): it is persistent on a
durable queue, and the replicas consume again once the node is back. On a RabbitMQ node of the
test's own (tests/rabbit_cluster.py), so the system node is left alone. A job also survives the
death of the proxy it was submitted to and of the controller, and its result is read through
the proxy started after them."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from starlette.requests import Request

from broker_serve import serve
from broker_serve.client import api
from broker_serve.client.local_cluster import LocalCluster
from broker_serve.credentials import local_secret_file
from broker_serve.settings import state_dir

from .rabbit_cluster import RabbitCluster, rabbitmqctl
from .test_jobs import Gated, _ran
from .waiting import wait_for


@pytest.fixture
def own_rabbit(monkeypatch: pytest.MonkeyPatch) -> Iterator[RabbitCluster]:
    with RabbitCluster(size=1) as rabbit:
        monkeypatch.setenv("BROKER_SERVE_AMQP_URL", rabbit.amqp_url)
        yield rabbit


def test_jobs_survive_a_broker_restart(own_rabbit, cluster, tmp_path):
    handle = serve.run(Gated.bind(str(tmp_path)))
    gate = handle.run.submit("gate")
    wait_for(lambda: _ran(tmp_path) == ["gate"])
    queued = [handle.run.submit(f"job{n}") for n in range(3)]
    for job in queued:
        assert job.status() == serve.JobStatus.PENDING  # confirmed: on disk
    node = own_rabbit.node_names[0]
    rabbitmqctl(node, "stop_app", timeout=60)
    rabbitmqctl(node, "start_app", timeout=60)
    (tmp_path / "open").write_text("")
    assert [job.result(timeout_s=90) for job in queued] == ["job0", "job1", "job2"]
    assert gate.result(timeout_s=30) == "gate"
    assert gate.info()["attempts"] == 2  # its first attempt ended with the broker
    assert sorted(_ran(tmp_path)) == ["gate", "gate", "job0", "job1", "job2"]


@serve.deployment(max_ongoing_requests=1)
class GatedHttp:
    """An HTTP deployment that runs one job at a time, each waiting for a file: the test
    kills the proxy and the controller while one runs and one is queued."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    async def __call__(self, request: Request) -> str:
        name = request.query_params["name"]
        with open(self.directory / "ran", "a") as ran:
            ran.write(name + "\n")
        while not (self.directory / "open").exists():
            await asyncio.sleep(0.01)
        return f"ran {name}"


def _restart(local: LocalCluster, role: str) -> None:
    """Start `role` of the driver's local cluster again, as LocalCluster.start started it;
    the fixture's shutdown stops it with the others."""
    args = {"controller": ["controller"],
            "proxy": ["proxy", "--host", local.http_host, "--port", str(local.http_port)]}
    secret = local_secret_file(local.settings)
    local.processes[role] = local._spawn(
        role, args[role], state_dir(local.settings.cluster),
        {"BROKER_SERVE_CLUSTER_SECRET_FILE": str(secret)} if secret else {})


def test_http_jobs_survive_their_proxy_and_the_controller_and_so_do_their_results(
        cluster, tmp_path):
    serve.run(GatedHttp.bind(str(tmp_path)), route_prefix="/gated")
    ids = []
    for name in ("running", "queued"):
        answer = requests.post(f"{cluster.url}/gated", params={"name": name},
                               headers={"Prefer": "respond-async"}, timeout=30)
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["id"])
        if name == "running":
            wait_for(lambda: _ran(tmp_path) == ["running"])
    running, queued = (serve.get_job(job_id) for job_id in ids)
    assert running.status() == serve.JobStatus.RUNNING
    assert queued.status() == serve.JobStatus.PENDING
    local = api._local_cluster
    assert local is not None
    for role in ("proxy", "controller"):
        local.processes[role].send_signal(signal.SIGKILL)
        local.processes[role].wait(10)
    # With neither alive, the running job ends and the queued one runs.
    (tmp_path / "open").write_text("")
    for job, name in ((running, "running"), (queued, "queued")):
        response = job.result(timeout_s=30)  # an http job's: status, headers and body
        assert response["status"] == 200 and response["body"] == f"ran {name}".encode()
    assert [job.info()["attempts"] for job in (running, queued)] == [1, 1]
    assert _ran(tmp_path) == ["running", "queued"]
    # A new proxy serves the results the old one accepted the jobs for.
    _restart(local, "proxy")
    wait_for(lambda: _healthy(cluster.url), timeout=30)
    for job_id, name in zip(ids, ("running", "queued"), strict=True):
        answer = requests.get(f"{cluster.url}/-/jobs/{job_id}/result", timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.text == f"ran {name}"
        assert requests.get(f"{cluster.url}/-/jobs/{job_id}",
                            timeout=30).json()["status"] == "SUCCEEDED"
    _restart(local, "controller")  # so that the fixture deletes the app through one


def _healthy(url: str) -> bool:
    try:
        return requests.get(f"{url}/-/healthz", timeout=5).status_code == 200
    except requests.ConnectionError:
        return False
