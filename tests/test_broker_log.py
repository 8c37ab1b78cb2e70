"""The RabbitMQ log oracle sees a channel error, and names the connection that caused it."""

from __future__ import annotations

import pika
import pytest

from .broker_log import EXPECTED_PREFIX, BrokerLog
from .conftest import AMQP_URL
from .waiting import wait_for


def test_a_channel_error_is_read_from_the_log_with_its_connection_name(
        broker_log: BrokerLog | None) -> None:
    if broker_log is None:
        pytest.skip("the RabbitMQ log is not read here (BROKER_SERVE_TEST_RABBITMQ_LOG=off)")
    name = f"{EXPECTED_PREFIX} oracle self-test"
    params = pika.URLParameters(AMQP_URL)
    params.client_properties = {"connection_name": name}
    connection = pika.BlockingConnection(params)
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker):
            connection.channel().queue_declare("bs-test-no-such-queue", passive=True)
    finally:
        connection.close()
    errors = wait_for(broker_log.read, timeout=10)
    assert [(e.kind, e.connection, e.expected) for e in errors] == [("channel", name, True)]
    assert "no queue 'bs-test-no-such-queue'" in errors[0].detail
