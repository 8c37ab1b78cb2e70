"""The REST API's answer to each error of an endpoint, through Starlette's exception handlers."""

from __future__ import annotations

import warnings

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker_serve.controller import declarative, rest
from broker_serve.exceptions import BrokerServeError, ClusterUnavailable

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient


def _client(error: Exception) -> TestClient:
    async def endpoint(request: Request) -> Response:
        raise error

    app = Starlette(routes=[Route("/", endpoint)], exception_handlers=rest.EXCEPTION_HANDLERS)
    # Starlette raises an unhandled error again once answered, for the server to log.
    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(("error", "status", "detail"), [
    (rest.HTTPError(422, [{"loc": ["x"]}]), 422, [{"loc": ["x"]}]),
    (declarative.UnknownTarget("there is no application 'a'"), 404,
     "there is no application 'a'"),
    (declarative.Refused("deployment 'd' autoscales"), 409, "deployment 'd' autoscales"),
    (RedisConnectionError("refused"), 503, "the cluster's Redis is unavailable: refused"),
    (ClusterUnavailable("down"), 503, "the cluster's Redis is unavailable: down"),
    (RuntimeError("a bug"), 500, "internal error; see the controller's log"),
])
def test_each_error_is_a_json_answer(error: Exception, status: int, detail: object) -> None:
    answer = _client(error).get("/")
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {"detail": detail}


def test_http_error_is_a_broker_serve_error() -> None:
    assert isinstance(rest.HTTPError(400, "bad"), BrokerServeError)
