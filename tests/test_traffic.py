"""Traffic policy (docs/architecture.md, "Traffic policy"): weighted splits between
applications behind one route, changed live; shadow copies whose responses never reach the
client; allowed methods; the same split through `TrafficHandle`; and the record set from
Python, the REST API and a config file."""

from __future__ import annotations

import asyncio
import collections
import pathlib
import textwrap
import threading
import time
from typing import Any

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from broker_serve import RayServeException, serve
from broker_serve.client.traffic import TrafficHandle
from broker_serve.controller.traffic import traffic_routes
from broker_serve.proxy.http import RouteTable
from broker_serve.schema import ServeDeploySchema
from broker_serve.state.records import AppRecord, AppStatusRecord, TrafficRecord
from broker_serve.state.traffic import WeightedChoice, make_traffic

from .conftest import REDIS_URL, Cluster
from .waiting import wait_for

TOKEN = "traffic-test-token"


@serve.deployment
class Version:
    """Answers its tag; writes the id of each request it serves to its log, if it has one."""

    def __init__(self, tag: str, log: str | None = None) -> None:
        self.tag = tag
        self.log = log

    async def __call__(self, request: Request) -> str:
        request_id = request.query_params.get("id")
        if self.log and request_id:
            with open(self.log, "a") as log:
                log.write(request_id + "\n")
        return self.tag

    def which(self) -> str:
        return self.tag


@serve.deployment
class Shadow:
    """A shadow: answers something the client must never see, and writes down each copy it
    got, and whether it was cancelled while it slept."""

    def __init__(self, log: str, sleep_s: float = 0.0) -> None:
        self.log = log
        self.sleep_s = sleep_s

    async def __call__(self, request: Request) -> str:
        body = await request.body()
        with open(self.log, "a") as log:
            log.write(f"{request.method} {request.query_params.get('id')} {len(body)}\n")
        try:
            await asyncio.sleep(self.sleep_s)
        except asyncio.CancelledError:
            with open(self.log, "a") as log:
                log.write("cancelled\n")
            raise
        return "from the shadow"


@serve.deployment
class Caller:
    """Calls an endpoint through a TrafficHandle it was given, from a replica's event loop."""

    def __init__(self, endpoint: TrafficHandle) -> None:
        self.endpoint = endpoint

    async def __call__(self) -> str:
        return str(await self.endpoint.which.remote())


def deploy_versions(*tags: str, logs: pathlib.Path | None = None) -> None:
    """One application per tag, off HTTP: only traffic routes reach them."""
    for tag in tags:
        log = str(logs / f"{tag}.log") if logs is not None else None
        serve.run(Version.bind(tag, log), name=tag, route_prefix=None)


def tally(url: str, n: int) -> collections.Counter[str]:
    with requests.Session() as session:
        answers = [session.get(url, timeout=30) for _ in range(n)]
    assert {a.status_code for a in answers} == {200}
    return collections.Counter(a.text for a in answers)


def served_by(url: str, n: int = 40) -> set[str]:
    """Who answered n requests; empty while any is not answered 200 (a change not yet
    applied: REST and config writes do not wait for the proxies)."""
    with requests.Session() as session:
        answers = [session.get(url, timeout=30) for _ in range(n)]
    return {a.text for a in answers} if {a.status_code for a in answers} == {200} else set()


def proxy_samples(cluster: Cluster, name: str) -> list[tuple[dict[str, str], float]]:
    text = requests.get(f"{cluster.url}/-/metrics", timeout=10).text
    return [(sample.labels, sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name]


def lines(path: pathlib.Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# weighted splits over HTTP ------------------------------------------------------------------
@pytest.mark.slow
def test_a_50_50_split_of_400_requests_lands_near_half_each_way(cluster):
    deploy_versions("v1", "v2")
    serve.set_traffic("/echo", {"v1": 0.5, "v2": 0.5})

    counts = tally(f"{cluster.url}/echo", 400)
    assert 160 <= counts["v1"] <= 240 and 160 <= counts["v2"] <= 240, counts
    assert counts["v1"] + counts["v2"] == 400

    detail = requests.get(f"{cluster.url}/-/routes/detail", timeout=10).json()["routes"]["/echo"]
    assert detail["endpoint"] == "/echo"
    assert sorted((t["app"], t["weight"], t["ready"]) for t in detail["split"]) == [
        ("v1", 0.5, True), ("v2", 0.5, True)]
    assert serve.get_traffic("/echo") == {"name": "/echo", "route_prefix": "/echo",
                                          "methods": None, "split": {"v1": 0.5, "v2": 0.5},
                                          "shadow": {}}


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_split_changed_live_under_load_answers_every_request_exactly_once(cluster, tmp_path):
    deploy_versions("v1", "v2", logs=tmp_path)
    serve.set_traffic("/canary", {"v1": 1.0}, name="canary")
    answers: dict[str, tuple[int, str, float]] = {}
    failures: list[str] = []
    lock = threading.Lock()
    changing_at: list[float] = []
    stop = threading.Event()

    def client(index: int) -> None:
        with requests.Session() as session:
            n = 0
            while not stop.is_set():
                request_id = f"c{index}-{n}"
                n += 1
                sent = time.monotonic()
                try:
                    answer = session.get(f"{cluster.url}/canary", params={"id": request_id},
                                         timeout=30)
                except requests.RequestException as exc:
                    failures.append(f"{request_id}: {exc}")
                    continue
                with lock:
                    assert request_id not in answers
                    answers[request_id] = (answer.status_code, answer.text, sent)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    try:
        # Enough requests by the old split that no change can have reached them.
        wait_for(lambda: sum(1 for *_, sent in list(answers.values())
                             if sent < time.monotonic() - 0.5) >= 300, timeout=60)
        changing_at.append(time.monotonic())
        serve.set_traffic("/canary", {"v1": 0.9, "v2": 0.1}, name="canary")
        changed_at = time.monotonic()
        wait_for(lambda: sum(1 for *_, sent in list(answers.values())
                             if sent > changed_at) >= 600, timeout=120)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)

    assert failures == []
    assert {status for status, _, _ in answers.values()} == {200}
    # Sent well before the change: by the old split; sent after set_traffic returned: by the new.
    before = collections.Counter(text for _, text, sent in answers.values()
                                 if sent < changing_at[0] - 0.5)
    after = collections.Counter(text for _, text, sent in answers.values() if sent > changed_at)
    assert set(before) == {"v1"}
    assert 0.05 <= after["v2"] / sum(after.values()) <= 0.15, after
    # Each request ran exactly once, on the application that answered it.
    served = {tag: collections.Counter(lines(tmp_path / f"{tag}.log")) for tag in ("v1", "v2")}
    assert all(count == 1 for tag in served for count in served[tag].values())
    for request_id, (_, text, _) in answers.items():
        assert served[text][request_id] == 1, request_id
        assert served["v2" if text == "v1" else "v1"][request_id] == 0, request_id


# the handle -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_traffic_handle_routes_by_the_same_weights_and_follows_a_change(cluster):
    deploy_versions("v1", "v2")
    serve.set_traffic(None, {"v1": 0.5, "v2": 0.5}, name="pair")
    handle = TrafficHandle("pair")

    counts = collections.Counter(handle.which.remote().result(timeout_s=30) for _ in range(400))
    assert 160 <= counts["v1"] <= 240 and 160 <= counts["v2"] <= 240, counts
    assert requests.get(f"{cluster.url}/-/routes", timeout=10).json() == {}  # handles only
    serve.run(Caller.bind(handle), name="caller", route_prefix="/caller")
    assert set(tally(f"{cluster.url}/caller", 40)) == {"v1", "v2"}  # from inside a replica

    serve.set_traffic(None, {"v2": 1}, name="pair")
    by_options = handle.options(method_name="which")
    assert {by_options.remote().result(timeout_s=30) for _ in range(20)} == {"v2"}

    serve.set_traffic(None, {}, name="pair")
    with pytest.raises(RayServeException, match="endpoint pair has no backend linked"):
        handle.which.remote().result(timeout_s=30)
    with pytest.raises(RayServeException, match="no traffic endpoint named 'missing'"):
        TrafficHandle("missing").which.remote().result(timeout_s=30)


# shadows --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_shadow_copies_are_sent_and_their_responses_never_reach_the_client(cluster, tmp_path):
    log = tmp_path / "shadow.log"
    deploy_versions("main")
    serve.run(Shadow.bind(str(log)), name="shadow", route_prefix=None)
    serve.set_traffic("/api", {"main": 1.0}, shadow={"shadow": 1.0})

    with requests.Session() as session:
        answers = [session.post(f"{cluster.url}/api", params={"id": f"r{i}"}, data=b"x" * i,
                                timeout=30) for i in range(20)]
        # A body that does not fit its first chunk streams, and is not shadowed.
        streamed = session.post(f"{cluster.url}/api", params={"id": "big"},
                                data=b"y" * (3 * 1024 * 1024 // 2), timeout=30)
    assert [(a.status_code, a.text) for a in answers] == [(200, "main")] * 20
    assert (streamed.status_code, streamed.text) == (200, "main")
    copies = wait_for(lambda: len(lines(log)) >= 20 and lines(log))
    assert sorted(copies) == sorted(f"POST r{i} {i}" for i in range(20))

    def shadowed() -> float:
        return sum(value for labels, value in
                   proxy_samples(cluster, "broker_serve_proxy_shadow_requests_total")
                   if labels == {"application": "shadow", "outcome": "answered"})

    assert wait_for(lambda: shadowed() == 20)
    # Kept apart: the proxy's request counter knows only the real requests.
    requests_total = proxy_samples(cluster, "broker_serve_proxy_requests_total")
    assert {labels["application"] for labels, _ in requests_total} == {"main"}
    assert sum(value for _, value in requests_total) == 21
    assert "big" not in " ".join(lines(log))


@pytest.mark.slow
def test_a_slow_shadow_never_delays_the_request_and_is_cancelled_at_its_bound(cluster,
                                                                              tmp_path):
    log = tmp_path / "shadow.log"
    serve.start(http_options={"request_timeout_s": 2})  # the shadows' bound too
    deploy_versions("main")
    serve.run(Shadow.bind(str(log), sleep_s=60), name="shadow", route_prefix=None)
    serve.set_traffic("/api", {"main": 1.0}, shadow={"shadow": 1.0})

    started = time.monotonic()
    answer = requests.get(f"{cluster.url}/api", params={"id": "slow"}, timeout=30)
    assert (answer.status_code, answer.text) == (200, "main")
    assert time.monotonic() - started < 1.5
    assert wait_for(lambda: lines(log) == ["GET slow 0", "cancelled"], timeout=20)
    assert wait_for(lambda: proxy_samples(cluster, "broker_serve_proxy_shadow_requests_total")
                    == [({"application": "shadow", "outcome": "timeout"}, 1.0)])


# methods, empty endpoints and validation ------------------------------------------------------
@pytest.mark.slow
def test_methods_not_allowed_get_405_and_an_unlinked_endpoint_503(cluster):
    deploy_versions("v1")
    serve.set_traffic("/only-get", {"v1": 1}, methods=["get"])
    assert serve.get_traffic("/only-get")["methods"] == ["GET"]
    assert requests.get(f"{cluster.url}/only-get", timeout=10).text == "v1"
    refused = requests.post(f"{cluster.url}/only-get", timeout=10)
    assert refused.status_code == 405
    assert refused.headers["allow"] == "GET"

    serve.set_traffic("/later", {}, name="later")  # 0.8's create_endpoint before link
    unlinked = requests.get(f"{cluster.url}/later", timeout=10)
    assert unlinked.status_code == 503
    assert "endpoint later has no backend linked" in unlinked.text
    serve.set_traffic("/later", {"v1": 1}, name="later")  # link: the next request goes
    assert requests.get(f"{cluster.url}/later", timeout=10).text == "v1"

    serve.delete_traffic("later")
    assert requests.get(f"{cluster.url}/later", timeout=10).status_code == 404
    assert serve.get_traffic("later") is None
    serve.delete_traffic("later")  # nothing to delete: nothing happens


@pytest.mark.slow
def test_invalid_traffic_is_refused_with_a_clear_error(cluster):
    deploy_versions("v1", "v2")
    serve.run(Version.bind("owner"), name="owner", route_prefix="/owned")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"route_prefix": "/x", "split": {"v1": 0.5, "v2": 0.4}},
         "split weights must sum to 1, got 0.9"),
        ({"route_prefix": "/x", "split": {"v1": 1.5, "v2": -0.5}},
         r"split weights must be greater than 0; \['v2'\]"),
        ({"route_prefix": "/x", "split": {"v1": 1}, "shadow": {"v2": 1.5}},
         r"shadow fractions must be in \(0, 1\]"),
        ({"route_prefix": "/x", "split": {"v1": 1, "nope": 0}}, "greater than 0"),
        ({"route_prefix": "/x", "split": {"v1": 0.5, "nope": 0.5}},
         r"names application\(s\) \['nope'\], which do not exist"),
        ({"route_prefix": "/x", "split": {"v1": 1}, "shadow": {"ghost": 0.5}},
         r"\['ghost'\], which do not exist"),
        ({"route_prefix": "/owned", "split": {"v1": 1}},
         r"route_prefix '/owned' is served by application\(s\) \['owner'\]"),
        ({"route_prefix": "x", "split": {"v1": 1}}, "route_prefix must start with '/'"),
        ({"route_prefix": None, "split": {"v1": 1}}, "needs a name when route_prefix is None"),
        ({"route_prefix": "/x", "split": {"v1": 1}, "methods": ["GET POST"]},
         "'GET POST' is not an HTTP method"),
    ]
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message):
            serve.set_traffic(**arguments)
    assert serve.get_traffic("/x") is None
    # An application in the split may own the prefix: the record takes it over.
    serve.set_traffic("/owned", {"owner": 0.5, "v1": 0.5})
    assert set(tally(f"{cluster.url}/owned", 40)) == {"owner", "v1"}
    with pytest.raises(ValueError, match="already routed by traffic '/owned'"):
        serve.set_traffic("/owned", {"v1": 1}, name="another")


# REST and config files ------------------------------------------------------------------------
def api_url(cluster: Cluster) -> str:
    return f"http://127.0.0.1:{cluster.env['BROKER_SERVE_DASHBOARD_PORT']}"


def rest(cluster: Cluster, method: str, path: str, **kwargs: Any) -> requests.Response:
    return requests.request(method, api_url(cluster) + path, timeout=60,
                            headers={"Authorization": f"Bearer {TOKEN}"}, **kwargs)


@pytest.mark.slow
def test_the_rest_api_puts_gets_and_deletes_traffic(cluster, monkeypatch):
    monkeypatch.setenv("BROKER_SERVE_API_TOKEN", TOKEN)  # before the local cluster starts
    deploy_versions("v1", "v2")
    record = {"name": "web", "route_prefix": "/web", "split": {"v1": 0.5, "v2": 0.5},
              "methods": ["GET"]}
    put = rest(cluster, "PUT", "/api/serve/traffic/", json=record)
    assert put.status_code == 200, put.text
    assert put.json() == {**record, "shadow": {}}
    assert wait_for(lambda: served_by(f"{cluster.url}/web") == {"v1", "v2"})
    assert requests.post(f"{cluster.url}/web", timeout=10).status_code == 405
    assert rest(cluster, "GET", "/api/serve/traffic/").json() == {
        "traffic": [{**record, "shadow": {}}]}

    bad = rest(cluster, "PUT", "/api/serve/traffic/", json={**record, "split": {"v1": 0.7}})
    assert bad.status_code == 400
    assert "split weights must sum to 1, got 0.7" in bad.json()["detail"]
    unknown = rest(cluster, "PUT", "/api/serve/traffic/", json={**record, "split": {"v3": 1}})
    assert unknown.status_code == 400
    assert "['v3'], which do not exist" in unknown.json()["detail"]
    no_token = requests.put(f"{api_url(cluster)}/api/serve/traffic/", json=record, timeout=10)
    assert no_token.status_code == 401

    assert rest(cluster, "DELETE", "/api/serve/traffic/web").json() == {"deleted": "web"}
    assert wait_for(lambda: requests.get(f"{cluster.url}/web", timeout=10).status_code == 404)
    assert rest(cluster, "DELETE", "/api/serve/traffic/web").status_code == 404


VERSIONS_MODULE = '''
from broker_serve import serve


@serve.deployment
def one() -> str:
    return "one"


@serve.deployment
def two() -> str:
    return "two"


one_app = one.bind()
two_app = two.bind()
'''


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_config_file_splits_traffic_and_its_next_put_replaces_its_own(cluster, monkeypatch,
                                                                         tmp_path):
    monkeypatch.setenv("BROKER_SERVE_API_TOKEN", TOKEN)
    code = tmp_path / "code"
    code.mkdir()
    (code / "config_versions.py").write_text(textwrap.dedent(VERSIONS_MODULE))
    deploy_versions("v1")  # starts the local cluster; set from Python, so a PUT keeps it
    serve.set_traffic("/kept", {"v1": 1}, name="kept")
    config = {
        "applications": [
            {"name": name, "route_prefix": None, "import_path": f"config_versions:{name}_app",
             "runtime_env": {"working_dir": str(code)}} for name in ("one", "two")],
        "traffic": [{"name": "pair", "route_prefix": "/pair",
                     "split": {"one": 0.5, "two": 0.5}}],
    }
    put = rest(cluster, "PUT", "/api/serve/applications/", json=config)
    assert put.status_code == 200, put.text
    assert wait_for(lambda: served_by(f"{cluster.url}/pair") == {"one", "two"}, timeout=60)

    config["traffic"] = [{"name": "solo", "route_prefix": "/solo", "split": {"two": 1}}]
    assert rest(cluster, "PUT", "/api/serve/applications/", json=config).status_code == 200
    assert wait_for(lambda: requests.get(f"{cluster.url}/solo", timeout=10).text == "two")
    assert wait_for(lambda: requests.get(f"{cluster.url}/pair", timeout=10).status_code == 404)
    names = [r["name"] for r in rest(cluster, "GET", "/api/serve/traffic/").json()["traffic"]]
    assert names == ["kept", "solo"]  # the Python one stays: the config did not name it

    config["traffic"] = [{"name": "bad", "route_prefix": "/bad", "split": {"three": 1}}]
    refused = rest(cluster, "PUT", "/api/serve/applications/", json=config)
    assert refused.status_code == 422
    assert "names ['three'], which this config does not deploy" in refused.text


def test_a_config_s_traffic_must_name_its_own_applications_and_free_prefixes():
    apps = [{"name": "a", "import_path": "m:a", "route_prefix": "/a"},
            {"name": "b", "import_path": "m:b", "route_prefix": None}]
    with pytest.raises(ValueError, match=r"names \['c'\], which this config does not deploy"):
        ServeDeploySchema.model_validate(
            {"applications": apps, "traffic": [{"name": "t", "split": {"c": 1}}]})
    with pytest.raises(ValueError, match=r"served by application\(s\) \['a'\]"):
        ServeDeploySchema.model_validate({"applications": apps, "traffic": [
            {"name": "t", "route_prefix": "/a", "split": {"b": 1}}]})
    with pytest.raises(ValueError, match="split weights must sum to 1"):
        ServeDeploySchema.model_validate({"applications": apps, "traffic": [
            {"name": "t", "route_prefix": "/t", "split": {"a": 0.2, "b": 0.2}}]})
    config = ServeDeploySchema.model_validate({"applications": apps, "traffic": [
        {"name": "t", "route_prefix": "/a", "split": {"a": 0.9, "b": 0.1},
         "methods": ["post", "get"]}]})
    assert config.traffic[0].methods == ["POST", "GET"]


# the route table: what the controller writes, what the proxy loads -------------------------
def _app(name: str, prefix: str | None = None) -> AppRecord:
    return {"name": name, "route_prefix": prefix, "ingress": "D", "version": "1",
            "deployed_at": 0.0, "deployments": {"D": {
                "version": "1", "queue": f"bs.t.{name}.D", "num_replicas": 1,
                "graceful_shutdown_timeout_s": 1.0, "config": {}, "user_config_hash": ""}}}


def _status(name: str, ready: bool) -> AppStatusRecord:
    return {"name": name, "version": "1", "deploy_id": None, "route_prefix": None,
            "ingress": "D", "last_deployed_time_s": 0.0, "status":
            "RUNNING" if ready else "DEPLOYING", "message": "" if ready else "starting",
            "deployments": {"D": {"name": "D", "status": "HEALTHY", "message": "",
                                  "replica_states": {}, "ready": ready, "target_replicas": 1}}}


def test_targets_not_ready_or_gone_are_left_out_and_the_rest_renormalised():
    record: TrafficRecord = make_traffic("t", "/t", {"a": 0.6, "b": 0.3, "gone": 0.1},
                                         shadow={"c": 0.5, "d": 0.2})
    apps = {name: _app(name) for name in "abcd"}
    statuses = {"a": _status("a", False), "b": _status("b", True), "c": _status("c", True),
                "d": _status("d", False)}
    route = traffic_routes({"t": record}, apps, statuses)["/t"]
    assert [(t["app"], t["weight"], t["ready"]) for t in route["split"]] == [
        ("a", 0.0, False), ("b", 1.0, True)]
    assert (route["app"], route["queue"], route["ready"]) == ("b", "bs.t.b.D", True)
    assert [(s["app"], s["fraction"]) for s in route["shadow"]] == [("c", 0.5)]

    statuses["b"] = _status("b", False)
    waiting = traffic_routes({"t": record}, apps, statuses)["/t"]
    assert not waiting["ready"]
    assert waiting["message"] == "endpoint t has no ready backend: a is DEPLOYING, b is DEPLOYING"
    table = RouteTable()
    table.load({"version": 1, "routes": {"/t": waiting}})
    assert table.policies["/t"].choose() is None  # the proxy answers 503 with the message

    unlinked = traffic_routes({"t": make_traffic("t", "/t", {})}, apps, statuses)["/t"]
    assert (unlinked["ready"], unlinked["message"]) == (False, "endpoint t has no backend linked")


def test_a_route_without_a_split_is_loaded_as_before_with_no_policy(cluster):
    serve.run(Version.bind("plain"), name="plain", route_prefix="/plain")
    detail = requests.get(f"{cluster.url}/-/routes/detail", timeout=10).json()
    entry = detail["routes"]["/plain"]
    # The entry of an application's own route has exactly these fields ...
    assert set(entry) == {"app", "deployment", "queue", "status", "message", "ready", "bounded",
                          "durable", "ordered"}
    table = RouteTable()
    table.load(detail)
    # ... and the proxy keeps no policy for it: its request path is one dict lookup longer.
    assert table.policies == {}
    assert requests.get(f"{cluster.url}/plain", timeout=10).text == "plain"


def test_weighted_choices_follow_their_weights_closely():
    choice = WeightedChoice([("a", 0.9), ("b", 0.1), ("never", 0.0)])
    for n in (10, 100, 400):
        counts = collections.Counter(choice.choose() for _ in range(n))
        assert abs(counts["b"] - n * 0.1) <= 2, (n, counts)
        assert "never" not in counts
    alternate = collections.Counter(choice.choose() for i in range(2000) if i % 2)
    assert abs(alternate["b"] - 100) <= 3  # no pattern of the callers skews it
    assert not WeightedChoice([("x", 0.0)])



def test_an_app_deployed_onto_a_prefix_a_split_routes_is_refused_unless_in_it(cluster):
    deploy_versions("left", "right")
    serve.set_traffic("/canary", {"left": 0.5, "right": 0.5})
    with pytest.raises(ValueError, match="routed by traffic '/canary'"):
        serve.run(Version.bind("intruder"), name="intruder", route_prefix="/canary")
    assert "intruder" not in serve.status().applications
    # One in the split may take the prefix: the record still routes it.
    serve.run(Version.bind("left"), name="left", route_prefix="/canary")
    assert served_by(f"{cluster.url}/canary") == {"left", "right"}


def test_shutdown_deletes_the_traffic_records_with_the_apps(cluster):
    deploy_versions("left", "right")
    serve.set_traffic("/gone", {"left": 0.5, "right": 0.5}, name="gone")
    assert serve.get_traffic("gone") is not None
    serve.shutdown()  # stops this test's local cluster too: ask Redis itself
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert client.hgetall(f"bs:{cluster.name}:traffic") == {}
    finally:
        client.close()
