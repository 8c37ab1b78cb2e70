"""The benchmark harness: `python -m bench [--smoke] [--only A,B] [--duration S] [--json PATH]`.

It makes its own cluster namespace (`bench<hex>`) and proxy port, starts a local broker-serve
cluster through `serve.start()` (controller, proxy and worker as child processes whose logs go
to a file), deploys each benchmark app under its own name and route prefix, measures, and cleans
everything up: `serve.shutdown()`, then the namespace's Redis keys and RabbitMQ queues.

Each figure carries the errors its measurement saw (bench/errors.py); a figure with any is not a
result, and the harness then exits non-zero. Every request goes to 127.0.0.1; every loop is
bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from . import client
from .cleanup import amqp_url
from .errors import CLUSTER_KINDS, ClusterProbe, Errors, Snapshot, Tally
from .grpc_noop import SERVICER_FUNCTIONS, GrpcLoad, GrpcUnavailable, compile_proto, run_load
from .report import (
    TARGETS,
    Row,
    evaluate,
    fmt,
    ratio,
    table,
    targets_text,
    totals_json,
    totals_text,
)
from .wrk import WrkMissing, WrkResult, run_wrk, wrk_path

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024

# Run order. The slow-stream measurement goes last: its streams outlive their clients.
MEASUREMENTS = [
    "ceiling",
    "replica_rss_at_rest",
    "noop_rps_c32",
    "noop_sync_rps_c32",
    "noop_latency_c1",
    "noop_sync_latency_c1",
    "jobs_noop",
    "durable_noop_rps_c32",
    "durable_noop_latency_c1",
    "grpc_noop_rps_c32",
    "grpc_noop_latency_c1",
    "handle_call",
    "body_1mib",
    "body_10mib",
    "stream",
    "scale_out",
    "proxy_rss_1000_streams",
]
NEEDS_WRK = {"ceiling", "noop_rps_c32", "noop_sync_rps_c32", "noop_latency_c1",
             "noop_sync_latency_c1", "durable_noop_rps_c32", "durable_noop_latency_c1",
             "scale_out"}
# These need the cluster to serve gRPC, with the no-op's generated modules on its PYTHONPATH.
NEEDS_GRPC = {"grpc_noop_rps_c32", "grpc_noop_latency_c1"}


class BenchError(Exception):
    """A measurement could not be taken or its answers were wrong."""


@dataclass(frozen=True)
class Plan:
    """How much of everything to do: the full run, or the brief smoke run."""

    smoke: bool
    duration_s: float
    warmup_s: float
    stream_chunks: int
    stream_repeats: int
    handle_calls: int
    jobs: int
    body_requests: int
    streams: int
    slow_seconds: int

    @classmethod
    def make(cls, smoke: bool, duration_s: float) -> Plan:
        if smoke:
            return cls(True, 1.0, 0.0, 1000, 2, 200, 200, 3, 50, 3)
        return cls(False, duration_s, 2.0, 10_000, 5, 2000, 4000, 20, 1000, 20)


class Bench:
    def __init__(self, plan: Plan, cluster: str, port: int, log_path: Path,
                 probe: ClusterProbe, grpc_port: int | None = None,
                 proto_dir: Path | None = None) -> None:
        self.plan = plan
        self.cluster = cluster
        self.port = port
        self.grpc_port = grpc_port  # None: this run's cluster serves no gRPC
        self.proto_dir = proto_dir
        self.log_path = log_path
        self.probe = probe
        self.rows: dict[str, Row] = {}
        self.errors: dict[str, str] = {}
        self.warnings: list[str] = []
        self.counted: dict[str, Errors] = {}  # measurement -> every error it saw
        self._measuring = ""
        self.handles: dict[str, Any] = {}
        self.queues: set[str] = set()
        self._serve: Any = None
        self._redis: Any = None
        self._spin_iterations: int | None = None

    # output -----------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        print(f"[bench] {text}", file=sys.stderr, flush=True)

    def add(self, row: Row) -> None:
        row.measurement = self._measuring
        self.rows[row.name] = row
        self.say(f"{row.name} = {fmt(row.value)} {row.unit} (errors: {row.errors.summary()})")

    def seen(self, errors: Errors) -> Errors:
        """Count `errors` in the running measurement's total; returns them for its rows."""
        self.counted[self._measuring] = self.counted.get(self._measuring, Errors()) + errors
        for example in errors.examples:
            self.say(f"   error: {example}")
        return errors

    def problem(self, measurement: str, text: str) -> None:
        """Record a failure: the harness exits non-zero."""
        previous = self.errors.get(measurement)
        self.errors[measurement] = f"{previous}; {text}" if previous else text
        self.say(f"ERROR in {measurement}: {text}")

    # cluster ----------------------------------------------------------------------------------
    @property
    def serve(self) -> Any:
        self._ensure_cluster()
        return self._serve

    def _ensure_cluster(self) -> None:
        if self._serve is None:
            self._start_cluster()

    def _start_cluster(self) -> None:
        from broker_serve import serve

        self.say(f"starting a local cluster {self.cluster!r} (proxy on 127.0.0.1:{self.port}, "
                 f"logs in {self.log_path})")
        # The controller, proxy and worker (and the replicas it starts) inherit stderr: point it
        # at the log file while they are spawned, so that their logs stay out of the report.
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        saved = os.dup(2)
        sys.stderr.flush()
        os.dup2(log_fd, 2)
        grpc_options = None
        if self.grpc_port is not None:
            grpc_options = {"port": self.grpc_port, "grpc_servicer_functions": SERVICER_FUNCTIONS}
        try:
            serve.start(grpc_options=grpc_options)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(log_fd)
        self._serve = serve

    @property
    def redis(self) -> Any:
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(
                os.environ.get("BROKER_SERVE_REDIS_URL", "redis://localhost:6379/0")
            )
        return self._redis

    def records(self, kind: str) -> list[dict[str, Any]]:
        raw = self.redis.hgetall(f"bs:{self.cluster}:{kind}")
        return [json.loads(value) for value in raw.values()]

    def deploy(self, name: str, app: Any, route_prefix: str | None) -> Any:
        started = time.monotonic()
        handle = self.serve.run(app, name=name, route_prefix=route_prefix)
        self.handles[name] = handle
        for dep in self._app_record(name).get("deployments", {}):
            self.queues.add(f"bs.{self.cluster}.{name}.{dep}")
        self.say(f"deployed {name!r} at {route_prefix} in {time.monotonic() - started:.1f}s")
        return handle

    def ensure(self, name: str) -> Any:
        """Deploy one of the fixed benchmark apps once."""
        if name in self.handles:
            return self.handles[name]
        from . import apps

        builders: dict[str, Callable[[], Any]] = {
            "noop": lambda: apps.Noop.bind(),
            "noop_sync": lambda: apps.NoopSync.bind(),
            "durable_noop": lambda: apps.Noop.options(queue_type="quorum").bind(),
            "grpc_noop": lambda: apps.GrpcNoop.bind(),
            "stream": lambda: apps.Stream.bind(),
            "handle": lambda: apps.Caller.bind(apps.Callee.bind()),
            "echo": lambda: apps.EchoLength.bind(),
            "slow": lambda: apps.SlowStream.bind(),
        }
        return self.deploy(name, builders[name](), f"/{name}")

    def _app_record(self, name: str) -> dict[str, Any]:
        raw = self.redis.hget(f"bs:{self.cluster}:apps", name)
        return json.loads(raw) if raw else {}

    def proxy_pid(self) -> int:
        proxies = self.records("proxies")
        if len(proxies) != 1:
            raise BenchError(f"expected one proxy in bs:{self.cluster}:proxies, found "
                             f"{len(proxies)}")
        return int(proxies[0]["pid"])

    def replica_pids(self, app: str) -> list[int]:
        return [int(r["pid"]) for r in self.records("replicas")
                if r.get("app") == app and r.get("state") == "RUNNING" and r.get("pid")]

    def wait_replicas_settled(self, app: str, deployment: str, count: int,
                              timeout_s: float = 90) -> list[int]:
        """Wait until `app` runs exactly `count` replicas of its current version and nothing
        else (a redeploy stops the old version's replicas after the new ones run)."""
        deadline = time.monotonic() + timeout_s
        seen: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            version = self._app_record(app)["deployments"][deployment]["version"]
            seen = [r for r in self.records("replicas")
                    if r.get("app") == app and r.get("state") not in ("DEAD", "FAILED")]
            current = [r for r in seen if r.get("version") == version
                       and r.get("state") == "RUNNING" and _alive(int(r.get("pid") or 0))]
            if len(current) == count and len(seen) == count:
                return [int(r["pid"]) for r in current]
            time.sleep(0.2)
        raise BenchError(f"{app}: expected {count} running replicas of the current version, "
                         f"saw {[(r.get('version'), r.get('state')) for r in seen]}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    # wrk --------------------------------------------------------------------------------------
    def warm(self, url: str, connections: int) -> Errors:
        """A warm-up run: its errors count too, being errors of the same measurement."""
        if self.plan.warmup_s <= 0:
            return Errors()
        result = run_wrk(url, threads=1, connections=connections,
                         duration_s=self.plan.warmup_s)
        return self.wrk_errors(url, result)

    def wrk_rps(self, url: str, connections: int) -> tuple[WrkResult, Errors]:
        warm = self.warm(url, connections)
        result = run_wrk(url, threads=1, connections=connections, duration_s=self.plan.duration_s)
        return result, warm + self.wrk_errors(url, result)

    def wrk_latency(self, url: str) -> tuple[WrkResult, Errors]:
        result = run_wrk(url, threads=1, connections=1, duration_s=self.plan.duration_s,
                         latency=True)
        return result, self.wrk_errors(url, result)

    def wrk_errors(self, url: str, result: WrkResult) -> Errors:
        errors = Errors(result.error_counts())
        if url.startswith(self.url("/")):  # through the proxy: also what it never answered
            errors += self.probe.unanswered(self.port)
        return self.seen(errors)

    # measurements -----------------------------------------------------------------------------
    def m_ceiling(self) -> None:
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", "bench.ceiling:app", "--host", "127.0.0.1",
                   "--port", str(port), "--loop", "uvloop", "--http", "httptools",
                   "--no-access-log", "--log-level", "warning"]
        with open(self.log_path, "ab") as log, subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        ) as process:
            try:
                wait_http(port, "/", process, timeout_s=30)
                url = f"http://127.0.0.1:{port}/"
                rps, errors = self.wrk_rps(url, 32)
                self.add(Row("ceiling_rps_c32", rps.rps, "req/s", errors=errors,
                             details={**rps.details(), "server": " ".join(command[1:])}))
                latency, errors = self.wrk_latency(url)
                self.add(Row("ceiling_latency_c1_p50", latency.latency_ms["50"], "ms",
                             errors=errors, details=latency.details()))
                self.add(Row("ceiling_latency_c1_p99", latency.latency_ms["99"], "ms",
                             errors=errors))
            finally:
                process.terminate()
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    def m_noop_rps_c32(self) -> None:
        self._proxy_rps("noop", "noop_rps_c32")

    def m_noop_sync_rps_c32(self) -> None:
        self._proxy_rps("noop_sync", "noop_sync_rps_c32")

    def m_noop_latency_c1(self) -> None:
        self._proxy_latency("noop", "noop_latency_c1", warmed_by="noop_rps_c32")

    def m_noop_sync_latency_c1(self) -> None:
        self._proxy_latency("noop_sync", "noop_sync_latency_c1", warmed_by="noop_sync_rps_c32")

    def m_durable_noop_rps_c32(self) -> None:
        self._proxy_rps("durable_noop", "durable_noop_rps_c32")
        self._versus("durable_to_default_rps_c32", "durable_noop_rps_c32", "noop_rps_c32")

    def m_durable_noop_latency_c1(self) -> None:
        self._proxy_latency("durable_noop", "durable_noop_latency_c1",
                            warmed_by="durable_noop_rps_c32")
        self._versus("durable_to_default_latency_c1_p50", "durable_noop_latency_c1_p50",
                     "noop_latency_c1_p50")

    def _proxy_rps(self, app: str, name: str) -> None:
        self.ensure(app)
        result, errors = self.wrk_rps(self.url(f"/{app}"), 32)
        self.add(Row(name, result.rps, "req/s", ratio_to="ceiling_rps_c32", errors=errors,
                     details=result.details()))

    def _proxy_latency(self, app: str, prefix: str, warmed_by: str) -> None:
        self.ensure(app)
        warm = Errors()
        if warmed_by not in self.rows:
            warm = self.warm(self.url(f"/{app}"), 1)
        result, errors = self.wrk_latency(self.url(f"/{app}"))
        errors = warm + errors
        self.add(Row(f"{prefix}_p50", result.latency_ms["50"], "ms",
                     ratio_to="ceiling_latency_c1_p50", errors=errors, details=result.details()))
        self.add(Row(f"{prefix}_p99", result.latency_ms["99"], "ms",
                     ratio_to="ceiling_latency_c1_p99", errors=errors))

    def m_jobs_noop(self) -> None:
        """N no-op jobs over HTTP (`Prefer: respond-async`) from 32 connections, then every
        result read: jobs/s = N / (first submit -> the last job's `finished_ms` in Redis)."""
        self.ensure("noop")
        n, concurrency = self.plan.jobs, 32
        tally = Tally()
        counts = {"non_202_submits": 0, "non_200_results": 0}
        ids: list[str] = []
        began: list[float] = []

        async def exchange(connection: client.Connection, path: str,
                           headers: dict[str, str] | None = None) -> tuple[int, bytes]:
            connection.send_request("GET", path, headers=headers)
            await connection.writer.drain()
            response = await connection.read_head()
            return response.status, await connection.read_body()

        async def worker(step: Callable[[client.Connection, int], Coroutine[Any, Any, None]],
                         todo: list[int]) -> None:
            connection = await client.Connection.open(self.port)
            try:
                while todo and not tally.exhausted:
                    index = todo.pop()
                    try:
                        await asyncio.wait_for(step(connection, index), 60)
                    except (OSError, TimeoutError, client.HttpError) as exc:
                        tally.fail(f"job {index}: {type(exc).__name__}: {exc}")
                        await connection.close()  # in an unknown state: start afresh
                        connection = await client.Connection.open(self.port)
            finally:
                await connection.close()

        async def submit(connection: client.Connection, index: int) -> None:
            if not began:
                began.append(time.time())
            status, body = await exchange(connection, "/noop", {"Prefer": "respond-async"})
            if status != 202:
                counts["non_202_submits"] += 1
                tally.fail(f"submit {index} answered {status} {body[:100]!r}")
                return
            ids.append(json.loads(body)["id"])

        async def result(connection: client.Connection, index: int) -> None:
            status, body = await exchange(connection, f"/-/jobs/{ids[index]}/result?wait_s=30")
            if status != 200 or body != b"ok":
                counts["non_200_results"] += 1
                tally.fail(f"result of {ids[index]} answered {status} {body[:100]!r}")

        async def run() -> None:
            submits = list(range(n))
            await asyncio.gather(*(worker(submit, submits) for _ in range(concurrency)))
            results = list(range(len(ids)))
            await asyncio.gather(*(worker(result, results) for _ in range(concurrency)))

        arun(asyncio.wait_for(run(), 600))
        pipeline = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipeline.hget(f"bs:{self.cluster}:job:{job_id}", "finished_ms")
        finished = [int(ms) / 1000 for ms in pipeline.execute() if ms is not None]
        if not finished or not began:
            raise BenchError(f"no job finished: {tally.examples}")
        elapsed = max(finished) - began[0]
        errors = self.seen(tally.errors() + self.probe.unanswered(self.port))
        self.add(Row("jobs_noop", len(finished) / elapsed, "jobs/s", errors=errors, details={
            "jobs": n, "submitted": len(ids), "finished": len(finished),
            "concurrency": concurrency, "seconds": elapsed, **counts}))
        self._versus("jobs_to_http_rps", "jobs_noop", "noop_rps_c32")

    def m_grpc_noop_rps_c32(self) -> None:
        load, errors = self._grpc_load(32, self.plan.warmup_s)
        self.add(Row("grpc_noop_rps_c32", load.rps, "req/s", ratio_to="ceiling_rps_c32",
                     errors=errors, details=load.details()))
        self._versus("grpc_to_http_rps_c32", "grpc_noop_rps_c32", "noop_rps_c32")

    def m_grpc_noop_latency_c1(self) -> None:
        warmup = 0.0 if "grpc_noop_rps_c32" in self.rows else self.plan.warmup_s
        load, errors = self._grpc_load(1, warmup)
        self.add(Row("grpc_noop_latency_c1_p50", load.latency_ms["50"], "ms",
                     ratio_to="ceiling_latency_c1_p50", errors=errors, details=load.details()))
        self.add(Row("grpc_noop_latency_c1_p99", load.latency_ms["99"], "ms",
                     ratio_to="ceiling_latency_c1_p99", errors=errors))
        self._versus("grpc_to_http_latency_c1_p50", "grpc_noop_latency_c1_p50",
                     "noop_latency_c1_p50")

    def _grpc_load(self, concurrency: int, warmup_s: float) -> tuple[GrpcLoad, Errors]:
        """The no-op through the proxy's gRPC port, from the load generator's own process."""
        if self.grpc_port is None or self.proto_dir is None:
            raise BenchError("this run's cluster serves no gRPC")
        self.ensure("grpc_noop")
        load = run_load(f"127.0.0.1:{self.grpc_port}", "grpc_noop", self.proto_dir,
                        concurrency=concurrency, duration_s=self.plan.duration_s,
                        warmup_s=warmup_s)
        if not load.calls:
            raise BenchError(f"no gRPC call answered OK: {load.examples}")
        return load, self.seen(load.errors() + self.probe.unanswered(self.port))

    def _versus(self, name: str, row: str, baseline: str) -> None:
        """One figure ÷ another of the same run (gRPC ÷ HTTP, durable ÷ default), with both
        figures' errors; nothing if the baseline did not run."""
        if baseline not in self.rows:
            return
        ours, base = self.rows[row], self.rows[baseline]
        self.add(Row(name, ours.value / base.value if base.value else 0.0, "x",
                     errors=ours.errors + base.errors,
                     details={row: ours.value, baseline: base.value, "unit": ours.unit}))

    def m_replica_rss_at_rest(self) -> None:
        self.ensure("noop")
        tally = Tally()

        async def touch() -> None:  # a few requests, so lazily loaded code is in
            connection = await client.Connection.open(self.port)
            try:
                for _ in range(10):
                    status, body = await client.request(connection, "GET", "/noop")
                    if status != 200 or body != b"ok":
                        tally.fail(f"GET /noop answered {status} {body[:100]!r}")
            finally:
                await connection.close()

        try:
            arun(touch())
        except (OSError, TimeoutError, client.HttpError) as exc:
            tally.fail(f"GET /noop: {type(exc).__name__}: {exc}")
        time.sleep(1.0)
        pids = self.replica_pids("noop")
        if not pids:
            raise BenchError("no RUNNING replica of app 'noop' in Redis")
        self.add(Row("replica_rss_at_rest", rss_mib(pids[0]), "MiB",
                     errors=self.seen(tally.errors()), details={"pid": pids[0]}))

    def m_handle_call(self) -> None:
        handle = self.ensure("handle")
        n = self.plan.handle_calls
        result = handle.measure.remote(n).result(timeout_s=300)
        if not result.get("ok"):
            raise BenchError(f"Caller.measure had no successful call: {result!r}")
        errors = self.seen(Errors({"failed": result["failed"]}, examples=result["failures"]))
        for pct in (50, 90, 99):
            self.add(Row(f"handle_call_p{pct}", result[f"p{pct}_ms"], "ms", errors=errors,
                         details=result if pct == 50 else {}))
        chain, tally = self._driver_round_trips(handle.relay, n)
        errors = self.seen(tally.errors())
        for pct in (50, 90, 99):
            self.add(Row(f"handle_chain_p{pct}", chain[f"p{pct}_ms"], "ms", errors=errors,
                         details=chain if pct == 50 else {}))

    def _driver_round_trips(self, relay: Any, n: int,
                            warmup: int = 20) -> tuple[dict[str, Any], Tally]:
        """n sequential `relay.remote(i).result()` from this (sync) driver, each timed here;
        failed calls are counted, not timed."""
        from .apps import percentile

        tally = Tally()
        samples = []
        for i in range(-warmup, n):  # negative values: the warm-up calls, not timed
            if tally.exhausted:
                break
            start = time.perf_counter()
            try:
                value = relay.remote(i).result(timeout_s=30)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                tally.fail(f"Caller.relay({i}): {type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - start
            if value != i:
                tally.fail(f"Caller.relay returned {value!r} for {i!r}")
            elif i >= 0:
                samples.append(elapsed)
        if not samples:
            raise BenchError(f"no driver round trip succeeded: {tally.examples}")
        return {"n": n, "ok": len(samples), "failed": tally.failed,
                **{f"p{pct}_ms": percentile(samples, pct) * 1000 for pct in (50, 90, 99)},
                "mean_ms": statistics.fmean(samples) * 1000, "max_ms": max(samples) * 1000}, tally

    def _body(self, measurement: str, size: int) -> None:
        self.ensure("echo")
        body = b"b" * size
        count = self.plan.body_requests
        tally = Tally()

        async def run() -> list[float]:
            connection = await client.Connection.open(self.port)
            times: list[float] = []
            try:
                for index in range(count + 1):  # the first one warms up
                    if tally.exhausted:
                        break
                    start = time.perf_counter()
                    try:
                        status, answer = await client.request(connection, "POST", "/echo", body)
                    except (OSError, TimeoutError, client.HttpError) as exc:
                        tally.fail(f"POST {size} bytes: {type(exc).__name__}: {exc}")
                        await connection.close()  # in an unknown state: start afresh
                        connection = await client.Connection.open(self.port)
                        continue
                    elapsed = time.perf_counter() - start
                    if status != 200 or answer.strip() != str(size).encode():
                        tally.fail(f"POST {size} bytes answered {status} {answer[:200]!r}")
                    elif index:
                        times.append(elapsed)
            finally:
                await connection.close()
            return times

        ms = [t * 1000 for t in arun(run())]
        errors = self.seen(tally.errors())
        if not ms:
            raise BenchError(f"no POST of {size} bytes succeeded: {tally.examples}")
        self.add(Row(measurement, statistics.median(ms), "ms", errors=errors, details={
            "bytes": size, "requests": len(ms), "min_ms": min(ms), "max_ms": max(ms),
            "mean_ms": statistics.fmean(ms),
        }))

    def m_body_1mib(self) -> None:
        self._body("body_1mib", MIB)

    def m_body_10mib(self) -> None:
        self._body("body_10mib", 10 * MIB)

    def m_stream(self) -> None:
        self.ensure("stream")
        tight, errors = self._stream_runs("")
        self.add(Row("stream_ttfc", statistics.median(t.ttfc_s * 1000 for t in tight), "ms",
                     errors=errors, details={
                         "chunks": self.plan.stream_chunks, "chunk_bytes": 16,
                         "repeats": len(tight), "runs": [t.__dict__ for t in tight],
                     }))
        # Chunks the app yielded, counted by bytes; each arrives as its own HTTP frame (checked
        # in _stream_runs), though back-to-back chunks share a message (docs/performance.md,
        # "Streaming").
        self.add(Row("stream_chunks_per_s",
                     statistics.median(t.bytes / 16 / t.total_s for t in tight),
                     "chunks/s", errors=errors, details={
                         "http_frames_median": statistics.median(t.frames for t in tight),
                         "total_s_median": statistics.median(t.total_s for t in tight),
                     }))
        paced, errors = self._stream_runs("&paced=1")
        self.add(Row("stream_paced_chunks_per_s",
                     statistics.median(t.bytes / 16 / t.total_s for t in paced),
                     "chunks/s", errors=errors, details={
                         "http_frames_median": statistics.median(t.frames for t in paced),
                         "ttfc_ms_median": statistics.median(t.ttfc_s * 1000 for t in paced),
                     }))

    def _stream_runs(self, extra: str) -> tuple[list[client.StreamTiming], Errors]:
        """One small warm-up stream, then the timed ones; a failed stream is counted."""
        chunks, size = self.plan.stream_chunks, 16
        tally = Tally()
        runs: list[client.StreamTiming] = []
        for index in range(self.plan.stream_repeats + 1):
            n = chunks if index else 100
            path = f"/stream?n={n}&size={size}{extra}"
            try:
                timing = arun(client.time_stream(self.port, path, 120))
            except (OSError, TimeoutError, client.HttpError) as exc:
                tally.fail(f"GET {path}: {type(exc).__name__}: {exc}")
                continue
            if timing.bytes != n * size:
                tally.fail(f"GET {path} carried {timing.bytes} bytes, expected {n * size}")
            elif timing.frames != n:  # one HTTP chunk per yield, as Ray writes them
                tally.fail(f"GET {path} arrived in {timing.frames} HTTP chunks, expected {n}")
            elif index:
                runs.append(timing)
        errors = self.seen(tally.errors())
        if not runs:
            raise BenchError(f"no stream succeeded: {tally.examples}")
        return runs, errors

    def m_scale_out(self) -> None:
        from . import apps

        if self._spin_iterations is None:
            self._spin_iterations = calibrate_spin(0.005)
        iterations = self._spin_iterations
        rps: dict[int, WrkResult] = {}
        errors: dict[int, Errors] = {}
        for replicas in (1, 2):
            self.deploy("spin", apps.Spin.options(num_replicas=replicas).bind(iterations),
                        "/spin")
            pids = self.wait_replicas_settled("spin", "Spin", replicas)
            result, errors[replicas] = self.wrk_rps(self.url("/spin"), 8)
            rps[replicas] = result
            self.add(Row(f"scale_out_rps_{replicas}_replica{'s' if replicas > 1 else ''}",
                         result.rps, "req/s", errors=errors[replicas],
                         details={**result.details(), "replica_pids": pids,
                                  "spin_iterations": iterations}))
        self.add(Row("scale_out_ratio", rps[2].rps / rps[1].rps if rps[1].rps else 0.0, "x",
                     errors=errors[1] + errors[2]))

    def m_proxy_rss_1000_streams(self) -> None:
        self.ensure("slow")
        proxy = self.proxy_pid()
        replicas = self.replica_pids("slow")
        wanted, seconds = self.plan.streams, self.plan.slow_seconds
        rss_before = rss_mib(proxy)
        connections: list[client.Connection] = []
        failures: list[str] = []
        times: dict[str, Any] = {}

        async def one(gate: asyncio.Semaphore) -> None:
            async with gate:
                try:
                    connections.append(await asyncio.wait_for(
                        client.open_stream(self.port, f"/slow?seconds={seconds}"), 30))
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    failures.append(f"{type(exc).__name__}: {exc}")

        async def run() -> tuple[list[float], list[float]]:
            gate = asyncio.Semaphore(64)
            times["start"] = time.monotonic()
            try:
                await asyncio.wait_for(asyncio.gather(*(one(gate) for _ in range(wanted))),
                                       seconds + 30)
                times["opened"] = time.monotonic()
                samples, replica_samples = [], []
                for _ in range(3):  # every stream is open and ticking now
                    samples.append(rss_mib(proxy))
                    replica_samples.append(sum(rss_mib(pid) for pid in replicas))
                    await asyncio.sleep(0.5)
                return samples, replica_samples
            finally:
                times.setdefault("opened", time.monotonic())
                await asyncio.gather(*(c.close() for c in connections), return_exceptions=True)

        try:
            samples, replica_samples = arun(run())
        finally:
            # A stream outlives its client: the proxy relays it and the replica generates it to
            # the end (broker-serve does not cancel on disconnect), and deleting the app while
            # streams run leaves their proxy requests waiting forever, which stalls the proxy's
            # shutdown for 30 s. So wait (bounded) until the last stream has ended.
            if "start" in times:
                until = times["opened"] + seconds + 2
                time.sleep(max(0.0, min(until - time.monotonic(), seconds + 2)))
        rss_after = rss_mib(proxy)
        errors = self.seen(Errors({"failed": wanted - len(connections)},
                                  examples=failures[:3]))
        self.add(Row("proxy_rss_1000_streams", max(samples), "MiB", errors=errors,
                     details={
                         "streams": wanted, "opened": len(connections),
                         "open_s": times["opened"] - times["start"], "stream_seconds": seconds,
                         "proxy_pid": proxy, "proxy_rss_before_mib": rss_before,
                         "proxy_rss_samples_mib": samples,
                         "proxy_rss_after_streams_ended_mib": rss_after,
                         "replica_rss_during_mib": max(replica_samples),
                     }))

    # running ----------------------------------------------------------------------------------
    def run(self, selected: list[str]) -> None:
        for name in MEASUREMENTS:
            if name in selected:
                self._run_one(name)

    def _run_one(self, name: str) -> None:
        self.say(f"-- {name}")
        started = time.monotonic()
        self._measuring = name
        first = len(self.rows)
        window: Snapshot | None = None
        try:
            if name != "ceiling":  # the one measurement without the cluster
                # Started before the window opens, so that its counters exist from then on.
                self._ensure_cluster()
                window = self.probe.begin()
            getattr(self, f"m_{name}")()
        except Exception as exc:  # noqa: BLE001 - recorded, the harness exits non-zero
            self.problem(name, f"{type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)
        finally:
            if window is not None:
                self._close_window(window, first)
        self.say(f"   {name} took {time.monotonic() - started:.1f}s")

    def _close_window(self, window: Snapshot, first: int) -> None:
        """Add the cluster's counts over the measurement to each of its rows."""
        try:
            errors = self.probe.end(window)
        except Exception as exc:  # noqa: BLE001 - the counts are then unknown, not zero
            errors = Errors(unknown=dict.fromkeys(CLUSTER_KINDS, f"{type(exc).__name__}: {exc}"))
        self.seen(errors)
        self.say(f"   cluster side: {errors.summary()}")
        for row in list(self.rows.values())[first:]:
            row.errors += errors

    def close(self) -> None:
        """serve.shutdown(), then remove the namespace's Redis keys and RabbitMQ queues."""
        from .cleanup import cleanup_namespace, namespace_queues

        started = time.monotonic()
        try:
            if self._serve is not None:
                self.queues |= namespace_queues(self.cluster)
                self._serve.shutdown()
                self.say(f"serve.shutdown() took {time.monotonic() - started:.1f}s")
        except Exception as exc:  # noqa: BLE001 - clean up the rest regardless
            self.problem("cleanup", f"serve.shutdown() failed: {exc}")
        finally:
            if self._redis is not None:
                self._redis.close()
            try:
                cleanup_namespace(self.cluster, self.queues)
            except Exception as exc:  # noqa: BLE001
                self.problem("cleanup", f"cleaning namespace {self.cluster} failed: {exc}")
            if self._serve is not None:
                self.probe.finish()  # what the shutdown made RabbitMQ log
            if self.proto_dir is not None:
                shutil.rmtree(self.proto_dir, ignore_errors=True)

    # results ----------------------------------------------------------------------------------
    def totals(self) -> Errors:
        """The whole run's errors: every measurement's, and the RabbitMQ errors of this
        cluster logged outside them (between them, or while the cluster shut down)."""
        total = Errors()
        for errors in self.counted.values():
            total += errors
        if self.probe.outside:
            total += Errors({"broker_log": len(self.probe.outside)},
                            examples=[str(e) for e in self.probe.outside])
        return total

    @property
    def valid(self) -> bool:
        """Every measurement ran, and every figure is a result."""
        return (not self.errors and not self.probe.outside
                and all(row.errors.valid for row in self.rows.values()))

    def to_json(self, elapsed_s: float, verdicts: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "cluster": self.cluster,
            "smoke": self.plan.smoke,
            "plan": self.plan.__dict__,
            "elapsed_s": elapsed_s,
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                        "platform": platform.platform()},
            "valid": self.valid,
            "results": {
                row.name: {"value": row.value, "unit": row.unit, "measurement": row.measurement,
                           "ratio_to_ceiling": ratio(self.rows, row), "ceiling_row": row.ratio_to,
                           **row.errors.to_json(), "details": row.details}
                for row in self.rows.values()
            },
            "totals": {
                **totals_json(self.totals(), self.rows),
                "broker_log_file": self.probe.log_source,
                "broker_log_outside_measurements": [str(e) for e in self.probe.outside],
                "broker_log_other_clients": self.probe.others,
            },
            "targets": verdicts,
            "errors": self.errors,
            "warnings": self.warnings,
        }


# helpers ------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(port: int, path: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait until 127.0.0.1:port answers `path` with 200."""
    deadline = time.monotonic() + timeout_s

    async def probe() -> int:
        connection = await client.Connection.open(port)
        try:
            status, _ = await client.request(connection, "GET", path, timeout_s=5)
            return status
        finally:
            await connection.close()

    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"the ceiling server exited with code {process.returncode}")
        try:
            if arun(probe()) == 200:
                return
        except (TimeoutError, OSError, client.HttpError):
            pass
        time.sleep(0.1)
    raise BenchError(f"nothing answered on 127.0.0.1:{port} within {timeout_s:.0f}s")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


def _alive(pid: int) -> bool:
    return pid > 0 and os.path.exists(f"/proc/{pid}")


def calibrate_spin(target_cpu_s: float) -> int:
    """Iterations of apps.spin that take `target_cpu_s` of CPU here (best of a few tries)."""
    from .apps import spin

    probe = 50_000
    best = float("inf")
    for _ in range(5):
        start = time.thread_time()
        spin(probe)
        best = min(best, time.thread_time() - start)
    return max(1000, int(probe * target_cpu_s / max(best, 1e-6)))


def arun(coro: Coroutine[Any, Any, T]) -> T:
    """Run a client coroutine on a fresh (uvloop, if there is one) event loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def raise_nofile_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (the cluster's processes inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark broker-serve against a plain uvicorn + Starlette ceiling.",
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    parser.add_argument("--smoke", action="store_true",
                        help="run every measurement very briefly (a correctness pass, < 60 s)")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help=f"run only these measurements: {', '.join(MEASUREMENTS)}")
    parser.add_argument("--duration", type=float, default=10.0, metavar="S",
                        help="seconds of each wrk run (default 10; 1 with --smoke)")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.duration > 600:
        parser.error("--duration must be in (0, 600] seconds")
    if args.only:
        args.selected = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in args.selected if n not in MEASUREMENTS]
        if unknown:
            parser.error(f"unknown measurement(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(MEASUREMENTS)}")
    else:
        args.selected = list(MEASUREMENTS)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if NEEDS_WRK & set(args.selected):
        try:
            wrk_path()
        except WrkMissing as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    plan = Plan.make(args.smoke, args.duration)
    cluster = f"bench{secrets.token_hex(5)}"
    port, metrics_port = free_port(), free_port()
    # Before anything reads the settings: this run's own namespace and ports. The worker node
    # serves its replicas' metrics on metrics_port, which the harness scrapes.
    os.environ["BROKER_SERVE_CLUSTER"] = cluster
    os.environ["BROKER_SERVE_HTTP_PORT"] = str(port)
    os.environ["BROKER_SERVE_HTTP_HOST"] = "127.0.0.1"
    os.environ["BROKER_SERVE_METRICS_PORT"] = str(metrics_port)
    os.environ["BROKER_SERVE_METRICS_HOST"] = "127.0.0.1"
    os.environ["BROKER_SERVE_DASHBOARD_PORT"] = str(free_port())
    soft, _ = raise_nofile_limit()
    log_path = Path(tempfile.gettempdir()) / f"broker-serve-{cluster}.log"
    # Made before the cluster starts: the log reader learns each connection's name as RabbitMQ
    # logs it, when the connection opens.
    probe = ClusterProbe(cluster, metrics_port, amqp_url())
    grpc_port, proto_dir, grpc_problem = None, None, ""
    if NEEDS_GRPC & set(args.selected):
        try:
            proto_dir = compile_proto(Path(tempfile.mkdtemp(prefix=f"{cluster}-protos-")))
        except GrpcUnavailable as exc:
            grpc_problem = str(exc)
        else:  # the cluster's processes (and the load generator) import the generated code
            grpc_port = free_port()
            os.environ["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(proto_dir), os.environ.get("PYTHONPATH")]))
    bench = Bench(plan, cluster, port, log_path, probe, grpc_port, proto_dir)
    if grpc_problem:  # those measurements fail; the others run
        for name in sorted(NEEDS_GRPC & set(args.selected)):
            bench.problem(name, grpc_problem)
        args.selected = [name for name in args.selected if name not in NEEDS_GRPC]
    bench.say(f"cluster {cluster}, {'smoke' if plan.smoke else 'full'} run, wrk "
              f"{plan.duration_s:g}s, RLIMIT_NOFILE {soft}, RabbitMQ log {probe.log_source}")
    started = time.monotonic()
    try:
        bench.run(args.selected)
    except KeyboardInterrupt:
        bench.problem("interrupted", "interrupted by the user")
    finally:
        bench.say("cleaning up")
        bench.close()
    elapsed = time.monotonic() - started
    verdicts = [evaluate(bench.rows, target) for target in TARGETS]
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(bench.to_json(elapsed, verdicts), indent=2, default=str) + "\n")
    report(bench, args, elapsed, verdicts)
    return 0 if bench.valid else 1


def report(bench: Bench, args: argparse.Namespace, elapsed: float,
           verdicts: list[dict[str, Any]]) -> None:
    """Problems to stderr; the table, the totals and the targets to stdout."""
    for warning in bench.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for name, error in bench.errors.items():
        print(f"error: {name}: {error}", file=sys.stderr)
    for logged in bench.probe.outside:
        print(f"error: RabbitMQ logged, outside the measurements: {logged}", file=sys.stderr)
    if bench.probe.others:
        print(f"note: RabbitMQ logged {bench.probe.others} errors of other clients (other runs "
              "on this broker) meanwhile; they are not counted", file=sys.stderr)
    plan = bench.plan
    print(f"broker-serve benchmark ({'smoke' if plan.smoke else 'full'}, wrk "
          f"{plan.duration_s:g}s, {elapsed:.0f}s total, cluster logs in {bench.log_path}, "
          f"RabbitMQ log {bench.probe.log_source})")
    print(table(bench.rows))
    print(totals_text(totals_json(bench.totals(), bench.rows)))
    if any(r.ratio_to for r in bench.rows.values()) and "ceiling" not in args.selected:
        print("(add 'ceiling' to --only to get the ratios)")
    print(targets_text(verdicts, plan.smoke))
    if not bench.valid:
        print("NOT A RESULT: some figures had errors, or could not be checked for them "
              "(see the errors and valid columns)")
