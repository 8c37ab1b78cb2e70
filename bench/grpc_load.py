"""The gRPC load generator: `python -m bench.grpc_load ADDRESS --application A --concurrency N
--duration S [--warmup S] [--channels K]`. bench/grpc_noop.py runs it in a process of its own.

N coroutines on grpcio's asyncio client each make one unary no-op call after another (so N
are in flight), over K channels (HTTP/2 connections), for the warm-up and then for the timed
run; a worker starts no call once its phase's time is up, so each phase is bounded by its
duration plus one call's deadline. Every answer is checked. It prints one JSON line: the calls
answered OK in the timed run, its length, the latency distribution, the errors of both phases
by kind (`non_ok`: a status other than OK, `timeout`: DEADLINE_EXCEEDED, `failed`: a wrong
answer), and its own CPU time, which shares the machine's cores with the cluster.

It needs the generated `bench_noop_pb2` on its path (PYTHONPATH).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from .grpc_noop import ANSWER, METHOD, PROTO_MODULE

MAX_EXAMPLES = 5


@dataclass
class Outcome:
    counts: dict[str, int] = field(
        default_factory=lambda: {"non_ok": 0, "timeout": 0, "failed": 0})
    codes: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def error(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(text[:300])


class Caller:
    def __init__(self, address: str, application: str, channels: int, timeout_s: float
                 ) -> None:
        self.pb2: Any = importlib.import_module(f"{PROTO_MODULE}_pb2")
        self.channels = [grpc.aio.insecure_channel(address) for _ in range(channels)]
        self.stubs = [channel.unary_unary(METHOD,
                                          request_serializer=self.pb2.Ping.SerializeToString,
                                          response_deserializer=self.pb2.Pong.FromString)
                      for channel in self.channels]
        self.metadata = (("application", application),)
        self.request = self.pb2.Ping(name="bench")
        self.timeout_s = timeout_s

    async def call(self, index: int, outcome: Outcome) -> bool:
        """One call; True if it answered OK with the no-op's answer."""
        try:
            reply = await self.stubs[index % len(self.stubs)](
                self.request, metadata=self.metadata, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            outcome.codes[code.name] = outcome.codes.get(code.name, 0) + 1
            kind = "timeout" if code == grpc.StatusCode.DEADLINE_EXCEEDED else "non_ok"
            outcome.error(kind, f"{code.name}: {exc.details()}")
            return False
        if reply.message != ANSWER:
            outcome.error("failed", f"answered {reply.message!r}, expected {ANSWER!r}")
            return False
        return True

    async def wait_ready(self, timeout_s: float) -> tuple[float, int]:
        """Until one call answers OK (the proxy reads the gRPC options and routes every 2 s);
        these calls are not counted. Returns the wait and the attempts."""
        started = time.monotonic()
        attempts = 0
        last = Outcome()
        while time.monotonic() - started < timeout_s:
            attempts += 1
            if await self.call(0, last):
                return time.monotonic() - started, attempts
            await asyncio.sleep(0.1)
        raise TimeoutError(f"no gRPC call answered OK within {timeout_s:g}s: {last.examples}")

    async def phase(self, concurrency: int, seconds: float, outcome: Outcome
                    ) -> tuple[list[float], float]:
        """`concurrency` workers for `seconds`: the OK calls' latencies and the phase's
        length (until its last call ended)."""
        samples: list[float] = []
        started = time.perf_counter()
        until = started + seconds

        async def worker(index: int) -> None:
            while time.perf_counter() < until:
                start = time.perf_counter()
                if await self.call(index, outcome):
                    samples.append(time.perf_counter() - start)

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        return samples, time.perf_counter() - started

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self.channels))


def percentiles(samples: list[float]) -> dict[str, float]:
    if len(samples) < 2:
        return {pct: samples[0] * 1000 for pct in ("50", "90", "99")} if samples else {}
    cuts = statistics.quantiles(samples, n=100, method="inclusive")  # numpy's default
    return {"50": cuts[49] * 1000, "90": cuts[89] * 1000, "99": cuts[98] * 1000}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    caller = Caller(args.address, args.application, args.channels, args.timeout)
    try:
        ready_s, attempts = await caller.wait_ready(args.ready_timeout)
        outcome = Outcome()
        if args.warmup > 0:
            await caller.phase(args.concurrency, args.warmup, outcome)
        cpu_before = time.process_time()
        samples, elapsed = await caller.phase(args.concurrency, args.duration, outcome)
        cpu_s = time.process_time() - cpu_before
    finally:
        await caller.close()
    return {"calls": len(samples), "elapsed_s": elapsed, "latency_ms": percentiles(samples),
            "counts": outcome.counts, "codes": outcome.codes, "examples": outcome.examples,
            "cpu_s": cpu_s, "concurrency": args.concurrency, "channels": args.channels,
            "duration_s": args.duration, "warmup_s": args.warmup,
            "call_timeout_s": args.timeout, "ready_s": ready_s, "ready_attempts": attempts,
            "client": f"grpcio {grpc.__version__} asyncio, one process"}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_load")
    parser.add_argument("address", help="host:port of the proxy's gRPC server")
    parser.add_argument("--application", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=0.0)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=5.0, help="each call's deadline")
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    args = parser.parse_args()
    if not 1 <= args.concurrency <= 1000 or not 1 <= args.channels <= 64:
        parser.error("--concurrency must be in [1, 1000] and --channels in [1, 64]")
    if not 0 < args.duration <= 600 or not 0 <= args.warmup <= 600:
        parser.error("--duration must be in (0, 600] and --warmup in [0, 600] seconds")
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
