"""http_options that shape the proxy: keep-alive and Starlette middlewares."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import requests
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from broker_serve import serve

from .broker_log import find_log
from .waiting import wait_for


@serve.deployment
def ok() -> str:
    return "ok"


def idle_close_after(port: int) -> float:
    """Seconds an idle keep-alive connection stays open after a response."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        response = sock.recv(65536)
        assert response.startswith(b"HTTP/1.1 200")
        answered = time.monotonic()
        while sock.recv(65536):
            pass
        return time.monotonic() - answered


def test_keep_alive_timeout_from_http_options(cluster):
    serve.start(http_options={"keep_alive_timeout_s": 1})
    serve.run(ok.bind())
    assert 0.8 <= idle_close_after(cluster.port) < 1.9


def test_keep_alive_environment_variable_wins(cluster, monkeypatch):
    monkeypatch.setenv("BROKER_SERVE_HTTP_KEEP_ALIVE_TIMEOUT_S", "3")
    serve.start(http_options={"keep_alive_timeout_s": 1})
    serve.run(ok.bind())
    assert 2.7 <= idle_close_after(cluster.port) < 4.5


def test_cors_middleware_runs_in_the_proxy(cluster):
    serve.start(http_options={"middlewares": [
        Middleware(CORSMiddleware, allow_origins=["https://example.com"], allow_methods=["*"]),
    ]})
    serve.run(ok.bind())
    simple = requests.get(cluster.url, headers={"Origin": "https://example.com"})
    assert simple.text == "ok"
    assert simple.headers["access-control-allow-origin"] == "https://example.com"
    preflight = requests.options(cluster.url, headers={
        "Origin": "https://example.com", "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 200
    assert "POST" in preflight.headers["access-control-allow-methods"]
    other = requests.get(cluster.url, headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_middleware_config_form_is_the_same(cluster):
    serve.start(http_options={"middlewares": [{
        "import_path": "starlette.middleware.cors:CORSMiddleware",
        "kwargs": {"allow_origins": ["*"]},
    }]})
    serve.run(ok.bind())
    answer = requests.get(cluster.url, headers={"Origin": "https://anywhere.example"})
    assert answer.headers["access-control-allow-origin"] == "*"


@serve.deployment
class Slow:
    async def __call__(self) -> str:
        import asyncio

        await asyncio.sleep(1.5)
        return "finished"


def test_sigterm_lets_in_flight_requests_finish(cluster):
    import json
    import os
    import signal
    import threading

    import redis as redis_client

    from .conftest import REDIS_URL

    rabbitmq_log = find_log() if os.environ.get("BROKER_SERVE_TEST_RABBITMQ_LOG") != "off" \
        else None
    serve.run(Slow.bind())
    client = redis_client.Redis.from_url(REDIS_URL)
    proxies = f"bs:{cluster.name}:proxies"
    [(raw_id, record)] = client.hgetall(proxies).items()
    proxy_id = raw_id.decode()
    pid = int(json.loads(record)["pid"])
    results: list[requests.Response] = []
    in_flight = threading.Thread(target=lambda: results.append(requests.get(cluster.url)))
    in_flight.start()
    time.sleep(0.5)
    log_start = rabbitmq_log.stat().st_size if rabbitmq_log is not None else 0
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.3)
    try:  # the proxy stopped accepting while it drains
        requests.get(cluster.url, timeout=2)
        accepted_new = True
    except requests.ConnectionError:
        accepted_new = False
    in_flight.join(10)
    assert results and results[0].text == "finished"
    assert not accepted_new
    # Then it shut down: it closed its AMQP connection itself (uvicorn's own signal handling
    # used to kill it first: "client unexpectedly closed TCP connection") and unregistered.
    try:
        if rabbitmq_log is not None:
            closing = wait_for(lambda: _closing_line(rabbitmq_log, log_start, cluster.name,
                                                     proxy_id), timeout=15)
            assert "[info]" in closing, closing
        assert wait_for(lambda: not client.hexists(proxies, proxy_id), timeout=15)
    finally:
        client.close()


def _closing_line(log: Path, start: int, cluster: str, proxy_id: str) -> str | None:
    """RabbitMQ's line on the proxy's connection closing, if it logged one since `start`."""
    name = f"broker-serve {cluster} proxy {proxy_id}"
    with log.open("rb") as handle:
        handle.seek(start)
        text = handle.read().decode("utf-8", "replace")
    for line in text.splitlines():
        if "closing AMQP connection" in line and name in line:
            return line
    return None
