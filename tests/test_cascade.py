"""Cancellation reaches the handle calls a request made, and DeploymentResponse.cancel()."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import requests
from starlette.requests import Request

from broker_serve import RayServeException, RequestCancelledError, serve

from .test_cancellation import wait_for_file


@serve.deployment
class Downstream:
    def __init__(self, markers: str) -> None:
        self.markers = Path(markers)

    async def __call__(self, name: str) -> str:
        (self.markers / f"{name}.started").touch()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            (self.markers / f"{name}.cancelled").touch()
            raise
        return "finished"


@serve.deployment
class Upstream:
    def __init__(self, downstream) -> None:
        self.downstream = downstream

    async def __call__(self, request: Request) -> str:
        name = request.query_params["name"]
        if request.query_params.get("await") == "0":
            self.downstream.remote(name)  # made, never awaited: still cascaded
            await asyncio.sleep(10)
            return "slept"
        return await self.downstream.remote(name)


def test_timeout_cascades_to_awaited_and_unawaited_handle_calls(cluster, tmp_path):
    serve.start(http_options={"request_timeout_s": 1})
    serve.run(Upstream.bind(Downstream.bind(str(tmp_path))))
    assert requests.get(f"{cluster.url}?name=awaited").status_code == 408
    assert wait_for_file(tmp_path / "awaited.cancelled")
    assert requests.get(f"{cluster.url}?name=unawaited&await=0").status_code == 408
    assert wait_for_file(tmp_path / "unawaited.started")
    assert wait_for_file(tmp_path / "unawaited.cancelled")


def test_deployment_response_cancel_stops_the_callee(cluster, tmp_path):
    handle = serve.run(Downstream.bind(str(tmp_path)))
    response = handle.remote("driver")
    assert wait_for_file(tmp_path / "driver.started")
    response.cancel()
    assert wait_for_file(tmp_path / "driver.cancelled")
    with pytest.raises(RequestCancelledError, match="was cancelled") as info:
        response.result(timeout_s=10)
    assert isinstance(info.value, RayServeException)  # as in Ray, where it subclasses it


@serve.deployment
class CancelsAtOnce:
    def __init__(self, downstream) -> None:
        self.downstream = downstream

    async def __call__(self) -> str:
        response = self.downstream.remote("never")
        response.cancel()  # before the call's task ran even once
        try:
            await asyncio.wait_for(response, 10)
        except RequestCancelledError:
            return "cancelled"
        except TimeoutError:
            return "hung"
        return "finished"


def test_a_call_cancelled_before_it_ran_ends_cancelled(cluster, tmp_path):
    handle = serve.run(CancelsAtOnce.bind(Downstream.bind(str(tmp_path))))
    assert handle.remote().result(timeout_s=30) == "cancelled"
    assert not (tmp_path / "never.started").exists()

