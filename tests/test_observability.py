"""Metrics, request ids, log lines and `broker-serve stats`, over real processes.

The metrics are scraped from the proxy's /-/metrics, the worker node's /metrics and the
controller's /metrics before and after real traffic, and must have moved.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect

from broker_serve import serve
from broker_serve.client.handle import DeploymentHandle
from broker_serve.observability import metrics, stats

from .waiting import wait_for

Scrape = dict[tuple[str, frozenset[tuple[str, str]]], float]

api = FastAPI()


@serve.deployment
class Batcher:
    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.2)
    async def add(self, items: list[int]) -> list[int]:
        return [item + 1 for item in items]


@serve.deployment
class Models:
    @serve.multiplexed(max_num_models_per_replica=4)
    async def get_model(self, model_id: str) -> str:
        return f"model {model_id}"

    async def predict(self) -> str:
        return await self.get_model(serve.get_multiplexed_model_id())


@serve.deployment
@serve.ingress(api)
class Api:
    def __init__(self, batcher: DeploymentHandle, models: DeploymentHandle) -> None:
        self.batcher = batcher
        self.models = models

    @api.get("/")
    async def hello(self) -> str:
        return "ok"

    @api.get("/fail")
    async def fail(self) -> str:
        raise RuntimeError("this one fails")

    @api.get("/batch")
    async def batch(self, x: int) -> int:
        return await self.batcher.add.remote(x)

    @api.get("/model")
    async def model(self, request: Request) -> str:
        model_id = request.headers["serve_multiplexed_model_id"]
        return await self.models.options(multiplexed_model_id=model_id).predict.remote()

    @api.get("/stream")
    async def stream(self) -> StreamingResponse:
        async def chunks():
            yield b"first\n"
            await asyncio.sleep(1.5)
            yield b"last\n"

        return StreamingResponse(chunks())

    @api.websocket("/ws")
    async def echo(self, ws: WebSocket) -> None:
        await ws.accept()
        try:
            while True:
                await ws.send_text(await ws.receive_text())
        except WebSocketDisconnect:
            pass


@serve.deployment(
    max_ongoing_requests=1, max_queued_requests=1,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                        "metrics_interval_s": 0.2, "look_back_period_s": 0.4,
                        "upscale_delay_s": 0, "downscale_delay_s": 60},
)
class Narrow:
    async def __call__(self) -> str:
        await asyncio.sleep(0.4)
        return "done"


# scraping ---------------------------------------------------------------------------------------
def scrape(url: str) -> Scrape:
    answer = requests.get(url, timeout=10)
    assert answer.status_code == 200, (url, answer.status_code)
    samples: Scrape = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Scrape, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def endpoints(cluster) -> dict[str, str]:
    env = cluster.env
    return {"proxy": f"{cluster.url}/-/metrics",
            "worker": f"http://127.0.0.1:{env['BROKER_SERVE_METRICS_PORT']}/metrics",
            "controller": f"http://127.0.0.1:{env['BROKER_SERVE_DASHBOARD_PORT']}/metrics"}


class Logs:
    """The cluster's stderr: its processes are the test's children and write to its fd 2."""

    def __init__(self, capfd: pytest.CaptureFixture[str]) -> None:
        self.capfd = capfd
        self.lines: list[str] = []

    def wait(self, *texts: str, timeout: float = 5.0) -> list[str]:
        """Once a line holds each of `texts` (access lines are written in batches), the
        lines holding the first."""
        deadline = time.monotonic() + timeout
        while True:
            self.lines += self.capfd.readouterr().err.splitlines()
            found = [line for line in self.lines if texts[0] in line + " "]  # "id=x " ends
            if all(any(t in line for line in found) for t in texts) or \
                    time.monotonic() > deadline:
                return found
            time.sleep(0.1)


# the tests --------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_metrics_appear_and_move_under_load(cluster, capfd):
    serve.run(Api.bind(Batcher.bind(), Models.bind()), name="main", route_prefix="/")
    serve.run(Narrow.bind(), name="narrow", route_prefix="/narrow")
    urls = endpoints(cluster)
    before = {name: scrape(url) for name, url in urls.items()}
    assert before["controller"][("broker_serve_controller_is_leader", frozenset())] == 1

    # Plain requests, errors, a batch, two models, and a request id given by the client.
    for _ in range(20):
        assert requests.get(f"{cluster.url}/").status_code == 200
    for _ in range(3):
        assert requests.get(f"{cluster.url}/fail").status_code == 500
    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(lambda x: requests.get(f"{cluster.url}/batch",
                                                      params={"x": x}).json(), range(8))) \
            == list(range(1, 9))
    for model_id in ("a", "b", "a", "b"):
        answer = requests.get(f"{cluster.url}/model",
                              headers={"serve_multiplexed_model_id": model_id})
        assert answer.json() == f"model {model_id}"
    given = requests.get(f"{cluster.url}/batch", params={"x": 1},
                         headers={"x-request-id": "client-id-42"})
    assert given.headers["x-request-id"] == "client-id-42"
    made = requests.get(f"{cluster.url}/", headers={"x-request-id": "not a usable id"})
    generated = made.headers["x-request-id"]
    assert generated and " " not in generated  # the proxy's own id instead

    # Past max_queued_requests: 503s from backpressure. The waiting request scales Narrow up,
    # once the controller's autoscaler, sampling every reconcile, sees it.
    statuses: list[int] = []
    for _ in range(6):
        with ThreadPoolExecutor(8) as pool:
            statuses += pool.map(lambda _: requests.get(f"{cluster.url}/narrow").status_code,
                                 range(8))
        if value(scrape(urls["controller"]), "broker_serve_controller_autoscaling_decisions_total",
                 application="narrow", direction="up"):
            break
    assert 503 in statuses and 200 in statuses, statuses

    # A stream and a WebSocket, held open while the proxy is scraped.
    with requests.get(f"{cluster.url}/stream", stream=True) as streamed, \
            connect(f"ws://127.0.0.1:{cluster.port}/ws") as websocket:
        assert streamed.raw.read(6) == b"first\n"
        websocket.send("hello")
        assert websocket.recv() == "hello"
        during = scrape(urls["proxy"])
        assert value(during, "broker_serve_proxy_open_streams") == 1
        assert value(during, "broker_serve_proxy_open_websockets") == 1
        assert value(during, "broker_serve_proxy_inflight_requests") >= 1
        # The session runs in the replica until it is closed.
        wait_for(lambda: value(scrape(urls["worker"]), "broker_serve_replica_ongoing_requests",
                               deployment="Api") >= 1, timeout=10)
        assert streamed.raw.read().endswith(b"last\n")

    after_proxy = scrape(urls["proxy"])
    process = {"proxy": "proxy", "replica": "worker", "controller": "controller"}

    def moved(name: str, samples: Scrape, **labels: str) -> float:
        earlier = before[process[name.split("_")[2]]]
        return value(samples, name, **labels) - value(earlier, name, **labels)

    assert moved("broker_serve_proxy_requests_total", after_proxy, application="main",
                 route="/", status="200") >= 20 + 8 + 4 + 2
    assert moved("broker_serve_proxy_requests_total", after_proxy, status="500") == 3
    assert moved("broker_serve_proxy_requests_total", after_proxy, application="narrow",
                 status="503") == statuses.count(503)
    assert moved("broker_serve_proxy_backpressure_rejections_total", after_proxy,
                  application="narrow") == statuses.count(503)
    assert moved("broker_serve_proxy_request_duration_seconds_count", after_proxy,
                 application="main", route="/") >= 34
    assert value(after_proxy, "broker_serve_proxy_open_streams") == 0
    assert value(after_proxy, "broker_serve_proxy_open_websockets") == 0

    # Replicas flush to their node's /metrics once a second.
    def worker_moved() -> Scrape | None:
        samples = scrape(urls["worker"])
        done = moved("broker_serve_replica_processing_seconds_count", samples,
                     application="main", deployment="Api", method="__call__") >= 36
        return samples if done else None

    worker = wait_for(worker_moved, timeout=10)  # the replicas' processing times arrive
    assert moved("broker_serve_replica_queue_wait_seconds_count", worker,
                 deployment="Api") >= 36
    assert moved("broker_serve_replica_processing_seconds_count", worker,
                 deployment="Batcher", method="add") == 9
    assert moved("broker_serve_replica_processing_seconds_count", worker,
                 deployment="Models", method="predict") == 4
    assert moved("broker_serve_replica_errors_total", worker, deployment="Api",
                 status="500") == 3
    assert moved("broker_serve_replica_batch_size_sum", worker, deployment="Batcher") == 9
    batches = moved("broker_serve_replica_batch_size_count", worker, deployment="Batcher")
    assert 3 <= batches < 9  # 8 concurrent callers share batches of at most 4
    assert moved("broker_serve_replica_model_loads_total", worker, deployment="Models") == 2
    wait_for(lambda: value(scrape(urls["worker"]), "broker_serve_replica_ongoing_requests",
                           deployment="Api") == 0, timeout=10)

    controller = scrape(urls["controller"])
    assert value(controller, "broker_serve_controller_replicas", application="main",
                 deployment="Api", state="RUNNING") == 1
    assert ("broker_serve_controller_queue_depth",
            frozenset({("application", "narrow"), ("deployment", "Narrow")})) in controller
    assert value(controller, "broker_serve_controller_autoscaling_decisions_total",
                 application="narrow", direction="up") >= 1

    # One line per request at the proxy and at each replica, joined by the request id: the
    # handle call to Batcher made while handling it carries the client's id.
    logs = Logs(capfd)
    tagged = logs.wait("request_id=client-id-42 ", "proxy broker_serve.access - GET /batch 200",
                       "main/Api GET /batch 200", "main/Batcher call add 200")
    assert any("proxy broker_serve.access - GET /batch 200" in line for line in tagged), tagged
    assert any("main/Api GET /batch 200" in line for line in tagged), tagged
    assert any("main/Batcher call add 200" in line for line in tagged), tagged
    assert logs.wait(f"request_id={generated} ", "main/Api GET / 200")


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_json_logs_and_the_stats_command(cluster, capfd, monkeypatch):
    monkeypatch.setenv("BROKER_SERVE_LOG_FORMAT", "json")
    # The command reads the history the proxy and replica write, here every half second.
    monkeypatch.setenv("BROKER_SERVE_HISTORY_INTERVAL_S", "0.5")
    env = {**cluster.env, "BROKER_SERVE_LOG_FORMAT": "json"}
    serve.run(Narrow.options(autoscaling_config=None, max_queued_requests=-1,
                             max_ongoing_requests=8).bind(), name="slow", route_prefix="/")
    answer = requests.get(cluster.url, headers={"x-request-id": "json-1"})
    assert answer.headers["x-request-id"] == "json-1"

    logs = Logs(capfd)
    logs.wait('"request_id":"json-1"', '"process":"proxy"', '"process":"replica')
    records = [json.loads(line) for line in logs.lines if line.strip()]  # every line is JSON
    access = [r for r in records if r.get("request_id") == "json-1"]
    proxy = next(r for r in access if r["process"] == "proxy")
    assert (proxy["method"], proxy["path"], proxy["status"]) == ("GET", "/", 200)
    assert proxy["duration_ms"] >= 400 and proxy["application"] == "slow"
    replica = next(r for r in access if r["process"].startswith("replica"))
    assert (replica["deployment"], replica["method"], replica["status"]) == \
        ("Narrow", "__call__", 200)
    assert {"time", "level", "logger", "message"} <= replica.keys()

    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            requests.get(cluster.url, timeout=10)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        stats = subprocess.run(
            [sys.executable, "-m", "broker_serve", "stats", "--interval", "1.5", "--count",
             "3", "--windows", "2,60"], env=env, capture_output=True, text=True, timeout=60,
            check=False)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert stats.returncode == 0, stats.stderr
    out = stats.stdout
    assert "Processing time per deployment" in out and "Latency per route" in out, out
    last = out.rsplit("broker-serve stats at", 1)[1]
    header = next(line for line in last.splitlines() if line.startswith("application"))
    assert header.split() == ["application", "deployment", "window", "requests", "req/s",
                              "p50", "p90", "p95", "queued"]
    rows = [line.split() for line in last.splitlines() if line.startswith("slow ")]
    windows = {row[2]: row for row in rows if row[1] == "Narrow"}
    assert set(windows) == {"2s", "60s*"}, out  # the history is younger than 60 s
    # Each request sleeps 0.4 s: inside the (0.25 s, 0.5 s] bucket.
    p50, p90, p95 = (float(v) for v in windows["2s"][5:8])
    assert 250 <= p50 <= p90 <= p95 <= 500, out
    assert float(windows["2s"][3]) > 0
    routes = [row for row in rows if row[1] == "/"]
    assert routes and all(250 <= float(row[5]) <= 500 for row in routes), out


# units ------------------------------------------------------------------------------------------
def test_local_histograms_move_into_prometheus_histograms_exactly():
    values = [0.00005, 0.0003, 0.0003, 0.002, 0.7, 45.0, 120.0]
    direct = Histogram("direct_seconds", "d", registry=CollectorRegistry(),
                       buckets=metrics.LATENCY_BUCKETS)
    registry = CollectorRegistry()
    counted = metrics.CountedHistogram("moved_seconds", "m", [], registry=registry)
    local = metrics.LocalHistogram()
    for v in values:
        direct.observe(v)
        local.observe(v)
    local.move_into(counted.labels())
    local.move_into(counted.labels())  # moves nothing the second time
    # As a worker node reads its replicas' counters back.
    (moved,) = metrics.HistogramsOfCounters(registry).collect()

    def samples(histogram: Metric) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name.split("_", 1)[1], s.labels, s.value)
                for s in histogram.samples if not s.name.endswith("_created")]

    assert samples(direct.collect()[0]) == samples(moved)
    assert ("seconds_count", {}, len(values)) in samples(moved)
    assert dict(local.cumulative())["+Inf"] == 0


def test_quantiles_from_bucket_deltas():
    earlier = stats.Histogram({0.001: 10, 0.01: 10, float("inf"): 10})
    later = stats.Histogram({0.001: 10, 0.01: 60, float("inf"): 110})
    window = later.minus(earlier)  # 50 in (1 ms, 10 ms], 50 above
    assert window.count == 100
    assert window.quantile(0.5) == pytest.approx(0.01)
    assert window.quantile(0.25) == pytest.approx(0.001 + 0.009 * 0.5)
    assert window.quantile(0.9) == 0.01  # in +Inf: the highest finite bound
    restarted = stats.Histogram({0.001: 1, float("inf"): 1}).minus(later)
    assert restarted.count == 1  # a process that restarted counts from zero
    assert stats.Histogram().quantile(0.5) is None
