"""Model affinity: a multiplexed model's requests go to a replica that already holds it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import requests
from starlette.requests import Request

from broker_serve import serve
from broker_serve.transport.affinity import AffinityTable

QUEUE = "bs.t.app.Models"


def reply(replica: str, models: list[str], capacity: int = 2) -> dict[str, object]:
    return {"replica": replica, "models": models, "capacity": capacity}


def test_table_picks_the_least_busy_holder_with_room():
    table = AffinityTable()
    assert not table.knows(QUEUE) and table.pick(QUEUE, "m1") is None
    table.observe(QUEUE, None, reply("r1", ["m1"]))
    table.observe(QUEUE, None, reply("r2", ["m1", "m2"]))
    assert table.knows(QUEUE)
    assert table.pick(QUEUE, "m2") == "r2"
    assert table.pick(QUEUE, "m1") == "r1"  # r2 has one in flight already
    assert table.pick(QUEUE, "m1") in {"r1", "r2"}
    assert table.pick(QUEUE, "m1") in {"r1", "r2"}
    assert table.pick(QUEUE, "m1") is None  # both at capacity 2: the shared queue
    table.done(QUEUE, "r1")
    assert table.pick(QUEUE, "m1") == "r1"
    assert table.pick(QUEUE, "m3") is None  # nobody holds it


def test_table_forgets_a_replica_that_did_not_take_its_request():
    table = AffinityTable()
    table.observe(QUEUE, None, reply("r1", ["m1"]))
    assert table.pick(QUEUE, "m1") == "r1"
    # The request waited out its time in r1's queue and another replica answered it.
    table.observe(QUEUE, "r1", reply("r2", ["m1"]))
    table.done(QUEUE, "r1")
    assert table.pick(QUEUE, "m1") == "r2"


def test_table_follows_evictions():
    table = AffinityTable()
    table.observe(QUEUE, None, reply("r1", ["m1"]))
    table.observe(QUEUE, None, reply("r1", ["m2"]))  # r1 evicted m1 meanwhile
    assert table.pick(QUEUE, "m1") is None
    assert table.pick(QUEUE, "m2") == "r1"


@serve.deployment(num_replicas=2, max_ongoing_requests=4)
class Models:
    def __init__(self, loads_dir: str) -> None:
        self.loads = Path(loads_dir)

    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str) -> str:
        marker = self.loads / f"{model_id}-{os.getpid()}"
        marker.write_text(str(os.getpid()))
        return f"model {model_id}"

    async def __call__(self, request: Request) -> dict[str, object]:
        model_id = serve.get_multiplexed_model_id()
        model = await self.get_model(model_id) if model_id else None
        return {"model": model, "pid": os.getpid()}

    async def predict(self, x: int) -> str:
        model = await self.get_model(serve.get_multiplexed_model_id())
        return f"{model}: {x}"


def loads_of(loads: Path, model_id: str) -> list[int]:
    return sorted(int(p.read_text()) for p in loads.glob(f"{model_id}-*"))


def get(url: str, model_id: str) -> dict[str, object]:
    response = requests.get(url, headers={"serve_multiplexed_model_id": model_id}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_repeated_requests_for_a_model_load_it_once(cluster, tmp_path):
    loads = tmp_path / "loads"
    loads.mkdir()
    handle = serve.run(Models.bind(str(loads)))
    for _ in range(20):
        assert get(cluster.url, "m1")["model"] == "model m1"
    for i in range(20):
        assert handle.options(method_name="predict", multiplexed_model_id="m2").remote(
            i).result(timeout_s=30) == f"model m2: {i}"
    assert len(loads_of(loads, "m1")) == 1
    assert len(loads_of(loads, "m2")) == 1
    # Both replicas still serve requests that name no model, from the shared queue.
    pids = {get(cluster.url, "")["pid"] for _ in range(30)}
    assert len(pids) == 2


def test_a_dead_holder_delays_its_model_requests_but_loses_none(cluster, tmp_path):
    loads = tmp_path / "loads"
    loads.mkdir()
    serve.run(Models.bind(str(loads)))
    for _ in range(5):
        get(cluster.url, "m1")
    (holder,) = loads_of(loads, "m1")
    os.kill(holder, signal.SIGKILL)
    # The proxy still believes the dead replica holds m1: its next request waits in the dead
    # replica's queue, then RabbitMQ moves it to the shared queue and the survivor answers.
    started = time.monotonic()
    answer = get(cluster.url, "m1")
    assert answer["pid"] != holder and answer["model"] == "model m1"
    assert time.monotonic() - started < 5
    for _ in range(10):  # and from then on the survivor holds it
        assert get(cluster.url, "m1")["pid"] == answer["pid"]
    assert len(loads_of(loads, "m1")) == 2
