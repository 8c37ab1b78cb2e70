"""Smoke tests of the chaos infrastructure: a 3-node RabbitMQ cluster that loses a node, and the
TCP balancer that loses a backend. Both run against real processes."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pika
import pytest

from .rabbit_cluster import RabbitCluster
from .tcp_balancer import TcpBalancer

MESSAGES = 200


@pytest.fixture
def rabbit_cluster() -> Iterator[RabbitCluster]:
    with RabbitCluster(size=3) as cluster:
        yield cluster


def connect(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


def publish_confirmed(url: str, queue: str, bodies: list[bytes]) -> None:
    connection = connect(url)
    channel = connection.channel()
    channel.confirm_delivery()
    persistent = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
    for body in bodies:
        # With confirms on, a nack or an unroutable message raises here.
        channel.basic_publish("", queue, body, persistent, mandatory=True)
    connection.close()


def consume_all(url: str, queue: str, count: int, timeout: float) -> list[bytes]:
    connection = connect(url)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=50)
    received: list[bytes] = []
    deadline = time.monotonic() + timeout
    for method, _, body in channel.consume(queue, inactivity_timeout=1):
        if method is not None:
            received.append(body)
            channel.basic_ack(method.delivery_tag)
        if len(received) == count or time.monotonic() > deadline:
            break
    channel.cancel()
    remaining = channel.queue_declare(queue, passive=True).method.message_count
    connection.close()
    assert remaining == 0, f"{remaining} messages left in {queue}"
    return received


@pytest.mark.rabbit_cluster
@pytest.mark.slow
@pytest.mark.timeout(90)
def test_quorum_queue_survives_a_killed_node(rabbit_cluster: RabbitCluster) -> None:
    node_a, node_b, node_c = rabbit_cluster.amqp_urls
    assert sorted(rabbit_cluster.running_nodes(0)) == sorted(rabbit_cluster.node_names)
    queue = f"bs-chaos-smoke-{secrets.token_hex(4)}"
    declaring = connect(node_a)
    declaring.channel().queue_declare(queue, durable=True,
                                      arguments={"x-queue-type": "quorum"})
    declaring.close()
    bodies = [f"message {number}".encode() for number in range(MESSAGES)]
    publish_confirmed(node_b, queue, bodies)

    rabbit_cluster.kill(0)
    assert rabbit_cluster.node_names[0] not in rabbit_cluster.running_nodes(2)
    assert sorted(consume_all(node_c, queue, MESSAGES, timeout=30)) == sorted(bodies)

    rabbit_cluster.start(0)
    assert sorted(rabbit_cluster.running_nodes(0)) == sorted(rabbit_cluster.node_names)


class NamedServer:
    """A tiny HTTP server on a thread that answers every GET with its own name."""

    def __init__(self, name: str) -> None:
        body = name.encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = ("127.0.0.1", self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def named_servers() -> Iterator[list[NamedServer]]:
    servers = [NamedServer("first"), NamedServer("second")]
    yield servers
    for server in servers:
        if server.thread.is_alive():
            server.stop()


def test_balancer_alternates_and_skips_a_dead_backend(named_servers: list[NamedServer]) -> None:
    first, second = named_servers
    with TcpBalancer([first.address, second.address]) as balancer:
        url = f"http://127.0.0.1:{balancer.port}/"
        # A new connection per request: the balancer picks a backend per connection.
        answers = [httpx.get(url, timeout=5).text for _ in range(4)]
        assert answers in (["first", "second"] * 2, ["second", "first"] * 2)

        first.stop()
        answers = [httpx.get(url, timeout=5).text for _ in range(4)]
        assert answers == ["second"] * 4
        assert balancer.routed[-4:] == [second.address] * 4
