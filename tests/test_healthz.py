"""`/-/healthz` of the proxy, as Ray's proxy answers it, and the container health check on it.

Ray's proxy answers 503 "Route table is not populated yet." until its route table has held a
route, then 200 "success"; an application without a route prefix does not count, and deleting
the last application does not turn it back (the flag is set once). deploy/healthcheck.py counts
that 503 as alive, so a cluster with no application still has healthy proxy containers.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from broker_serve import serve
from broker_serve.proxy.http import NO_ROUTES_MESSAGE

from .conftest import ROOT, free_port
from .waiting import wait_for

HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"


@serve.deployment
def answer() -> str:
    return "here"


def healthz(url: str) -> requests.Response:
    return requests.get(f"{url}/-/healthz", timeout=10)


def container_healthy(port: int, env: dict[str, str] | None = None) -> bool:
    check = subprocess.run([sys.executable, str(HEALTHCHECK), "proxy", str(port)], env=env,
                           capture_output=True, text=True, timeout=30)
    assert check.returncode in (0, 1), check.stderr
    return check.returncode == 0


def listening(url: str) -> bool:
    try:
        healthz(url)
    except requests.ConnectionError:
        return False
    return True


def test_healthz_is_503_until_a_route_exists_then_stays_200(cluster):
    serve.start()
    wait_for(lambda: listening(cluster.url), timeout=30)
    empty = healthz(cluster.url)
    assert (empty.status_code, empty.text) == (503, NO_ROUTES_MESSAGE)
    assert empty.headers["content-type"].startswith("text/plain")
    assert container_healthy(cluster.port, cluster.env)  # alive, just nothing to route

    serve.run(answer.bind(), name="hidden", route_prefix=None)  # no route: still not ready
    hidden = healthz(cluster.url)
    assert (hidden.status_code, hidden.text) == (503, NO_ROUTES_MESSAGE)

    serve.run(answer.bind(), name="shown", route_prefix="/shown")  # returns once routed
    ready = healthz(cluster.url)
    assert (ready.status_code, ready.text) == (200, "success")
    assert container_healthy(cluster.port, cluster.env)

    serve.delete("shown")
    serve.delete("hidden")
    assert requests.get(f"{cluster.url}/shown", timeout=10).status_code == 404
    after = healthz(cluster.url)
    assert (after.status_code, after.text) == (200, "success")


class _Answer(BaseHTTPRequestHandler):
    status, text = 200, "success"

    def do_GET(self) -> None:
        body = self.text.encode()
        self.send_response(self.status)
        self.send_header("content-type", "text/plain; charset=utf-8")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_proxy() -> Iterator[tuple[int, type[_Answer]]]:
    """An HTTP server that answers /-/healthz as told, to drive each branch of the check."""
    handler = type("Answer", (_Answer,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize(("status", "text", "healthy"), [
    (200, "success", True),
    (503, NO_ROUTES_MESSAGE, True),
    (503, "RabbitMQ connection is down", False),
    (500, "Internal Server Error", False),
])
def test_container_health_check_reads_the_answer(fake_proxy, status, text, healthy):
    port, handler = fake_proxy
    handler.status, handler.text = status, text
    assert container_healthy(port) is healthy


def test_container_health_check_fails_when_nothing_listens():
    assert not container_healthy(free_port())
