"""The deployments the benchmark measures.

Each is deployed as its own application (own `name=` and `route_prefix=`) by bench/harness.py.
This module is imported only after the harness has set the cluster's environment variables.
Every loop here is bounded by a count taken from the request (capped).
"""

from __future__ import annotations

import asyncio
import importlib
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from broker_serve import serve

MAX_STREAM_CHUNKS = 1_000_000
MAX_SLOW_SECONDS = 120
MAX_HANDLE_CALLS = 100_000
MAX_FAILURES = 10  # as bench/errors.py: a failed call may have waited out a timeout


def percentile(samples: list[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    position = (len(ordered) - 1) * pct / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def spin(iterations: int) -> int:
    """Pure-Python CPU work: the harness calibrates `iterations` to ~5 ms of CPU."""
    x = 0
    for i in range(iterations):
        x += i & 7
    return x


# 1-3: the no-op, async and sync ----------------------------------------------------------------
@serve.deployment(max_ongoing_requests=100)
class Noop:
    async def __call__(self, request: Request) -> str:
        return "ok"


@serve.deployment(max_ongoing_requests=100)
class NoopSync:
    def __call__(self, request: Request) -> str:  # sync: runs in the replica's thread pool
        return "ok"


# 3b: the no-op over gRPC ---------------------------------------------------------------------
@serve.deployment(max_ongoing_requests=100)
class GrpcNoop:
    """`/benchnoop.NoopService/__call__` (bench/grpc_noop.py): answers every Ping with
    `Pong(message="ok")`, as Noop answers "ok"."""

    def __init__(self) -> None:
        # The generated module is on the replica's PYTHONPATH only in a run that measures gRPC.
        self.pong = importlib.import_module("bench_noop_pb2").Pong

    async def __call__(self, request: Any) -> Any:
        return self.pong(message="ok")


# 4: a fast stream -------------------------------------------------------------------------------
@serve.deployment(max_ongoing_requests=100)
class Stream:
    """`GET ?n=10000&size=16[&paced=1]`: n chunks of `size` bytes from an async generator.

    Without `paced` the generator never awaits, as a fast token loop does; with it, it awaits
    `asyncio.sleep(0)` after each chunk, so each chunk leaves the replica as its own message."""

    async def __call__(self, request: Request) -> StreamingResponse:
        n = min(int(request.query_params.get("n", "10000")), MAX_STREAM_CHUNKS)
        chunk = b"x" * min(int(request.query_params.get("size", "16")), 65536)
        paced = request.query_params.get("paced") == "1"

        async def chunks() -> Any:
            for _ in range(n):
                yield chunk
                if paced:
                    await asyncio.sleep(0)

        return StreamingResponse(chunks(), media_type="application/octet-stream")


# 5: handle calls --------------------------------------------------------------------------------
@serve.deployment(max_ongoing_requests=100)
class Callee:
    async def __call__(self, value: Any) -> Any:
        return value


@serve.deployment(max_ongoing_requests=100)
class Caller:
    def __init__(self, callee: Any) -> None:
        self.callee = callee

    async def __call__(self, request: Request) -> dict[str, Any]:
        """`GET ?n=100`: the same measurement over HTTP. (The harness calls `measure` through a
        handle; broker-serve also refuses to start a class deployment without `__call__`.)"""
        return await self.measure(int(request.query_params.get("n", "100")))

    async def relay(self, value: Any) -> Any:
        """One inner call: the harness times driver -> Caller -> Callee around it."""
        return await self.callee.remote(value)

    async def measure(self, n: int, warmup: int = 20) -> dict[str, Any]:
        """`n` sequential `await self.callee.remote(i)`, each timed here with perf_counter.

        A call that raises or answers wrongly is not timed but counted in `failed` (the first
        few in `failures`), and after MAX_FAILURES of them the measurement stops."""
        n = max(1, min(int(n), MAX_HANDLE_CALLS))
        failures: list[str] = []
        for i in range(min(int(warmup), 1000)):
            if len(failures) < MAX_FAILURES:
                await self._timed_call(i, failures)
        samples = []
        for i in range(n):
            if len(failures) >= MAX_FAILURES:
                break
            seconds = await self._timed_call(i, failures)
            if seconds is not None:
                samples.append(seconds)
        result: dict[str, Any] = {"n": n, "ok": len(samples), "failed": len(failures),
                                  "failures": failures[:5]}
        if samples:
            result.update({f"p{pct}_ms": percentile(samples, pct) * 1000 for pct in (50, 90, 99)})
            result.update(mean_ms=sum(samples) / len(samples) * 1000, max_ms=max(samples) * 1000)
        return result

    async def _timed_call(self, value: int, failures: list[str]) -> float | None:
        start = time.perf_counter()
        try:
            answer = await self.callee.remote(value)
        except Exception as exc:  # noqa: BLE001 - counted: the harness reports it
            failures.append(f"{type(exc).__name__}: {exc}"[:300])
            return None
        seconds = time.perf_counter() - start
        if answer != value:
            failures.append(f"Callee returned {answer!r} for {value!r}"[:300])
            return None
        return seconds


# 6: request bodies ------------------------------------------------------------------------------
@serve.deployment(max_ongoing_requests=16)
class EchoLength:
    async def __call__(self, request: Request) -> int:
        return len(await request.body())


# 7: many slow streams ---------------------------------------------------------------------------
@serve.deployment(max_ongoing_requests=1100, graceful_shutdown_timeout_s=1.0)
class SlowStream:
    """`GET ?seconds=60`: one small chunk right away, then one every second."""

    async def __call__(self, request: Request) -> StreamingResponse:
        seconds = min(int(request.query_params.get("seconds", "60")), MAX_SLOW_SECONDS)

        async def ticks() -> Any:
            for i in range(seconds):
                yield b"tick %d\n" % i
                await asyncio.sleep(1.0)

        return StreamingResponse(ticks(), media_type="text/plain")


# 8: CPU-bound, for scale-out --------------------------------------------------------------------
@serve.deployment
class Spin:
    def __init__(self, iterations: int) -> None:
        self.iterations = int(iterations)

    def __call__(self, request: Request) -> str:  # sync: runs in the replica's thread pool
        spin(self.iterations)
        return "ok"
