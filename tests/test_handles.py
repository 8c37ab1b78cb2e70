"""The handle `serve.run` returns, and handles bound into another deployment."""

import asyncio

import pytest
import requests
import starlette.requests

from broker_serve import RayServeException, serve


@serve.deployment
class Adder:
    def __init__(self, base: int) -> None:
        self.base = base

    def __call__(self, x: int) -> int:
        return self.base + x

    async def count(self, n: int):
        for i in range(n):
            yield i

    def fail(self) -> None:
        raise KeyError("nope")


@serve.deployment
class Front:
    def __init__(self, adder) -> None:
        self.adder = adder

    async def __call__(self, request: starlette.requests.Request) -> int:
        return await self.adder.remote(int(request.query_params["x"]))


def test_handle_from_serve_run(cluster):
    handle = serve.run(Adder.bind(10))
    assert handle.remote(5).result() == 15
    assert list(handle.options(method_name="count", stream=True).remote(3)) == [0, 1, 2]
    assert handle.count.options(stream=True).remote(2) is not None
    with pytest.raises(RayServeException, match="KeyError") as info:
        handle.fail.remote().result()
    assert info.value.error_type == "KeyError"
    assert "Adder" in str(info.value)


def test_bound_deployment_arrives_as_a_live_handle(cluster):
    serve.run(Front.bind(Adder.bind(100)))
    assert requests.get(f"{cluster.url}?x=1").json() == 101
    status = serve.status().applications["default"]
    assert set(status.deployments) == {"Front", "Adder"}
    assert serve.get_app_handle("default").deployment_name == "Front"


@serve.deployment
class HandleOnly:
    def double(self, x: int) -> int:
        return 2 * x


def test_deployment_without_call_serves_handles_and_says_why_not_http(cluster):
    handle = serve.run(HandleOnly.bind())
    assert handle.double.remote(21).result() == 42
    response = requests.get(cluster.url)
    assert response.status_code == 404
    assert "no __call__" in response.text


@serve.deployment
class FindsByName:
    def __init__(self) -> None:
        self.from_constructor = serve.get_app_handle("adders")

    async def __call__(self) -> list[int]:
        from_method = serve.get_app_handle("adders")
        return [await self.from_constructor.remote(1), await from_method.remote(2)]


def test_get_app_handle_inside_a_replica(cluster):
    serve.run(Adder.bind(1000), name="adders", route_prefix=None)
    serve.run(FindsByName.bind(), name="finder", route_prefix="/find")
    assert requests.get(f"{cluster.url}/find").json() == [1001, 1002]


@serve.deployment
class SharesItsHandle:
    def __init__(self) -> None:
        self.adders = serve.get_app_handle("adders")

    async def __call__(self) -> dict:
        sums = await asyncio.gather(*(self.adders.remote(x) for x in range(3)))
        return {"sums": list(sums), "deployment_name": self.adders.deployment_name}


def test_calls_find_the_ingress_without_changing_the_shared_handle(cluster):
    """A call finds the ingress without rewriting the handle every request shares: it stays
    as get_app_handle made it (it only remembers the ingress it found)."""
    serve.run(Adder.bind(1000), name="adders", route_prefix=None)
    serve.run(SharesItsHandle.bind(), name="sharer", route_prefix="/share")
    for _ in range(2):
        assert requests.get(f"{cluster.url}/share").json() == {
            "sums": [1000, 1001, 1002], "deployment_name": None}
