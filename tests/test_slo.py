"""SLO deadlines end to end: handle options (Ray Serve 0.8's relative_slo_ms and absolute_slo_ms),
the HTTP SLO headers, a deadline inherited by nested calls, and `order_by_deadline`.

Deployments append the tag of every request they start to a file, so a test can tell what ran,
and how often. A request that waits past its deadline must never appear there.
"""

from __future__ import annotations

import asyncio
import math
import pickle
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import pika
import pytest
import requests
from pamqp import commands as spec
from starlette.requests import Request

from broker_serve import RayServeException, RequestTimeoutError, serve
from broker_serve.client.handle import DeploymentHandle
from broker_serve.protocol import deadlines, priorities
from broker_serve.transport import frames

from .conftest import AMQP_URL
from .test_frames import reference
from .test_protocol_foreign import ForeignClient
from .waiting import wait_for

SLO_MS = 50
# What "refused in time" allows past the deadline on a loaded 2-core machine.
MARGIN_S = 1.0
# How long a request tagged "hold..." runs: long enough to queue others behind it.
HOLD_S = 1.0


@serve.deployment(max_ongoing_requests=1)
class Slow:
    """Runs one request at a time, each for `seconds`."""

    def __init__(self, ran: str, seconds: float = 0.3) -> None:
        self.ran = Path(ran)
        self.seconds = seconds

    async def work(self, tag: str) -> str:
        with self.ran.open("a") as log:
            log.write(f"{tag}\n")
        await asyncio.sleep(HOLD_S if tag.startswith("hold") else self.seconds)
        return tag

    async def __call__(self, request: Request) -> str:
        return await self.work(request.query_params["tag"])


@serve.deployment
class Outer:
    """Calls Slow with a later SLO of its own than the request it handles has."""

    def __init__(self, slow: DeploymentHandle) -> None:
        self.slow = slow

    async def __call__(self, tag: str) -> str:
        started = time.monotonic()
        try:
            return await self.slow.options(relative_slo_ms=60_000).work.remote(tag)
        except RequestTimeoutError:
            return f"timed out after {time.monotonic() - started:.3f}"


def ran(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def queue_depth(queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        connection.close()


def dead_letters(cluster) -> int:
    return queue_depth(f"bs.{cluster.name}.dead")


def start_backlog(handle: DeploymentHandle, log: Path, count: int, prefix: str = "b") -> list:
    """`count` calls without a deadline, the first of them running."""
    first = handle.work.remote(f"{prefix}0")
    wait_for(lambda: f"{prefix}0" in ran(log), timeout=30, interval=0.02)
    return [first] + [handle.work.remote(f"{prefix}{i}") for i in range(1, count)]


def flush(handle: DeploymentHandle, tag: str = "sentinel") -> None:
    """A call without a deadline published last: once it ran, the replica has taken (and
    skipped or run) every request published before it, the queue being FIFO."""
    assert handle.work.remote(tag).result(timeout_s=60) == tag


def refused_in_time(call) -> float:
    """Make a call that must time out at its 50 ms deadline; the seconds it took."""
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError) as info:
        call().result(timeout_s=30)
    elapsed = time.monotonic() - started
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, RayServeException)
    assert info.value.error_type == "DeadlineExceeded"
    assert SLO_MS / 1000 - 0.01 <= elapsed < SLO_MS / 1000 + MARGIN_S, elapsed
    return elapsed


def test_handle_slo_behind_a_backlog_is_refused_in_time_and_never_runs(cluster, tmp_path):
    log = tmp_path / "ran.txt"
    handle = serve.run(Slow.bind(str(log)))
    backlog = start_backlog(handle, log, 6)
    relative = handle.options(relative_slo_ms=SLO_MS)
    for i in range(3):
        refused_in_time(lambda i=i: relative.work.remote(f"rel{i}"))
    refused_in_time(lambda: handle.options(
        absolute_slo_ms=time.time() * 1000 + SLO_MS).work.remote("abs"))
    # A deadline that passed already is refused without a publish.
    with pytest.raises(RequestTimeoutError):
        handle.options(absolute_slo_ms=time.time() * 1000 - 1).work.remote("past").result()

    assert [r.result(timeout_s=30) for r in backlog] == [f"b{i}" for i in range(6)]
    flush(handle)
    assert Counter(ran(log)) == Counter([f"b{i}" for i in range(6)] + ["sentinel"])
    # The replica skipped the late ones and acked them: none became a dead letter.
    assert dead_letters(cluster) == 0


def test_http_slo_header_behind_a_backlog(cluster, tmp_path):
    serve.start(http_options={"request_timeout_s": 2})
    log = tmp_path / "ran.txt"
    handle = serve.run(Slow.bind(str(log)))
    backlog = start_backlog(handle, log, 10)

    def get(tag: str, **headers: str) -> tuple[requests.Response, float]:
        started = time.monotonic()
        response = requests.get(f"{cluster.url}/?tag={tag}", headers=headers, timeout=30)
        return response, time.monotonic() - started

    for i in range(3):
        response, elapsed = get(f"h{i}", **{"X-Serve-Relative-Slo-Ms": str(SLO_MS)})
        assert response.status_code == 408, response.text
        assert "deadline" in response.text
        assert SLO_MS / 1000 - 0.01 <= elapsed < SLO_MS / 1000 + MARGIN_S, elapsed
    response, elapsed = get("habs", **{"X-Serve-Absolute-Slo-Ms":
                                       str(int(time.time() * 1000) + SLO_MS)})
    assert response.status_code == 408 and elapsed < SLO_MS / 1000 + MARGIN_S
    # request_timeout_s is the earlier deadline here: it wins.
    response, elapsed = get("hlong", **{"X-Serve-Relative-Slo-Ms": "600000"})
    assert response.status_code == 408 and 2.0 <= elapsed < 2.0 + MARGIN_S, elapsed
    # Bad SLO headers are refused at once, and nothing is published.
    for headers in ({"X-Serve-Relative-Slo-Ms": "soon"}, {"X-Serve-Relative-Slo-Ms": "-5"},
                    {"X-Serve-Absolute-Slo-Ms": "nan"},
                    {"X-Serve-Relative-Slo-Ms": "50", "X-Serve-Absolute-Slo-Ms": "50"}):
        response, _ = get("bad", **headers)
        assert response.status_code == 400 and "Slo-Ms" in response.text, response.text
    response, _ = get("hpast", **{"X-Serve-Absolute-Slo-Ms": "1000"})
    assert response.status_code == 408

    assert [r.result(timeout_s=30) for r in backlog] == [f"b{i}" for i in range(10)]
    flush(handle)
    assert Counter(ran(log)) == Counter([f"b{i}" for i in range(10)] + ["sentinel"])
    # A request with a deadline that comes in time is served.
    response, _ = get("ok", **{"X-Serve-Relative-Slo-Ms": "20000"})
    assert response.status_code == 200 and response.text == "ok"
    assert dead_letters(cluster) == 0


def test_a_nested_call_inherits_the_earlier_deadline(cluster, tmp_path):
    log = tmp_path / "ran.txt"
    outer = serve.run(Outer.bind(Slow.bind(str(log))))
    slow = serve.get_deployment_handle("Slow", app_name="default")
    backlog = start_backlog(slow, log, 6)
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        outer.options(relative_slo_ms=300).remote("inner1").result(timeout_s=30)
    assert time.monotonic() - started < 0.3 + MARGIN_S
    # A caller that never cancels (a foreign one, by docs/protocol.md) lets Outer answer: its
    # call to Slow gave up at the deadline Outer's request has, not at its own 60 s.
    client = ForeignClient()
    try:
        request_id = client.publish(
            f"bs.{cluster.name}.default.Outer", "call",
            msgpack.packb({"method": "__call__", "args": ["inner2"], "kwargs": {}}),
            headers={"bs-version": 1, "bs-deadline": int(time.time() * 1000) + 300})
        answer = client.collect(request_id).terminal.body["value"]
    finally:
        client.close()
    assert answer.startswith("timed out after "), answer
    assert 0.2 <= float(answer.split()[-1]) < 0.3 + MARGIN_S, answer
    assert [r.result(timeout_s=30) for r in backlog] == [f"b{i}" for i in range(6)]
    flush(slow)
    assert "inner1" not in ran(log) and "inner2" not in ran(log)


def test_an_earlier_deadline_overtakes_with_order_by_deadline(cluster, tmp_path):
    log = tmp_path / "ran.txt"
    handle = serve.run(Slow.options(order_by_deadline=True).bind(str(log), 0.05))
    running = handle.work.remote("hold0")
    wait_for(lambda: "hold0" in ran(log), timeout=30, interval=0.02)
    # Published in this order while hold0 runs: none, far deadlines, then a nearer one.
    calls = [handle.work.remote(f"none{i}") for i in range(3)]
    far = handle.options(relative_slo_ms=60_000)
    calls += [far.work.remote(f"far{i}") for i in range(3)]
    calls.append(handle.options(relative_slo_ms=8_000).work.remote("near"))
    assert [c.result(timeout_s=30) for c in [running, *calls]] == \
        ["hold0", "none0", "none1", "none2", "far0", "far1", "far2", "near"]
    # The nearer deadline first, then the far ones in order, then those without.
    assert ran(log) == ["hold0", "near", "far0", "far1", "far2", "none0", "none1", "none2"]
    # An HTTP request's SLO header orders it the same way.
    running = handle.work.remote("hold1")
    wait_for(lambda: "hold1" in ran(log), timeout=30, interval=0.02)
    later = [handle.work.remote(f"late{i}") for i in range(2)]
    with ThreadPoolExecutor(1) as pool:
        http = pool.submit(requests.get, f"{cluster.url}/?tag=web", timeout=30,
                           headers={"X-Serve-Relative-Slo-Ms": "8000"})
        wait_for(lambda: queue_depth(f"bs.{cluster.name}.default.Slow") == 3, timeout=10,
                 interval=0.02)
        assert http.result().text == "web"
    assert [c.result(timeout_s=30) for c in [running, *later]] == ["hold1", "late0", "late1"]
    assert ran(log)[-4:] == ["hold1", "web", "late0", "late1"]


def test_order_by_deadline_applies_to_an_existing_deployment(cluster, tmp_path):
    log = tmp_path / "ran.txt"
    handle = serve.run(Slow.bind(str(log), 0.05))
    assert handle.work.remote("before").result(timeout_s=30) == "before"
    handle = serve.run(Slow.options(order_by_deadline=True).bind(str(log), 0.05))
    running = handle.work.remote("hold0")
    wait_for(lambda: "hold0" in ran(log), timeout=30, interval=0.02)
    plain = handle.work.remote("plain")
    near = handle.options(relative_slo_ms=8_000).work.remote("near")
    assert [c.result(timeout_s=30) for c in (running, plain, near)] == \
        ["hold0", "plain", "near"]
    assert ran(log) == ["before", "hold0", "near", "plain"]


@pytest.mark.parametrize("ordered", [False, True], ids=["fifo", "order_by_deadline"])
def test_concurrent_callers_with_mixed_deadlines_run_at_most_once(cluster, tmp_path, ordered):
    log = tmp_path / "ran.txt"
    handle = serve.run(Slow.options(max_ongoing_requests=2, order_by_deadline=ordered)
                       .bind(str(log), 0.1))
    slos = [None, 50, 400, 3_000]

    def caller(index: int) -> tuple[str, float | None, str, float]:
        tag, slo = f"c{index}", slos[index % len(slos)]
        started = time.monotonic()
        if index % 2:
            headers = {"X-Serve-Relative-Slo-Ms": str(slo)} if slo is not None else {}
            response = requests.get(f"{cluster.url}/?tag={tag}", headers=headers, timeout=60)
            outcome = {200: "ok", 408: "timeout"}.get(response.status_code,
                                                      f"HTTP {response.status_code}")
            if outcome == "ok" and response.text != tag:
                outcome = f"wrong answer {response.text!r}"
        else:
            called = handle.options(relative_slo_ms=slo) if slo is not None else handle
            try:
                result = called.work.remote(tag).result(timeout_s=60)
                outcome = "ok" if result == tag else f"wrong answer {result!r}"
            except RequestTimeoutError:
                outcome = "timeout"
            except Exception as exc:  # noqa: BLE001 - any other error fails the test below
                outcome = repr(exc)
        return tag, slo, outcome, time.monotonic() - started

    with ThreadPoolExecutor(32) as pool:
        outcomes = list(pool.map(caller, range(32)))
    flush(handle)
    counts = Counter(ran(log))
    for tag, slo, outcome, elapsed in outcomes:
        assert outcome in ("ok", "timeout"), (tag, outcome)
        assert counts[tag] <= 1, (tag, counts[tag])
        if outcome == "ok":
            assert counts[tag] == 1, tag
        else:
            assert slo is not None, (tag, "timed out without a deadline")
            assert elapsed < slo / 1000 + MARGIN_S, (tag, slo, elapsed)
    # The mix did both: some requests with a deadline were served, some refused.
    assert {outcome for _, slo, outcome, _ in outcomes if slo} == {"ok", "timeout"}, outcomes
    assert set(counts) <= {tag for tag, *_ in outcomes} | {"sentinel"}
    assert dead_letters(cluster) == 0


# Without services: the rules themselves. -------------------------------------------------------

def test_priority_rises_as_the_deadline_nears():
    remaining = [50, 100, 101, 500, 1_999, 2_000, 9_000, 10_001, 3_600_000]
    levels = [deadlines.priority(ms) for ms in remaining]
    assert levels == [5, 5, 4, 4, 3, 3, 2, 1, 1]
    assert max(levels) == deadlines.PRIORITY_LEVELS
    # Only under order_by_deadline (protocol/priorities.py), and an explicit priority wins.
    assert priorities.of_request(None, True, 50) == 5
    assert priorities.of_request(None, False, 50) == 0
    assert priorities.of_request(0, True, 50) == 0
    assert priorities.of_request(7, False, None) == 7
    assert priorities.queue_arguments(quorum=False) == {"x-max-priority": priorities.MAX_PRIORITY}
    assert priorities.queue_arguments(quorum=True) == {}
    # Expiry comes a grace period after the deadline, so live replicas skip, not dead-letter.
    assert deadlines.expiration(50) == str(50 + deadlines.EXPIRY_GRACE_MS)
    assert deadlines.expiration(-5) == str(deadlines.EXPIRY_GRACE_MS)


def test_slo_options_are_checked():
    handle = DeploymentHandle("D", "app")
    assert handle.options(relative_slo_ms=50).relative_slo_ms == 50.0
    assert handle.options(absolute_slo_ms="1700000000000").absolute_slo_ms == 1.7e12
    for bad in (-1, "soon", math.nan, math.inf):
        with pytest.raises(ValueError, match="relative_slo_ms"):
            handle.options(relative_slo_ms=bad)
    with pytest.raises(ValueError, match="not both"):
        handle.options(relative_slo_ms=1, absolute_slo_ms=2)
    # One SLO given replaces the other kind; a method or other option keeps the SLO.
    switched = handle.options(relative_slo_ms=50).options(absolute_slo_ms=7)
    assert (switched.relative_slo_ms, switched.absolute_slo_ms) == (None, 7.0)
    kept = handle.options(relative_slo_ms=50).work.options(stream=True)
    assert (kept.method_name, kept.stream, kept.relative_slo_ms) == ("work", True, 50.0)
    # A handle passed in a call keeps its SLO.
    copied = pickle.loads(pickle.dumps(handle.options(absolute_slo_ms=9)))
    assert (copied.absolute_slo_ms, copied.relative_slo_ms) == (9.0, None)


def test_http_deadline_is_the_earlier_of_timeout_and_headers():
    now = 1_700_000_000_000
    assert deadlines.of_http_request(None, None, None, now) is None
    assert deadlines.of_http_request(None, None, 2.5, now) == now + 2_500
    assert deadlines.of_http_request(b"50", None, 2.5, now) == now + 50
    assert deadlines.of_http_request(b"9000", None, 2.5, now) == now + 2_500
    assert deadlines.of_http_request(None, b"1700000000700", None, now) == now + 700
    for relative, absolute in ((b"", None), (b"x", None), (None, b"-1"), (b"1", b"1")):
        with pytest.raises(ValueError, match="Slo-Ms"):
            deadlines.of_http_request(relative, absolute, None, now)


def test_publish_frame_with_a_priority_matches_pamqp():
    properties = dict(message_type="call", correlation_id="c-1", message_id="c-1",
                      reply_to="r", headers={"bs-version": 1, "bs-deadline": 1_795_000_000_123},
                      content_type="application/msgpack", expiration="60050")
    ours = frames.publish(5, "bs.c.app.D", b"body", mandatory=True, priority=4, **properties)
    assert ours == reference(5, "bs.c.app.D", b"body", True, priority=4, **properties)
    assert spec.Basic.Properties(priority=4).priority == 4
