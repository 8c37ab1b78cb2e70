"""Fixtures: every test gets its own cluster namespace on the real RabbitMQ and Redis.

`cluster` gives a namespace (name, free proxy port, environment) and cleans up after the test:
the applications are deleted, the local cluster stops, and every Redis key and RabbitMQ queue of
the namespace is removed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pika
import pytest
import redis

from .broker_log import BrokerLog, find_log

AMQP_URL = os.environ.get("BROKER_SERVE_AMQP_URL", "amqp://guest:guest@localhost:5672/")
REDIS_URL = os.environ.get("BROKER_SERVE_REDIS_URL", "redis://localhost:6379/0")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    name: str
    port: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run_script(self, source: str, timeout: float = 120, cwd: Path | None = None
                   ) -> subprocess.CompletedProcess[str]:
        """Run a driver script as a user would, in this namespace. The seed examples request
        localhost:8000; only that address is changed, to this cluster's port."""
        source = source.replace("localhost:8000", f"localhost:{self.port}")
        return subprocess.run([sys.executable, "-c", source], env=self.env, cwd=cwd or ROOT,
                              capture_output=True, text=True, timeout=timeout)


def cleanup_namespace(name: str) -> None:
    """Remove every Redis key and RabbitMQ queue and exchange of cluster `name`."""
    client = redis.Redis.from_url(REDIS_URL)
    queues = {f"bs.{name}.dead"}
    exchanges = {f"bs.{name}.cancel"}
    for key in (f"bs:{name}:apps", f"bs:{name}:app_status"):
        for app, record in client.hgetall(key).items():
            import orjson

            for dep in orjson.loads(record).get("deployments", {}):
                queues.add(f"bs.{name}.{app.decode()}.{dep}")
                exchanges.add(f"bs.{name}.to.{app.decode()}.{dep}")
    for replica_id in client.hkeys(f"bs:{name}:replicas"):
        queues.add(f"bs.{name}.affinity.{replica_id.decode()}")
    keys = list(client.scan_iter(match=f"bs:{name}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    for queue in queues:
        channel.queue_delete(queue)
    for exchange in exchanges:
        channel.exchange_delete(exchange)
    connection.close()


@pytest.fixture(scope="session")
def broker_log() -> Iterator[BrokerLog | None]:
    """RabbitMQ's log, read as an oracle (tests/broker_log.py). Set
    BROKER_SERVE_TEST_RABBITMQ_LOG=off where the broker's log cannot be read."""
    if os.environ.get("BROKER_SERVE_TEST_RABBITMQ_LOG") == "off":
        yield None
        return
    path = find_log()
    if path is None or not os.access(path, os.R_OK):
        pytest.exit("cannot read RabbitMQ's log (looked in /var/log/rabbitmq/): set "
                    "BROKER_SERVE_TEST_RABBITMQ_LOG to its path, or to 'off'", returncode=3)
    log = BrokerLog(path)
    yield log
    _fail_on_errors(log, "after the last test")


@pytest.fixture(autouse=True)
def no_broker_errors(broker_log: BrokerLog | None) -> Iterator[None]:
    """Fail the test if RabbitMQ logged a channel or connection error while it ran."""
    if broker_log is None:
        yield
        return
    broker_log.mark()
    yield
    _fail_on_errors(broker_log, "during this test")


def _fail_on_errors(log: BrokerLog, when: str) -> None:
    errors = [error for error in log.read() if not error.expected]
    if errors:
        listed = "\n".join(f"  {error}" for error in errors[:20])
        pytest.fail(f"RabbitMQ logged {len(errors)} channel or connection error(s) {when}:\n"
                    f"{listed}", pytrace=False)


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Cluster]:
    with namespace(monkeypatch, tmp_path) as created:
        yield created


@contextlib.contextmanager
def namespace(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Cluster]:
    """What `cluster` gives, for fixtures of a wider scope (with pytest.MonkeyPatch.context())."""
    name = f"t{secrets.token_hex(5)}"
    port = free_port()
    env = {
        "BROKER_SERVE_CLUSTER": name,
        "BROKER_SERVE_HTTP_PORT": str(port),
        # The controller's REST API, so that tests running at once do not share port 8265.
        "BROKER_SERVE_DASHBOARD_PORT": str(free_port()),
        # The worker node's /metrics, for the same reason (default 9500).
        "BROKER_SERVE_METRICS_PORT": str(free_port()),
        # A test may route the cluster through a fault injector by setting this first.
        "BROKER_SERVE_AMQP_URL": os.environ.get("BROKER_SERVE_AMQP_URL", AMQP_URL),
        "BROKER_SERVE_REDIS_URL": REDIS_URL,
        "BROKER_SERVE_STATE_DIR": str(tmp_path / "state"),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    created = Cluster(name, port, {**os.environ, **env})
    try:
        yield created
    finally:
        _shutdown_in_process()
        cleanup_namespace(name)


def _shutdown_in_process() -> None:
    """Stop what a test started through the serve API in this process."""
    from broker_serve.client import api
    from broker_serve.client.runtime import current_runtime, reset_runtime

    if current_runtime() is not None:
        try:
            api.shutdown()
        finally:
            reset_runtime()
    api._started_apps.clear()
