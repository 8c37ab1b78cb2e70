"""Ray Serve 0.8's API (seed 003) against the real services: endpoints, backends, splits,
handles with keyword arguments and SLOs, `serve.context.web`, `@serve.accept_batch`, live
backend configs, `@serve.route` and `serve.init`; and the Ray 1.x calls beside them
(`serve.get_deployment`, `serve.list_deployments`, `serve.get_handle(deployment)`, the handle
class names). The seed's own program runs in tests/test_seed_examples.py."""

from __future__ import annotations

import asyncio
import collections
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pamqp.constants
import pytest
import requests

from broker_serve import RayServeException, RequestTimeoutError, serve
from broker_serve.client.traffic import TrafficHandle
from broker_serve.ray08 import backend_app_name, backend_tag
from broker_serve.schema import check_app_name

from .conftest import free_port

CLIENTS = 24


# backends the tests deploy ----------------------------------------------------------------------
def version_one(flask_request):
    return "v1"


def version_two(flask_request):
    return "v2"


def slow(flask_request):
    time.sleep(2)
    return "late"


class Echo:
    """What a backend sees, from either side."""

    def __init__(self, greeting):
        self.greeting = greeting

    def __call__(self, flask_request, **kwargs):
        if serve.context.web:
            return {"web": True, "greeting": self.greeting, "url": flask_request.url,
                    "method": flask_request.method, "args": dict(flask_request.args),
                    "json": flask_request.get_json(), "kind": type(flask_request).__name__}
        try:
            _ = flask_request.url
        except AttributeError as exc:
            refused = str(exc)
        return {"web": False, "greeting": self.greeting, "kwargs": kwargs, "refused": refused}


async def async_echo(flask_request, value=None):
    await asyncio.sleep(0)
    return {"web": serve.context.web, "value": value}


class Batcher:
    """Answers each item with what its batch was, and counts every item it ever handled."""

    def __init__(self):
        self.seen = collections.Counter()

    @serve.accept_batch
    def __call__(self, flask_request, *, value=None, report=None):
        if report is not None:
            return [dict(self.seen)] * len(report)
        web = serve.context.web
        items = [f"http-{r.args['i']}" for r in flask_request] if web else value
        self.seen.update(items)
        return [{"item": item, "batch": len(items), "web": web, "pid": os.getpid()}
                for item in items]


def not_batched(flask_request, value=None):
    return value


# names -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tag", ["echo:v1", "plain.v-2", "a+b", "x y*z%", "ünï:/#~", "+3A"])
def test_a_backend_tag_maps_to_a_valid_application_name_and_back(tag):
    name = backend_app_name(tag)
    check_app_name(name)
    queue_name = pamqp.constants.DOMAIN_REGEX["queue-name"]
    assert queue_name.fullmatch(f"bs.cluster.{name}.deployment")
    assert backend_tag(name) == tag
    assert backend_app_name("echo:v1") == "echo+3Av1"


# endpoints, backends and splits -------------------------------------------------------------------
def test_a_call_before_init_says_to_call_it(cluster):
    with pytest.raises(RayServeException, match=r"call serve.init\(\)"):
        serve.create_endpoint("early", "/early")
    with pytest.raises(RayServeException, match=r"call serve.init\(\)"):
        serve.create_backend(version_one, "early")


def test_endpoints_route_by_the_split_and_a_new_split_applies_to_the_next_request(cluster):
    serve.init()
    serve.create_endpoint("ep", "/ep")  # 0.8's default: GET only
    assert requests.get(f"{cluster.url}/ep", timeout=30).status_code == 503  # nothing linked
    serve.create_backend(version_one, "ep:v1")
    serve.create_backend(version_two, "ep:v2")
    serve.link("ep", "ep:v1")
    assert [requests.get(f"{cluster.url}/ep", timeout=30).text for _ in range(5)] == ["v1"] * 5
    assert requests.post(f"{cluster.url}/ep", timeout=30).status_code == 405

    serve.split("ep", {"ep:v1": 0.5, "ep:v2": 0.5})
    counts = collections.Counter(requests.get(f"{cluster.url}/ep", timeout=30).text
                                 for _ in range(60))
    assert set(counts) == {"v1", "v2"} and min(counts.values()) >= 10, counts
    handle = serve.get_handle("ep")
    assert isinstance(handle, TrafficHandle)
    assert {handle.remote().result(timeout_s=30) for _ in range(30)} == {"v1", "v2"}

    serve.split("ep", {"ep:v2": 1.0})  # no restart: the very next request goes by it
    assert [requests.get(f"{cluster.url}/ep", timeout=30).text for _ in range(5)] == ["v2"] * 5
    assert serve.get_traffic("ep")["split"] == {"ep+3Av2": 1.0}

    with pytest.raises(ValueError, match="must sum to 1"):
        serve.split("ep", {"ep:v1": 0.5, "ep:v2": 0.4})
    with pytest.raises(ValueError, match="greater than 0"):
        serve.split("ep", {"ep:v1": 1.0, "ep:v2": 0})
    with pytest.raises(RayServeException, match="backend 'nope' is not registered"):
        serve.link("ep", "nope")
    with pytest.raises(RayServeException, match="endpoint 'nowhere' is not registered"):
        serve.link("nowhere", "ep:v1")
    assert requests.get(f"{cluster.url}/ep", timeout=30).text == "v2"  # refused: unchanged


def test_methods_and_headless_endpoints(cluster):
    serve.init()
    serve.create_backend(async_echo, "any")
    serve.create_endpoint("posts", "/posts", methods=["post", "PUT"])
    serve.link("posts", "any")
    assert requests.post(f"{cluster.url}/posts", timeout=30).json() == {"web": True,
                                                                        "value": None}
    assert requests.put(f"{cluster.url}/posts", timeout=30).status_code == 200
    assert requests.get(f"{cluster.url}/posts", timeout=30).status_code == 405
    serve.create_endpoint("python-only")  # no route: reached through handles only
    serve.link("python-only", "any")
    result = serve.get_handle("python-only").remote(value=3).result(timeout_s=30)
    assert result == {"web": False, "value": 3}
    with pytest.raises(TypeError, match="list of HTTP methods"):
        serve.create_endpoint("bad", "/bad", methods="GET")


# what a backend gets ------------------------------------------------------------------------------
def test_a_backend_gets_the_request_over_http_and_keyword_arguments_from_python(cluster):
    serve.init()
    serve.create_backend(Echo, "echo:v1", "hi")  # init arguments go to the class
    serve.create_endpoint("echo", "/echo", methods=["GET", "POST"])
    serve.link("echo", "echo:v1")

    web = requests.post(f"{cluster.url}/echo?name=web", json={"x": 1}, timeout=30).json()
    assert web == {"web": True, "greeting": "hi", "url": f"{cluster.url}/echo?name=web",
                   "method": "POST", "args": {"name": "web"}, "json": {"x": 1},
                   "kind": "FlaskStyleRequest"}

    handle = serve.get_handle("echo")
    python = handle.remote(a=1, b="two").result(timeout_s=30)
    assert python["web"] is False and python["greeting"] == "hi"
    assert python["kwargs"] == {"a": 1, "b": "two"}
    assert "came from Python" in python["refused"] and "serve.context.web" in python["refused"]
    with pytest.raises(RayServeException, match="keyword arguments"):
        handle.remote(1).result(timeout_s=30)
    assert serve.context.web is False  # outside a replica
    with pytest.raises(AttributeError):
        serve.context.no_such_flag  # noqa: B018


def test_get_handle_passes_its_slo_on(cluster):
    serve.init()
    serve.create_backend(slow, "slow")
    serve.create_endpoint("slow")
    serve.link("slow", "slow")
    with pytest.raises(RequestTimeoutError):
        serve.get_handle("slow", relative_slo_ms=300).remote().result(timeout_s=30)
    late = serve.get_handle("slow", absolute_slo_ms=time.time() * 1000 + 60_000)
    assert late.remote().result(timeout_s=30) == "late"


# batches ------------------------------------------------------------------------------------------
def _concurrently(calls):
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def test_accept_batch_gets_batches_under_load_each_request_answered_once(cluster):
    serve.init()
    serve.create_backend(Batcher, "batcher", backend_config=serve.BackendConfig(
        max_batch_size=8))
    serve.create_endpoint("batcher", "/batcher")
    serve.link("batcher", "batcher")
    handle = serve.get_handle("batcher")

    over_http = _concurrently([
        lambda i=i: requests.get(f"{cluster.url}/batcher?i={i}", timeout=60).json()
        for i in range(CLIENTS)])
    responses = [handle.remote(value=f"py-{i}") for i in range(CLIENTS)]
    from_python = [response.result(timeout_s=60) for response in responses]

    assert [r["item"] for r in over_http] == [f"http-{i}" for i in range(CLIENTS)]
    assert [r["item"] for r in from_python] == [f"py-{i}" for i in range(CLIENTS)]
    assert all(r["web"] for r in over_http) and not any(r["web"] for r in from_python)
    assert max(r["batch"] for r in over_http) > 1, over_http
    assert max(r["batch"] for r in from_python) > 1, from_python
    assert max(r["batch"] for r in over_http + from_python) <= 8
    seen = handle.remote(report=True).result(timeout_s=30)
    assert seen == {**{f"http-{i}": 1 for i in range(CLIENTS)},
                    **{f"py-{i}": 1 for i in range(CLIENTS)}}


def test_backend_config_applies_live_and_resources_restart(cluster):
    serve.init()
    serve.create_backend(Batcher, "live", backend_config={"max_batch_size": 1})
    serve.create_endpoint("live")
    serve.link("live", "live")
    handle = serve.get_handle("live")
    config = serve.get_backend_config("live")
    assert (config.num_replicas, config.max_batch_size) == (1, 1)
    assert config.has_accept_batch_annotation

    before = [r.result(timeout_s=60) for r in [handle.remote(value=i) for i in range(CLIENTS)]]
    assert {r["batch"] for r in before} == {1}
    (pid,) = {r["pid"] for r in before}

    config.num_replicas, config.max_batch_size = 2, 8
    serve.set_backend_config("live", config)
    after = [r.result(timeout_s=60) for r in [handle.remote(value=i) for i in range(CLIENTS)]]
    assert max(r["batch"] for r in after) > 1, after
    assert {r["pid"] for r in after} >= {pid}  # the first replica took it live, no restart
    wait = time.monotonic() + 30
    while len({r["pid"] for r in after}) < 2 and time.monotonic() < wait:
        after += [r.result(timeout_s=60) for r in [handle.remote(value=i) for i in range(8)]]
    assert len({r["pid"] for r in after}) == 2
    assert serve.get_backend_config("live").model_dump() == {
        **config.model_dump(), "num_replicas": 2, "max_batch_size": 8}

    config.num_cpus = 0.1  # a resource: new replicas, as 0.8 restarted them
    serve.set_backend_config("live", config)
    restarted = {handle.remote(value=i).result(timeout_s=60)["pid"] for i in range(20)}
    assert not restarted & {r["pid"] for r in after}
    assert serve.get_backend_config("live").num_cpus == 0.1

    with pytest.raises(ValueError):
        config.num_replicas = 0  # checked on assignment
    serve.create_backend(not_batched, "plain")
    with pytest.raises(RayServeException, match="accept_batch"):
        serve.set_backend_config("plain", {"max_batch_size": 4})
    with pytest.raises(RayServeException, match="accept_batch"):
        serve.create_backend(not_batched, "plain", backend_config={"max_batch_size": 4})
    with pytest.raises(RayServeException, match="not registered"):
        serve.get_backend_config("missing")


# serve.init and @serve.route ----------------------------------------------------------------------
def test_init_sets_the_proxy_and_history_and_route_links_in_one_step(cluster):
    port = free_port()  # not the cluster's default: init's http_port must be what is used
    serve.init(http_port=port, gc_window_seconds=120, blocking=True, kv_store_path="/tmp/x",
               queueing_policy=serve.RoutePolicy.PowerOfTwo)

    @serve.route("/hello")
    def hello(flask_request, name="python"):
        return f"hello {flask_request.args['name'] if serve.context.web else name}"

    assert hello.remote(name="handle").result(timeout_s=30) == "hello handle"
    assert requests.get(f"http://127.0.0.1:{port}/hello?name=web", timeout=30).text == \
        "hello web"
    assert requests.post(f"http://127.0.0.1:{port}/hello", timeout=30).status_code == 405
    assert serve.get_backend_config("hello:v0").num_replicas == 1
    assert serve.stat(agg_windows_seconds=[10, 60])["history_window_s"] == 120
    with pytest.raises(ValueError, match="queueing_policy"):
        serve.init(queueing_policy="Fastest")


# Ray 1.x beside 0.8 -------------------------------------------------------------------------------
@serve.deployment
class Counter:
    def __init__(self, start):
        self.count = start

    def __call__(self, request=None):
        self.count += 1
        return self.count


@serve.deployment
def answer():
    return "here"


def test_ray1_get_deployment_list_deployments_and_get_handle(cluster):
    Counter.deploy(10)
    serve.run(answer.bind(), route_prefix="/answer")  # the default application
    found = serve.get_deployment("Counter")
    assert isinstance(found, serve.Deployment)
    assert (found.name, found.init_args, found.num_replicas, found.route_prefix) == \
        ("Counter", (10,), 1, "/Counter")
    assert sorted(serve.list_deployments()) == ["Counter", "answer"]

    handle = serve.get_handle("Counter")  # a deployment, not an endpoint
    assert isinstance(handle, serve.handle.RayServeSyncHandle)
    assert isinstance(handle, serve.handle.RayServeHandle)
    assert handle.remote().result(timeout_s=30) == 11

    found.options(num_replicas=2).deploy()  # redeployed with the init arguments it ran with
    assert serve.get_deployment("Counter").num_replicas == 2
    assert serve.get_handle("Counter").remote().result(timeout_s=30) == 11
    with pytest.raises(KeyError, match="Did you call Deployment.deploy"):
        serve.get_deployment("missing")
    with pytest.raises(RayServeException, match="no endpoint"):
        serve.get_handle("missing")
    assert isinstance(serve.get_handle("missing", missing_ok=True), TrafficHandle)


def test_the_handle_class_names_of_ray_2():
    from broker_serve import handle

    assert handle.RayServeHandle is handle.DeploymentHandle is serve.DeploymentHandle
    assert handle.RayServeSyncHandle is handle.DeploymentHandle
    assert serve.handle is handle and serve.context.ReplicaContext is serve.ReplicaContext
