"""The benchmark harness's smoke pass: every measurement runs briefly and answers correctly,
and every figure carries its error counts, all zero.

No timing is asserted: this checks that `python -m bench --smoke` works end to end (its own
cluster namespace, every deployment, wrk, the raw clients, the error accounting, the JSON and
the cleanup). The other tests check the parsing and counting that the accounting rests on.
"""

from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
import redis

from bench.errors import CLUSTER_KINDS, WRK_KINDS, ClusterProbe, Errors
from bench.grpc_noop import GRPC_KINDS, METHOD, compile_proto, run_load
from bench.wrk import parse_wrk

from .conftest import AMQP_URL, REDIS_URL, ROOT, free_port

WRK_ROWS = [
    "ceiling_rps_c32", "ceiling_latency_c1_p50", "ceiling_latency_c1_p99",
    "noop_rps_c32", "noop_latency_c1_p50", "noop_latency_c1_p99",
    "noop_sync_rps_c32", "noop_sync_latency_c1_p50", "noop_sync_latency_c1_p99",
    "durable_noop_rps_c32", "durable_noop_latency_c1_p50", "durable_noop_latency_c1_p99",
    "durable_to_default_rps_c32", "durable_to_default_latency_c1_p50",
    "scale_out_rps_1_replica", "scale_out_rps_2_replicas", "scale_out_ratio",
]
# Measured by the gRPC load generator (bench/grpc_load.py), and the gRPC ÷ HTTP ratios.
GRPC_ROWS = [
    "grpc_noop_rps_c32", "grpc_noop_latency_c1_p50", "grpc_noop_latency_c1_p99",
    "grpc_to_http_rps_c32", "grpc_to_http_latency_c1_p50",
]
EXPECTED_ROWS = [
    *WRK_ROWS,
    *GRPC_ROWS,
    "stream_ttfc", "stream_chunks_per_s", "stream_paced_chunks_per_s",
    "handle_call_p50", "handle_call_p90", "handle_call_p99",
    "handle_chain_p50", "handle_chain_p90", "handle_chain_p99",
    "body_1mib", "body_10mib",
    "jobs_noop", "jobs_to_http_rps",
    "proxy_rss_1000_streams", "replica_rss_at_rest",
]
TOTALS = ["errors", "non_2xx", "non_ok", "socket_errors", "unanswered", "failed", "redeliveries",
          "channel_closes", "broker_log", "channels_lost", "dead_letters"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None,
                    reason="wrk is not installed (install it with `apt-get install -y wrk`)")
@pytest.mark.skipif(os.environ.get("BROKER_SERVE_TEST_RABBITMQ_LOG") == "off",
                    reason="without RabbitMQ's log the benchmark cannot count channel closes, "
                           "so none of its figures is a result")
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # Its own environment: the harness picks its own cluster namespace and ports.
    env = {k: v for k, v in os.environ.items()
           if k not in ("BROKER_SERVE_CLUSTER", "BROKER_SERVE_HTTP_PORT",
                        "BROKER_SERVE_METRICS_PORT")}
    done = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
                          check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr[-6000:]}"
    report = json.loads(out.read_text())
    assert report["smoke"] is True
    assert report["errors"] == {}
    results = report["results"]
    for name in EXPECTED_ROWS:
        assert name in results, f"{name} missing from {sorted(results)}"
        value = results[name]["value"]
        assert isinstance(value, (int, float)) and math.isfinite(value), (name, value)
    for name in ("noop_rps_c32", "noop_latency_c1_p50", "noop_sync_rps_c32",
                 "noop_sync_latency_c1_p50", "noop_sync_latency_c1_p99",
                 "grpc_noop_rps_c32", "grpc_noop_latency_c1_p50"):
        assert results[name]["ratio_to_ceiling"] is not None
    # The gRPC rows were measured by real calls, and their ratios are to this run's HTTP rows.
    assert results["grpc_noop_rps_c32"]["details"]["calls"] > 0
    assert results["grpc_noop_rps_c32"]["details"]["concurrency"] == 32
    assert results["grpc_noop_latency_c1_p50"]["details"]["concurrency"] == 1
    for ratio_row, grpc_row, http_row in (
            ("grpc_to_http_rps_c32", "grpc_noop_rps_c32", "noop_rps_c32"),
            ("grpc_to_http_latency_c1_p50", "grpc_noop_latency_c1_p50", "noop_latency_c1_p50"),
            ("durable_to_default_rps_c32", "durable_noop_rps_c32", "noop_rps_c32"),
            ("durable_to_default_latency_c1_p50", "durable_noop_latency_c1_p50",
             "noop_latency_c1_p50")):
        expected = results[grpc_row]["value"] / results[http_row]["value"]
        assert results[ratio_row]["value"] == pytest.approx(expected), ratio_row
    # Every job was submitted (202) and its result read (200), and its ratio is to noop.
    jobs = results["jobs_noop"]["details"]
    assert jobs["finished"] == jobs["submitted"] == jobs["jobs"] > 0, jobs
    assert jobs["non_202_submits"] == jobs["non_200_results"] == 0, jobs
    assert results["jobs_to_http_rps"]["value"] == pytest.approx(
        results["jobs_noop"]["value"] / results["noop_rps_c32"]["value"])
    # Every figure carries its error counts, every count was read, and all are zero.
    for name, row in results.items():
        counted = set(row["errors"])
        if name in WRK_ROWS:
            assert set(WRK_KINDS) <= counted, (name, row["errors"])
        elif name in GRPC_ROWS:
            assert set(GRPC_KINDS) | {"unanswered"} <= counted, (name, row["errors"])
        else:
            assert "failed" in counted, (name, row["errors"])
        if not name.startswith("ceiling"):
            assert set(CLUSTER_KINDS) <= counted, (name, row["errors"])
        assert row["errors"] == dict.fromkeys(counted, 0), (name, row["errors"])
        assert row["errors_unknown"] == {}, (name, row["errors_unknown"])
        assert row["valid"] is True, name
    totals = report["totals"]
    assert {key: totals[key] for key in TOTALS} == dict.fromkeys(TOTALS, 0), totals
    assert totals["not_counted"] == {} and totals["results"] == len(results)
    assert report["valid"] is True
    assert f"{len(results)} of {len(results)} figures are results" in done.stdout
    assert "totals: errors 0" in done.stdout
    # The table is printed once, with every row.
    assert done.stdout.count("measurement") == 1
    for name in EXPECTED_ROWS:
        assert name in done.stdout
    # The harness cleaned up its namespace.
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert list(client.scan_iter(match=f"bs:{report['cluster']}:*")) == []
    finally:
        client.close()


WRK_WITH_ERRORS = """\
Running 5s test @ http://127.0.0.1:18777/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    50.22us   62.08us   0.87ms   97.83%
    Req/Sec     1.01k     1.06k    1.99k   100.00%
  Latency Distribution
     50%   40.00us
     99%    1.45ms
  796 requests in 5.02s, 35.49KB read
  Socket errors: connect 1, read 2, write 3, timeout 5
  Non-2xx or 3xx responses: 265
Requests/sec:    158.68
Transfer/sec:      7.08KB
"""


def test_wrk_errors_are_parsed_by_kind() -> None:
    result = parse_wrk(WRK_WITH_ERRORS)
    assert result.error_counts() == {"non_2xx": 265, "connect": 1, "read": 2, "write": 3,
                                     "timeout": 5}
    assert (result.requests, result.rps, result.latency_ms) == (796, 158.68,
                                                                {"50": 0.04, "99": 1.45})
    assert Errors(result.error_counts()).summary() == (
        "non-2xx 265, connect 1, read 2, write 3, timeout 5")
    # wrk prints neither line when there was no such error.
    clean = "\n".join(line for line in WRK_WITH_ERRORS.splitlines()
                      if "errors" not in line and "Non-2xx" not in line)
    assert parse_wrk(clean).error_counts() == dict.fromkeys(WRK_KINDS, 0)


def test_a_figure_is_a_result_only_with_every_count_zero_and_read() -> None:
    assert Errors(dict.fromkeys(WRK_KINDS, 0)).valid
    assert Errors().summary() == "0"
    both = Errors({"timeout": 5}) + Errors({"redelivered": 12, "timeout": 1})
    assert not both.valid and both.summary() == "timeout 6, redelivered 12"
    unread = Errors({"redelivered": 0}, unknown={"broker_log": "no file"})
    assert not unread.valid and unread.summary() == "broker log ?"


def test_broker_log_errors_count_for_this_cluster_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "rabbit.log"
    log.write_text("")
    monkeypatch.setenv("BROKER_SERVE_TEST_RABBITMQ_LOG", str(log))
    probe = ClusterProbe("benchcafe", 1, AMQP_URL)
    stamp = "2026-12-01 10:35:35.382450+00:00"
    peer = "127.0.0.1:1 -> 127.0.0.1:5672"
    lines = []
    for pid, name in (("0.1.0", "broker-serve benchcafe replica a#Noop#x"),
                      ("0.2.0", "broker-serve tother replica a#Noop#y")):
        channel = f"0.9.{pid[2]}"
        lines += [
            f"{stamp} [info] <{pid}> connection <{pid}> ({peer}) has a client-provided name: "
            + name,
            f"{stamp} [error] <{channel}> Channel error on connection <{pid}> ({peer}, vhost: "
            + "'/', user: 'guest'), channel 6:",
            f"{stamp} [error] <{channel}> operation basic.ack caused a channel exception "
            + "precondition_failed: unknown delivery tag 7",
        ]
    log.write_text("\n".join(lines) + "\n")
    errors = probe.logged()
    assert errors.counts == {"broker_log": 1} and "benchcafe" in errors.examples[0]
    assert probe.others == 1  # another run's error: seen, not counted
    assert probe.logged().counts == {"broker_log": 0}
    monkeypatch.setenv("BROKER_SERVE_TEST_RABBITMQ_LOG", str(tmp_path / "missing.log"))
    assert "broker_log" in ClusterProbe("benchcafe", 1, AMQP_URL).logged().unknown


def test_grpc_load_generator_counts_non_ok_statuses_and_wrong_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/grpc_load.py, in its own process, against a real grpcio server that answers
    some calls with RESOURCE_EXHAUSTED and some with a wrong message."""
    grpc = pytest.importorskip("grpc")
    proto_dir = compile_proto(tmp_path / "protos")
    monkeypatch.syspath_prepend(str(proto_dir))
    pb2 = importlib.import_module("bench_noop_pb2")
    calls = itertools.count(1)

    def answer(request: Any, context: Any) -> Any:
        n = next(calls)
        if n % 3 == 0:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        return pb2.Pong(message="nope" if n % 5 == 0 else "ok")

    handler = grpc.method_handlers_generic_handler("benchnoop.NoopService", {
        "__call__": grpc.unary_unary_rpc_method_handler(
            answer, request_deserializer=pb2.Ping.FromString,
            response_serializer=pb2.Pong.SerializeToString)})
    assert METHOD == "/benchnoop.NoopService/__call__"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = free_port()
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    server.start()
    try:
        load = run_load(f"127.0.0.1:{port}", "app", proto_dir, concurrency=4, duration_s=0.5,
                        warmup_s=0.2)
    finally:
        server.stop(None)
        sys.modules.pop("bench_noop_pb2", None)
    assert load.calls > 0 and load.rps > 0
    assert load.counts["non_ok"] > 0 and load.counts["failed"] > 0, load.counts
    assert load.codes == {"RESOURCE_EXHAUSTED": load.counts["non_ok"]}
    assert load.counts["timeout"] == 0
    assert not load.errors().valid
    assert "RESOURCE_EXHAUSTED: queue full" in load.examples
    assert load.raw["concurrency"] == 4 and load.cpu_s >= 0
