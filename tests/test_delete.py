"""Deleting an application, then deploying the same name at once (Ray's run/delete/run)."""

from __future__ import annotations

import pytest
import redis
import requests

from broker_serve import DeployFailed, serve

from .conftest import REDIS_URL

ROUNDS = 8


@serve.deployment
def answer() -> str:
    return "here"


@serve.deployment
class Counter:
    def __init__(self, start: int) -> None:
        self.start = start

    def __call__(self) -> int:
        return self.start


def test_run_delete_run_of_one_name_deploys_every_time(cluster):
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for round_ in range(ROUNDS):
            handle = serve.run(Counter.bind(round_), name="again", route_prefix="/again")
            assert handle.remote().result(timeout_s=30) == round_
            assert requests.get(f"{cluster.url}/again", timeout=30).json() == round_
            serve.delete("again")
            # Complete when delete returns: no definition, status or route of it is left.
            assert list(client.scan_iter(f"bs:{cluster.name}:spec:again:*")) == []
            assert not client.hexists(f"bs:{cluster.name}:app_status", "again")
            assert requests.get(f"{cluster.url}/again", timeout=30).status_code == 404
    finally:
        client.close()


def test_deleting_one_app_leaves_the_others_alone(cluster):
    serve.run(answer.bind(), name="stays", route_prefix="/stays")
    serve.run(answer.bind(), name="goes", route_prefix="/goes")
    serve.delete("goes")
    assert requests.get(f"{cluster.url}/stays", timeout=30).text == "here"
    assert requests.get(f"{cluster.url}/goes", timeout=30).status_code == 404


def test_a_failed_deploy_is_a_runtime_error_as_in_ray():
    assert issubclass(DeployFailed, RuntimeError)
    with pytest.raises(RuntimeError):
        raise DeployFailed("x")
