"""Autoscaling on queue depth plus ongoing requests: up under load, down after it, from zero."""

from __future__ import annotations

import os
import threading

import requests

from broker_serve import serve
from broker_serve.config import AutoscalingConfig
from broker_serve.controller.autoscaler import Autoscaler

from .waiting import wait_for


def config(**overrides: float) -> AutoscalingConfig:
    values = dict(min_replicas=0, max_replicas=5, target_ongoing_requests=2,
                  metrics_interval_s=1, look_back_period_s=3, upscale_delay_s=2,
                  downscale_delay_s=5)
    values.update(overrides)
    return AutoscalingConfig(**values)


def test_policy_waits_its_delays_and_stays_in_bounds():
    scaler = Autoscaler(config(), target=1)
    scaler.observe(0, queued=6, ongoing=2)  # load 8 / target 2 = 4 replicas wanted
    assert scaler.decide(0) == 1 and scaler.decide(1.5) == 1  # upscale_delay_s not over
    assert scaler.decide(2) == 4 and "scaled up from 1 to 4" in scaler.reason
    scaler.observe(10, queued=100, ongoing=0)
    scaler.decide(10)
    assert scaler.decide(12) == 5  # max_replicas
    for t in range(13, 30):
        scaler.observe(t, queued=0, ongoing=0)
        scaler.decide(t)
    assert scaler.target == 0 and "scaled down" in scaler.reason


def test_policy_leaves_zero_at_once_for_a_waiting_request():
    scaler = Autoscaler(config(upscale_delay_s=30), target=0)
    scaler.observe(0, queued=1, ongoing=0)
    assert scaler.decide(0) == 1 and "waiting at zero replicas" in scaler.reason


def test_policy_factors_damp_the_steps():
    scaler = Autoscaler(config(upscale_delay_s=0, upscaling_factor=0.5), target=1)
    scaler.observe(0, queued=10, ongoing=0)  # wants 5: half of the way from 1 is 3
    assert scaler.decide(0) == 3


@serve.deployment(
    max_ongoing_requests=2,
    autoscaling_config=dict(min_replicas=0, max_replicas=2, target_ongoing_requests=1,
                            metrics_interval_s=0.25, look_back_period_s=1, upscale_delay_s=0,
                            downscale_delay_s=2),
)
class Elastic:
    async def __call__(self) -> int:
        import asyncio

        await asyncio.sleep(0.3)
        return os.getpid()


def running_replicas() -> int:
    status = serve.status().applications["default"].deployments["Elastic"]
    return status.replica_states.get("RUNNING", 0)


def test_scales_from_zero_up_under_load_and_back_to_zero(cluster):
    serve.run(Elastic.bind())
    assert running_replicas() == 0
    # A request at zero replicas waits in the queue and starts a replica.
    response = requests.get(cluster.url, timeout=60)
    assert response.status_code == 200

    pids: set[int] = set()
    stop = threading.Event()

    def load() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                reply = session.get(cluster.url, timeout=60)
                assert reply.status_code == 200
                pids.add(reply.json())

    clients = [threading.Thread(target=load) for _ in range(6)]
    for client in clients:
        client.start()
    try:
        wait_for(lambda: len(pids) == 2, timeout=60)
    finally:
        stop.set()
        for client in clients:
            client.join(60)
    status = serve.status().applications["default"]
    assert status.status == "RUNNING"
    assert "scaled up" in status.deployments["Elastic"].message
    wait_for(lambda: running_replicas() == 0, timeout=60)
    assert "scaled down" in serve.status().applications["default"].deployments["Elastic"].message
