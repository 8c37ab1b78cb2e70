"""@serve.multiplexed and serve.get_multiplexed_model_id()."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import requests
from starlette.requests import Request

from broker_serve import serve


def test_lru_of_loaded_models_with_cleanup_and_del():
    loads: list[str] = []
    cleaned: list[str] = []
    deleted: list[str] = []

    class Model:
        def __init__(self, model_id: str) -> None:
            self.model_id = model_id

        async def cleanup(self) -> None:  # awaited on eviction
            cleaned.append(self.model_id)

        def __del__(self) -> None:  # runs once the cache dropped it
            deleted.append(self.model_id)

    class Server:
        @serve.multiplexed(max_num_models_per_replica=2)
        async def get_model(self, model_id: str) -> Model:
            loads.append(model_id)
            await asyncio.sleep(0.01)
            return Model(model_id)

    async def scenario() -> None:
        server = Server()
        same = await asyncio.gather(*(server.get_model("a") for _ in range(5)))
        assert len({id(m) for m in same}) == 1  # concurrent requests share one load
        await server.get_model("b")
        await server.get_model("a")  # "a" is now the most recent
        await server.get_model("c")  # evicts "b"
        await server.get_model("a")

    asyncio.run(scenario())
    assert loads == ["a", "b", "c"]
    assert cleaned == ["b"]
    assert "b" in deleted


def test_a_failed_load_is_not_cached():
    attempts: list[str] = []

    @serve.multiplexed(max_num_models_per_replica=2)
    async def flaky(model_id: str) -> str:
        attempts.append(model_id)
        if len(attempts) == 1:
            raise RuntimeError("download failed")
        return model_id.upper()

    async def scenario() -> str:
        with pytest.raises(RuntimeError):
            await flaky("m")
        return await flaky("m")

    assert asyncio.run(scenario()) == "M"
    assert attempts == ["m", "m"]


@serve.deployment
class ModelServer:
    def __init__(self, markers: str) -> None:
        self.markers = Path(markers)

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        (self.markers / f"loaded-{model_id}").touch()
        return f"model {model_id}"

    async def __call__(self, request: Request) -> dict[str, str]:
        model_id = serve.get_multiplexed_model_id()
        return {"id": model_id, "model": await self.get_model(model_id)}

    async def predict(self, x: int) -> str:
        return f"{await self.get_model(serve.get_multiplexed_model_id())} says {x}"

    def sync_id(self) -> str:  # sync methods run in a thread and still see the id
        return serve.get_multiplexed_model_id()


def test_model_id_from_the_header_and_from_handles(cluster, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    handle = serve.run(ModelServer.bind(str(markers)))
    answer = requests.get(cluster.url, headers={"serve_multiplexed_model_id": "m1"}).json()
    assert answer == {"id": "m1", "model": "model m1"}
    assert handle.options(method_name="predict", multiplexed_model_id="m2").remote(
        7).result(timeout_s=30) == "model m2 says 7"
    assert handle.options(method_name="sync_id", multiplexed_model_id="m3").remote().result(
        timeout_s=30) == "m3"
    assert {p.name for p in markers.iterdir()} == {"loaded-m1", "loaded-m2"}
