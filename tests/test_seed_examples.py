"""The HTTP examples of the user's reference document (Ray Serve 2.x "Set Up FastAPI and HTTP"),
ported by changing only the import, run as a user would run them: as a driver script whose
`serve.run` starts a local cluster. The scripts' own asserts check the responses; these tests
check that each script exits cleanly, and for streaming, that the chunks arrive as produced.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from conftest import Cluster

EXAMPLES = Path(__file__).resolve().parent / "seed_examples"

SIMPLE_EXAMPLES = [
    "basic_call.py",
    "fastapi_route_prefix.py",
    "fastapi_multiple_methods.py",
    "fastapi_existing_app.py",
    "custom_response.py",
]


def run_example(cluster: Cluster, name: str) -> subprocess.CompletedProcess[str]:
    result = cluster.run_script((EXAMPLES / name).read_text(), timeout=60)
    assert result.returncode == 0, (
        f"{name} exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )
    return result


@pytest.mark.parametrize("name", SIMPLE_EXAMPLES)
def test_seed_example(cluster: Cluster, name: str) -> None:
    run_example(cluster, name)


RESULT_LINE = re.compile(r"^Got result (\d+(?:\.\d+)?)s after start: '(.*)'$")


def test_streaming_example(cluster: Cluster) -> None:
    result = run_example(cluster, "streaming.py")
    results = [(float(m.group(1)), m.group(2))
               for m in map(RESULT_LINE.match, result.stdout.splitlines()) if m]
    report = f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert [chunk for _, chunk in results] == [str(i) for i in range(10)], report
    first, last = results[0][0], results[-1][0]
    assert first <= 0.5, f"first chunk only after {first}s\n{report}"
    assert last >= 0.8, f"last chunk already after {last}s: not streamed as produced\n{report}"


def test_ray08_full_example(cluster: Cluster) -> None:
    """Ray Serve 0.8's full example (seed 003), ported by its two changes (the import, and
    `ref.result()` for `ray.get(ref)`), less `import ray` and the Ray-only pretty printer. It
    requests 127.0.0.1:8000, moved to the test cluster's port as the others' localhost:8000."""
    source = (EXAMPLES / "ray08_full_example.py").read_text()
    result = cluster.run_script(source.replace("127.0.0.1:8000", "localhost:8000"), timeout=180)
    report = f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    assert result.returncode == 0, report
    lines = result.stdout.splitlines()
    url = f"http://localhost:{cluster.port}/echo"
    assert lines[:2] == [url, "hello"], report
    split = lines[2:12]
    assert set(split) <= {url, "something new"} and len(split) == 10, report
    assert lines[12].startswith("{") and "my_endpoint" in lines[12], report
