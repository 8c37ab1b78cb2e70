"""The gRPC no-op: its tiny proto (compiled at bench time with grpcio-tools), and running the
load generator (bench/grpc_load.py) in its own process against the proxy's gRPC port.

Nothing is installed: grpcio and grpcio-tools come with the `grpc` and `test` extras. The
generated modules go to a directory of the run's own, which is put on PYTHONPATH before the
cluster starts, so that the proxy, the worker node's replicas and the load generator import
them (docs/architecture.md, "gRPC ingress").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Errors

PROTO_MODULE = "bench_noop"
PROTO = """\
syntax = "proto3";

package benchnoop;

message Ping {
  string name = 1;
}

message Pong {
  string message = 1;
}

service NoopService {
  rpc __call__(Ping) returns (Pong);
}
"""
SERVICER_FUNCTIONS = [f"{PROTO_MODULE}_pb2_grpc.add_NoopServiceServicer_to_server"]
METHOD = "/benchnoop.NoopService/__call__"
ANSWER = "ok"
GRPC_KINDS = ("non_ok", "timeout", "failed")  # the load generator's own counts
CALL_TIMEOUT_S = 5.0  # each call's deadline, as wrk's --timeout
READY_TIMEOUT_S = 60.0
ROOT = Path(__file__).resolve().parent.parent


class GrpcUnavailable(RuntimeError):
    """grpcio or grpcio-tools is missing, or the proto did not compile."""


def compile_proto(directory: Path) -> Path:
    """Write bench_noop.proto to `directory` and generate its `_pb2` and `_pb2_grpc` modules
    beside it, as `python -m grpc_tools.protoc` does."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:
        raise GrpcUnavailable("the gRPC measurements need grpcio-tools (pip install "
                              "'broker-serve[grpc]' or '[test]')") from exc
    directory.mkdir(parents=True, exist_ok=True)
    source = directory / f"{PROTO_MODULE}.proto"
    source.write_text(PROTO)
    status = protoc.main(["grpc_tools.protoc", f"-I{directory}", f"--python_out={directory}",
                          f"--grpc_python_out={directory}", str(source)])
    if status != 0:
        raise GrpcUnavailable(f"grpc_tools.protoc failed with {status} on {source}")
    return directory


@dataclass
class GrpcLoad:
    """What one load-generator run measured (its JSON line)."""

    calls: int  # answered OK and checked
    elapsed_s: float
    latency_ms: dict[str, float]
    counts: dict[str, int]  # GRPC_KINDS -> count
    codes: dict[str, int]  # non-OK status code name -> count (warm-up included)
    examples: list[str]
    cpu_s: float  # the load generator's own CPU (user + system) over the timed run
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.calls / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def errors(self) -> Errors:
        return Errors(dict(self.counts), examples=list(self.examples))

    def details(self) -> dict[str, Any]:
        return {**self.raw, "rps": self.rps,
                "load_generator_cpu_share": self.cpu_s / self.elapsed_s if self.elapsed_s
                else None}


def run_load(address: str, application: str, proto_dir: Path, *, concurrency: int,
             duration_s: float, warmup_s: float, channels: int = 1) -> GrpcLoad:
    """Run bench/grpc_load.py in a process of its own (so that its CPU is its own, as
    wrk's is) and read its result."""
    command = [sys.executable, "-m", "bench.grpc_load", address, "--application", application,
               "--concurrency", str(concurrency), "--duration", str(duration_s),
               "--warmup", str(warmup_s), "--channels", str(channels),
               "--timeout", str(CALL_TIMEOUT_S), "--ready-timeout", str(READY_TIMEOUT_S)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(proto_dir), str(ROOT), os.environ.get("PYTHONPATH")]))}
    limit = READY_TIMEOUT_S + warmup_s + duration_s + 2 * CALL_TIMEOUT_S + 30
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=limit, check=False)
    except subprocess.TimeoutExpired as exc:
        raise GrpcUnavailable(f"the gRPC load generator did not end within {limit:.0f}s") \
            from exc
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise GrpcUnavailable(f"the gRPC load generator exited with {done.returncode}: "
                              f"{done.stderr.strip()[-2000:]}")
    result = json.loads(lines[-1])
    return GrpcLoad(calls=int(result["calls"]), elapsed_s=float(result["elapsed_s"]),
                    latency_ms={k: float(v) for k, v in result["latency_ms"].items()},
                    counts={k: int(result["counts"][k]) for k in GRPC_KINDS},
                    codes=dict(result["codes"]), examples=list(result["examples"]),
                    cpu_s=float(result["cpu_s"]), raw=result)
