"""A job survives a broker restart (`rabbitmqctl stop_app`/`start_app`): it is persistent on a
durable queue, and the replicas consume again once the node is back. On a RabbitMQ node of the
test's own (tests/rabbit_cluster.py), so the system node is left alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from broker_serve import serve

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
