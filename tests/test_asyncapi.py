"""`broker-serve asyncapi` and the protocol's schemas (broker_serve/protocol/schemas.py).

The schemas are checked against messages that broker-serve's own encoders build (the call
and value packers, the header builders, the replica's reply streams, the proxy's scope), after
a msgpack round trip, so that the schemas and the encoders cannot drift apart. They are
validated closed (no fields beyond those described), so an encoder that adds a field fails
here until the schema, and docs/protocol.md, describe it.

No PyPI package ships the official AsyncAPI 3.0.0 JSON Schema (@asyncapi/spec-json-schemas
is on npm only), so the document is validated with asyncapi3's AsyncAPI 3.0 models, and its
`$ref`s are resolved here, which those models do not do.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import subprocess
import sys
import warnings
from collections.abc import Callable
from typing import Any

import jsonschema
import orjson
import pydantic
import pytest
import redis
import referencing
import yaml
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from broker_serve.config import RetryWait
from broker_serve.protocol import messages, remote_errors, schemas
from broker_serve.protocol.asyncapi import Server, document
from broker_serve.protocol.call_values import pack_call
from broker_serve.protocol.jobs import job_headers
from broker_serve.proxy.http import _request_scope
from broker_serve.replica.execution import ReplyStream, Servable, run_call, run_http, run_websocket
from broker_serve.replica.threads import ThreadRunner

from .conftest import REDIS_URL, ROOT

with warnings.catch_warnings():  # its models shadow BaseModel.schema, which it warns of
    warnings.simplefilter("ignore", UserWarning)
    from asyncapi3 import AsyncAPI3

SECRET = b"s" * 32
INBOX = "bs.t.inbox.r1"


def _as_json(value: Any) -> Any:
    """A decoded message as JSON Schema sees it: bytes as latin-1 text (schemas.py)."""
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, dict):
        return {key: _as_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_json(item) for item in value]
    return value


def _closed(schema: Any) -> Any:
    """`schema` with no fields allowed beyond those it describes."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _closed(item) if key != "properties" else
              {name: _closed(sub) for name, sub in item.items()}
              for key, item in schema.items()}
    if "properties" in schema:
        closed["additionalProperties"] = False
    return closed


def check(schema: schemas.Schema, message: dict[str, Any]) -> None:
    """`message`, as it travels (msgpack), is valid under `schema`, closed."""
    decoded = messages.unpack(messages.pack(message))
    jsonschema.Draft7Validator(_closed(schema)).validate(_as_json(decoded))


def rejects(schema: schemas.Schema, message: dict[str, Any]) -> bool:
    return not jsonschema.Draft7Validator(_closed(schema)).is_valid(_as_json(message))


# the schemas against broker-serve's own messages --------------------------------------------
def test_every_schema_is_a_draft_07_schema():
    spec = document("t", {"a": ["D"]}, "0")
    for schema in spec["components"]["schemas"].values():
        jsonschema.Draft7Validator.check_schema(schema)


def test_request_and_job_headers():
    request = messages.request_headers(1_700_000_000_000, published_us=messages.now_us(),
                                       request_id="client-1")
    check(schemas.REQUEST_HEADERS, request)
    wait = RetryWait(wait="fixed", seconds=2)
    job = {**messages.request_headers(), **job_headers(3600, max_retries=2, retry_wait=wait)}
    check(schemas.JOB_HEADERS, job)
    check(schemas.RETRY_WAIT, orjson.loads(job["bs-retry-wait"]))
    check(schemas.RETRY_WAIT, RetryWait().model_dump())
    assert rejects(schemas.JOB_HEADERS, messages.request_headers())  # no bs-job
    assert rejects(schemas.JOB_HEADERS, {**job, "bs-job": 0})
    assert rejects(schemas.REQUEST_HEADERS, {"bs-version": 2})


@dataclasses.dataclass
class Point:
    x: int


def test_call_bodies_in_their_three_forms():
    forms = {
        "args": pack_call((1, "two", b"3"), {"four": [4.0]}, SECRET),
        "data": pack_call(((1, 2), Point(3)), {}, SECRET),
        "pickled": pack_call(({1, 2},), {}, SECRET),
    }
    for field, packed in forms.items():
        assert field in packed
        check(schemas.CALL_REQUEST, {"method": "predict", **packed,
                                     "multiplexed_model_id": "m1"})
    assert rejects(schemas.CALL_REQUEST, {"method": "f", **forms["args"], **forms["pickled"]})
    assert rejects(schemas.CALL_REQUEST, {"method": "f", "pickled": b"x"})  # no sig


def test_http_and_websocket_requests_as_the_proxy_builds_them():
    asgi = {"type": "http", "method": "POST", "path": "/hello/world",
            "raw_path": b"/hello/world", "query_string": b"a=b", "root_path": "",
            "headers": [(b"content-type", b"text/plain")], "http_version": "1.1",
            "scheme": "http", "client": ("10.0.0.1", 52000), "server": ("10.0.0.2", 8000)}
    check(schemas.HTTP_REQUEST, {"scope": {"method": "POST", **_request_scope(asgi, "/hello")},
                                 "body": b"hi", "more_body": False, "window": 2 ** 21})
    bare = {**asgi, "raw_path": None, "client": None, "server": None}
    check(schemas.WEBSOCKET_REQUEST, {"scope": {**_request_scope(bare, "/"),
                                                "subprotocols": ["chat.v1"]}})
    assert rejects(schemas.HTTP_REQUEST, {"scope": {"method": "GET", "path": "relative"},
                                          "body": b"", "more_body": False})


class _Captured:
    """A ReplyStream's publish: the events it sends, by type."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, event: str, fields: dict[str, Any]) -> None:
        self.events.append((event, {**fields, "replica": "r1"}))

    def check(self, *expected: str) -> None:
        assert [event for event, _ in self.events] == list(expected)
        for event, fields in self.events:
            check(schemas.REPLY_EVENTS[event], fields)


class Model:
    def plain(self) -> dict[str, Any]:
        return {"a": [1, b"2"]}

    def typed(self) -> tuple[int, int]:
        return (1, 2)

    def pickled(self) -> set[int]:
        return {1}

    async def stream(self) -> Any:
        yield 1
        yield (2, 3)


def _servable(target: Any = None, app: Any = None) -> Servable:
    return Servable(target if target is not None else app, False, app, ThreadRunner(2))


def test_result_and_error_events_of_a_replica():
    async def calls() -> None:
        servable = _servable(Model())
        for method in ("plain", "typed", "pickled", "stream"):
            captured = _Captured()
            await run_call(servable, ReplyStream(captured), {"method": method}, SECRET)
            captured.check(*(["result"] * (3 if method == "stream" else 1)))
        captured = _Captured()
        try:
            raise ValueError("bad", 7)
        except ValueError as exc:
            await ReplyStream(captured).error(500, "ValueError", "bad",
                                              remote_errors.describe(exc, SECRET))
        captured.check("error")
        assert "args" in captured.events[0][1]

    asyncio.run(calls())


async def _stream(request: Any) -> StreamingResponse:
    async def chunks() -> Any:
        for chunk in (b"a" * 10, b"b" * 20):
            yield chunk
            await asyncio.sleep(0.01)  # each its own event: a body event follows the start
    return StreamingResponse(chunks(), headers={"x-k": "v"})


async def _chat(websocket: WebSocket) -> None:
    await websocket.accept(subprotocol="chat.v1")
    await websocket.send_text(await websocket.receive_text())
    await websocket.send_bytes(b"\x00")
    await websocket.close(1000, "done")


_APP = Starlette(routes=[Route("/", _stream), WebSocketRoute("/chat", _chat)])


def test_http_and_websocket_events_of_a_replica():
    async def session() -> None:
        servable = _servable(app=_APP)
        await servable.start()
        from_caller: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        body = {"body": b"tail", "more_body": False}
        check(schemas.INBOX_MESSAGES[messages.BODY], body)
        await from_caller.put((messages.BODY, body))
        captured = _Captured()
        request = {"scope": {"method": "GET", "path": "/"}, "body": b"", "more_body": True}
        await run_http(servable, ReplyStream(captured), request, from_caller, INBOX, 2 ** 20)
        kinds = [event for event, _ in captured.events]
        assert kinds[:2] == ["accepted", "start"] and kinds[-1] == "body", kinds
        captured.check(*kinds)

        frame = {"text": "hi"}
        check(schemas.INBOX_MESSAGES[messages.WS_RECEIVE], frame)
        await from_caller.put((messages.WS_RECEIVE, frame))
        captured = _Captured()
        await run_websocket(servable, ReplyStream(captured),
                            {"scope": {"path": "/chat", "subprotocols": ["chat.v1"]}},
                            from_caller, INBOX)
        captured.check("ws.accept", "ws.send", "ws.send", "ws.close")
        await servable.stop(5)

    asyncio.run(session())


def test_inbox_and_cancel_messages():
    check(schemas.INBOX_MESSAGES[messages.CREDIT], {"bytes": 65536})
    check(schemas.INBOX_MESSAGES[messages.DISCONNECT], {})
    check(schemas.INBOX_MESSAGES[messages.WS_DISCONNECT], {"code": 1011})
    check(schemas.CANCEL, {"ids": ["r-1", "r-2"], "expires": 1_700_000_000_000})
    assert rejects(schemas.INBOX_MESSAGES[messages.WS_RECEIVE], {"text": "a", "bytes": b"b"})
    assert rejects(schemas.CANCEL, {"ids": [], "expires": 1})


# the AsyncAPI document ---------------------------------------------------------------------
APPS = {"shop": ["Ingress", "Ranker"], "chat": ["Bot"]}


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for item in node.values() for ref in _refs(item)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def validate(spec: dict[str, Any]) -> None:
    """`spec` is an AsyncAPI 3.0 document, and each of its `$ref`s names a part of it."""
    AsyncAPI3.model_validate(spec)
    resolver = referencing.Registry().resolver_with_root(
        referencing.Resource.opaque(spec))
    for ref in _refs(spec):
        assert ref.startswith("#/"), ref
        resolver.lookup(ref)  # raises if nothing is there


def test_the_document_is_asyncapi_3_and_names_every_queue():
    spec = document("prod", APPS, "1.2.3",
                    Server.from_url("amqp://guest:hunter2@rabbit.internal:5673/prod"))
    validate(spec)
    text = orjson.dumps(spec).decode()
    assert "hunter2" not in text and "guest" not in text
    assert spec["servers"]["rabbitmq"]["host"] == "rabbit.internal:5673"
    addresses = {channel["address"] for channel in spec["channels"].values()}
    for app, deployments in APPS.items():
        for deployment in deployments:
            assert f"bs.prod.{app}.{deployment}" in addresses
            channel = spec["channels"][f"{app}__{deployment}"]
            assert channel["bindings"]["amqp"]["is"] == "queue"
            reply = spec["operations"][f"sendRequest__{app}__{deployment}"]["reply"]
            assert reply["address"]["location"] == "$message.header#/reply_to"
    assert {"bs.prod.dead", "bs.prod.reply.{processId}", "bs.prod.inbox.{replicaId}"} \
        <= addresses
    cancel = spec["channels"]["cancel"]["bindings"]["amqp"]
    assert cancel["is"] == "routingKey"
    assert cancel["exchange"] == {"name": "bs.prod.cancel", "type": "fanout", "durable": True,
                                  "autoDelete": False, "vhost": "prod"}
    job = spec["components"]["schemas"]["JobProperties"]["properties"]["headers"]
    assert {"bs-job", "bs-max-retries", "bs-retry-wait", "bs-deadline"} <= set(job["properties"])
    assert job["required"] == ["bs-version", "bs-job"]
    dead = spec["components"]["schemas"]["DeadLetterProperties"]["properties"]["headers"]
    assert {"bs-dead-queue", "bs-dead-reason", "bs-attempt", "x-death"} <= set(dead["properties"])


@pytest.mark.parametrize("break_it", [
    lambda spec: spec["channels"]["cancel"]["bindings"]["amqp"].update(is_="queue"),
    lambda spec: spec["channels"]["dead"]["bindings"]["amqp"].update(queue={"name": "q" * 256}),
    lambda spec: spec["operations"]["receiveReplies"].update(action="publish"),
    lambda spec: spec["operations"]["sendCancel"]["messages"].append(
        {"$ref": "#/channels/cancel/messages/nothing"}),
], ids=["unknown-binding-field", "bad-queue", "v2-action", "dangling-ref"])
def test_validation_catches_a_broken_document(break_it: Callable[[dict[str, Any]], None]):
    spec = copy.deepcopy(document("t", APPS, "0"))
    break_it(spec)
    with pytest.raises((pydantic.ValidationError, referencing.exceptions.Unresolvable)):
        validate(spec)


# the command -------------------------------------------------------------------------------
def _asyncapi(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker_serve", "asyncapi", *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_command_reads_the_cluster(cluster):
    client = redis.Redis.from_url(REDIS_URL)
    try:
        for app, deployments in APPS.items():  # what serve.run writes, less what is unread
            record = {"name": app, "route_prefix": None, "ingress": deployments[0],
                      "version": "v1", "deployed_at": 0.0, "deployments": {
                          name: {"version": "v1", "queue": f"bs.{cluster.name}.{app}.{name}",
                                 "num_replicas": 1, "graceful_shutdown_timeout_s": 1.0,
                                 "config": {}, "user_config_hash": ""}
                          for name in deployments}}
            client.hset(f"bs:{cluster.name}:apps", app, orjson.dumps(record))
    finally:
        client.close()

    every = _asyncapi(cluster.env)
    assert every.returncode == 0, every.stderr
    spec = orjson.loads(every.stdout)
    validate(spec)
    assert {"shop__Ingress", "shop__Ranker", "chat__Bot"} <= set(spec["channels"])

    one = _asyncapi(cluster.env, "shop", "--yaml")
    assert one.returncode == 0, one.stderr
    spec = yaml.safe_load(one.stdout)
    validate(spec)
    queues = {channel["address"] for channel in spec["channels"].values()}
    assert f"bs.{cluster.name}.shop.Ranker" in queues
    assert f"bs.{cluster.name}.chat.Bot" not in queues

    unknown = _asyncapi(cluster.env, "nope")
    assert unknown.returncode == 1
    assert unknown.stderr.strip() == f"Error: no application 'nope' in cluster '{cluster.name}'"
