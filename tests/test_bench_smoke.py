"""The benchmark harness's smoke pass: every measurement runs briefly and answers correctly.

No timing is asserted: this checks that `python -m bench --smoke` works end to end (its own
cluster namespace, every deployment, wrk, the raw clients, the JSON and the cleanup).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from .conftest import REDIS_URL, ROOT

EXPECTED_ROWS = [
    "ceiling_rps_c32", "ceiling_rps_c32_errors", "ceiling_latency_c1_p50",
    "ceiling_latency_c1_p99",
    "noop_rps_c32", "noop_rps_c32_errors", "noop_latency_c1_p50", "noop_latency_c1_p99",
    "stream_ttfc", "stream_chunks_per_s", "stream_paced_chunks_per_s",
    "handle_call_p50", "handle_call_p90", "handle_call_p99",
    "handle_chain_p50", "handle_chain_p90", "handle_chain_p99",
    "body_1mib", "body_10mib",
    "proxy_rss_1000_streams", "replica_rss_at_rest",
    "scale_out_rps_1_replica", "scale_out_rps_2_replicas", "scale_out_ratio",
]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("wrk") is None,
                    reason="wrk is not installed (install it with `apt-get install -y wrk`)")
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # Its own environment: the harness picks its own cluster namespace and proxy port.
    env = {k: v for k, v in os.environ.items()
           if k not in ("BROKER_SERVE_CLUSTER", "BROKER_SERVE_HTTP_PORT")}
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
    assert results["noop_rps_c32_errors"]["value"] == 0
    for name in ("noop_rps_c32", "noop_latency_c1_p50", "noop_latency_c1_p99"):
        assert results[name]["ratio_to_ceiling"] is not None
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
