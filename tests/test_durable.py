"""Durable mode (docs/architecture.md, "Durable mode"): quorum request queues, persistent
requests published with confirms and published again when a node is lost before it confirmed,
and what quorum queues rule out (a channel-wide prefetch, priorities)."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pika
import pytest
import redis
import requests
from starlette.requests import Request

from broker_serve import serve
from broker_serve.config import DeploymentConfig
from broker_serve.transport.broker import Broker, ReplyRouter, connection_name

from .conftest import AMQP_URL, REDIS_URL
from .faults import TcpFaultProxy


@serve.deployment(queue_type="quorum", max_ongoing_requests=4)
class Models:
    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        return model_id.upper()

    async def __call__(self, request: Request) -> str:
        await asyncio.sleep(0.02)
        return await self.get_model(serve.get_multiplexed_model_id())


def test_a_multiplexed_deployment_on_a_quorum_queue_serves_without_affinity(cluster):
    """Quorum queues refuse a channel-wide prefetch (RabbitMQ closes the connection), which
    model affinity needs, and an affinity queue would live on one node: a durable multiplexed
    deployment's replicas consume the quorum queue alone, and nothing is routed to a replica's
    own queue. The broker-log oracle fails this test on any channel or connection error."""
    serve.run(Models.bind())
    arguments = json.loads(redis.Redis.from_url(REDIS_URL).hget(
        f"bs:{cluster.name}:queue_arguments", f"bs.{cluster.name}.default.Models"))
    assert arguments["x-queue-type"] == "quorum"

    def ask(n: int) -> str:
        model = f"m{n % 3}"
        answer = requests.get(cluster.url, headers={"serve_multiplexed_model_id": model},
                              timeout=30)
        assert answer.status_code == 200, answer.text
        return answer.text

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, range(256)))
    assert answers == [f"M{n % 3}" for n in range(256)]
    # No replica declared an affinity queue. Listed, not declared passively: a passive
    # declare of a missing queue is a channel error in RabbitMQ's log.
    replicas = redis.Redis.from_url(REDIS_URL).hkeys(f"bs:{cluster.name}:replicas")
    assert replicas
    listed = subprocess.run(["rabbitmqctl", "list_queues", "--quiet", "--no-table-headers",
                             "name"], capture_output=True, text=True, check=True,
                            timeout=60).stdout.split()
    assert f"bs.{cluster.name}.default.Models" in listed
    assert [name for name in listed if name.startswith(f"bs.{cluster.name}.affinity.")] == []


def test_order_by_deadline_keeps_a_classic_queue():
    with pytest.raises(ValueError, match="order_by_deadline needs a classic queue"):
        DeploymentConfig(queue_type="quorum", order_by_deadline=True)
    from broker_serve.client.build import queue_type

    assert queue_type(DeploymentConfig(order_by_deadline=True), "quorum") == "classic"
    assert queue_type(DeploymentConfig(), "quorum") == "quorum"
    assert queue_type(DeploymentConfig(queue_type="classic"), "quorum") == "classic"


async def _publish_through_a_dying_node(queue: str) -> tuple[list[bool], list[str]]:
    with TcpFaultProxy("127.0.0.1", 5672) as first, TcpFaultProxy("127.0.0.1", 5672) as second:
        broker = Broker(f"amqp://guest:guest@127.0.0.1:{first.port},127.0.0.1:{second.port}/",
                        connection_name("durable", "test", secrets.token_hex(3)))
        await broker.connect()
        router = ReplyRouter(broker, f"bs.durable-test.reply.{secrets.token_hex(4)}")
        await router.start()
        try:
            assert broker.connection is not None
            dying = first if broker.connection.url.port == first.port else second
            ids = [f"durable-{n}" for n in range(40)]
            events = {i: router.register(i) for i in ids}

            async def publish(correlation_id: str) -> bool:
                return await broker.publish_request(
                    queue, correlation_id.encode(), bounded=False, durable=True,
                    events=events[correlation_id], deadline_ms=None, type="call",
                    correlation_id=correlation_id)

            publishing = [asyncio.create_task(publish(i)) for i in ids]
            await asyncio.sleep(0)
            dying.down()  # before or while they are confirmed
            accepted = await asyncio.wait_for(asyncio.gather(*publishing), 30)
            # none of them was failed by the lost connection: they were being published
            stale = [i for i, e in events.items() if len(e)]
            return accepted, stale
        finally:
            await broker.close()


def test_a_durable_publish_survives_the_loss_of_its_node():
    queue = f"bs.durable-test.{secrets.token_hex(4)}"
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    try:
        accepted, stale = asyncio.run(_publish_through_a_dying_node(queue))
        assert accepted == [True] * 40
        assert stale == []
        bodies = set()
        while (message := channel.basic_get(queue, auto_ack=True))[0] is not None:
            assert message[1].delivery_mode == 2  # persistent
            bodies.add(message[2].decode())
        # at least once: every request is in the queue, some perhaps twice
        assert bodies == {f"durable-{n}" for n in range(40)}
    finally:
        channel.queue_delete(queue)
        connection.close()
