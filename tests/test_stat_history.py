"""`serve.stat()` and `broker-serve stats` over the metrics history the cluster keeps in Redis.

Real traffic through the proxy to real replicas; each proxy and replica writes its history
every half second here (BROKER_SERVE_HISTORY_INTERVAL_S), and the counts must come out exact.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest
import redis
import requests
from starlette.requests import Request

from broker_serve import serve
from broker_serve.client.stats import set_history_window

from .conftest import REDIS_URL
from .waiting import wait_for

FAST, SLOW = 54, 6
SLOW_S = 0.3  # in the (250 ms, 500 ms] bucket


@serve.deployment(max_ongoing_requests=32)
class Timed:
    async def __call__(self, request: Request) -> str:
        if "slow" in request.query_params:
            await asyncio.sleep(SLOW_S)
        return "ok"


@pytest.fixture
def history(cluster, monkeypatch):
    """The cluster, its proxy and replicas writing their history every 0.5 s."""
    monkeypatch.setenv("BROKER_SERVE_HISTORY_INTERVAL_S", "0.5")
    cluster.env["BROKER_SERVE_HISTORY_INTERVAL_S"] = "0.5"
    serve.run(Timed.bind(), name="timed", route_prefix="/timed")
    return cluster


def send(url: str, fast: int = FAST, slow: int = SLOW) -> None:
    with requests.Session() as session:
        for i in range(fast + slow):
            answer = session.get(f"{url}/timed", params={"slow": 1} if i < slow else {},
                                 timeout=30)
            assert (answer.status_code, answer.text) == (200, "ok")


def counts(stats: dict[str, Any], window: float) -> tuple[int, int]:
    """The endpoint's and the backend's request counts in `window`."""
    endpoint = stats["endpoints"].get("/timed", {}).get(window, {"count": 0})
    backend = stats["backends"].get("timed", {}).get("Timed", {}).get(window, {"count": 0})
    return endpoint["count"], backend["count"]


def stat_once_counted(total: int, windows: list[float]) -> dict[str, Any]:
    """serve.stat once the endpoint and the backend have counted `total` in the longest
    window (or more, which the caller's assertions catch)."""
    def counted() -> dict[str, Any] | None:
        stats = serve.stat(agg_windows_seconds=windows)
        done = min(counts(stats, max(windows))) >= total
        return stats if done else None

    return wait_for(counted, timeout=30, interval=0.2)


def test_stat_counts_every_request_in_each_window_and_shows_the_slow_ones(history):
    send(history.url)
    stats = stat_once_counted(FAST + SLOW, [10, 60])
    assert stats["history_window_s"] == 3600
    assert 0 < stats["recorded_s"] < 60
    for window in (10, 60):  # both cover every request, sent within the last few seconds
        assert counts(stats, window) == (FAST + SLOW, FAST + SLOW), stats
        for entry in (stats["endpoints"]["/timed"][window],
                      stats["backends"]["timed"]["Timed"][window]):
            latency = entry["latency_ms"]
            assert set(latency) == {50, 90, 95}
            # 90% are fast; the slow 10% fill the (250, 500] ms bucket, where p95 falls.
            assert latency[50] < 100, entry
            assert latency[50] <= latency[90] <= latency[95]
            assert 250 <= latency[95] <= 500, entry
    p99 = serve.stat(percentiles=[99.5], agg_windows_seconds=[60])
    assert 250 <= p99["endpoints"]["/timed"][60]["latency_ms"][99.5] <= 500


def test_another_process_sees_the_whole_history_at_once(history):
    send(history.url)
    mine = stat_once_counted(FAST + SLOW, [10, 60])

    # A fresh driver: it has written nothing and waited for nothing, yet sees every window.
    script = ("import json\nfrom broker_serve import serve\n"
              "print(json.dumps(serve.stat(agg_windows_seconds=[10, 60])))\n")
    done = history.run_script(script, timeout=60)
    assert done.returncode == 0, done.stderr
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    for window in ("10", "60"):
        assert theirs["endpoints"]["/timed"][window]["count"] == FAST + SLOW
        assert theirs["backends"]["timed"]["Timed"][window]["count"] == FAST + SLOW
        assert theirs["endpoints"]["/timed"][window]["latency_ms"]["95"] == pytest.approx(
            mine["endpoints"]["/timed"][int(window)]["latency_ms"][95])

    # The command prints the same counts in its first table.
    cli = subprocess.run([sys.executable, "-m", "broker_serve", "stats", "--count", "1",
                          "--windows", "10,60"], env=history.env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert cli.returncode == 0, cli.stderr
    rows = [line.split() for line in cli.stdout.splitlines() if line.startswith("timed ")]
    by_table = {(row[1], row[2].rstrip("*")): row for row in rows}
    for key in (("Timed", "10s"), ("Timed", "60s"), ("/timed", "10s"), ("/timed", "60s")):
        assert by_table[key][3] == str(FAST + SLOW), cli.stdout
    assert 250 <= float(by_table[("/timed", "60s")][7]) <= 500, cli.stdout  # p95
    assert "60s*" in cli.stdout  # the history is younger than a minute, and says so

    # With --url it samples that endpoint itself, as before there was a history.
    scraped = subprocess.run([sys.executable, "-m", "broker_serve", "stats", "--url",
                              f"{history.url}/-/metrics", "--interval", "0.5", "--count", "1",
                              "--windows", "10"], env=history.env, capture_output=True,
                             text=True, timeout=60, check=False)
    assert scraped.returncode == 0, scraped.stderr
    assert "the command has run for less than that window" in scraped.stdout
    assert any(line.split()[:3] == ["timed", "/timed", "10s*"]
               for line in scraped.stdout.splitlines()), scraped.stdout


def test_thirty_two_concurrent_clients_are_counted_exactly(history):
    clients, each = 32, 10

    def client(_: int) -> None:
        send(history.url, fast=each, slow=0)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    stats = stat_once_counted(clients * each, [60])
    assert counts(stats, 60) == (clients * each, clients * each)
    # The replicas' last writes, at their graceful stop, add nothing counted already.
    serve.delete("timed")
    assert counts(serve.stat(agg_windows_seconds=[60]), 60) == (clients * each, clients * each)


def test_the_history_is_trimmed_to_its_window(history):
    client = redis.Redis.from_url(REDIS_URL)
    stream = f"bs:{history.name}:history"
    try:
        send(history.url, fast=10, slow=0)
        stat_once_counted(10, [60])
        set_history_window(3)
        with pytest.raises(ValueError, match="longer than the history window of 3 s"):
            serve.stat(agg_windows_seconds=[10])
        # Older entries leave the window, and new ones are still counted.
        wait_for(lambda: counts(serve.stat(agg_windows_seconds=[3]), 3) == (0, 0),
                 timeout=15, interval=0.2)
        send(history.url, fast=4, slow=0)
        stat_once_counted(4, [3])
        # Trimmed in Redis, not only left out when read: the first ten's entries are gone.
        entries = [orjson.loads(fields[b"d"]) for _, fields in client.xrange(stream)]
        for table in ("endpoints", "backends"):
            assert sum(sum(row[2]) for entry in entries for row in entry.get(table, ())) == 4
        assert 0 < client.pttl(stream) <= 63_000  # an abandoned history expires too
    finally:
        client.close()


def test_bad_windows_and_percentiles_are_refused_clearly(cluster):
    with pytest.raises(ValueError, match="longer than the history window of 3600 s"):
        serve.stat(agg_windows_seconds=[10, 7200])
    with pytest.raises(ValueError, match="between 0 and 100"):
        serve.stat(percentiles=[50, 101])
    with pytest.raises(ValueError, match="must be positive"):
        serve.stat(agg_windows_seconds=[0, 10])
    with pytest.raises(ValueError, match="must not be empty"):
        serve.stat(agg_windows_seconds=[])
    with pytest.raises(TypeError, match="list of numbers"):
        serve.stat(agg_windows_seconds="60")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be positive"):
        set_history_window(0)
    cli = subprocess.run([sys.executable, "-m", "broker_serve", "stats", "--count", "1",
                          "--windows", "10,7200"], env=cluster.env, capture_output=True,
                         text=True, timeout=60, check=False)
    assert cli.returncode != 0 and "longer than the history window" in cli.stderr, cli.stderr


def test_a_traffic_split_counts_under_its_endpoint_and_each_backend(history):
    """An endpoint is the traffic record's name; each application behind it is a backend."""
    serve.run(Timed.bind(), name="blue", route_prefix=None)
    serve.run(Timed.bind(), name="green", route_prefix=None)
    serve.set_traffic("/canary", {"blue": 0.5, "green": 0.5}, name="canary")
    with requests.Session() as session:
        for _ in range(40):
            assert session.get(f"{history.url}/canary", timeout=30).text == "ok"

    def counted() -> dict[str, Any] | None:
        stats = serve.stat(agg_windows_seconds=[60])
        backends = [stats["backends"].get(app, {}).get("Timed", {}).get(60, {"count": 0})
                    ["count"] for app in ("blue", "green")]
        endpoint = stats["endpoints"].get("canary", {}).get(60, {"count": 0})["count"]
        return stats if endpoint >= 40 and sum(backends) >= 40 else None

    stats = wait_for(counted, timeout=30, interval=0.2)
    assert stats["endpoints"]["canary"][60]["count"] == 40
    blue, green = (stats["backends"][app]["Timed"][60]["count"] for app in ("blue", "green"))
    assert blue + green == 40 and blue > 0 and green > 0, (blue, green)
    assert "/canary" not in stats["endpoints"]  # named by the record, not by its prefix
