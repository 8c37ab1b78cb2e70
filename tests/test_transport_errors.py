"""aio-pika's and aiormq's errors come out of the transport as ours (transport/errors.py)."""

from __future__ import annotations

import asyncio

import aiormq
import pytest

from broker_serve.exceptions import (
    BrokerServeError,
    ClusterUnavailable,
    PreconditionFailed,
    TransportError,
)
from broker_serve.transport.broker import Broker, connection_name
from broker_serve.transport.errors import map_amqp_errors, translate


@pytest.mark.parametrize(("theirs", "ours"), [
    (aiormq.exceptions.ChannelNotFoundEntity("NOT_FOUND - no queue 'q'"), TransportError),
    (aiormq.exceptions.ChannelPreconditionFailed("PRECONDITION_FAILED"), PreconditionFailed),
    (aiormq.exceptions.ConnectionClosed(320, "CONNECTION_FORCED"), ClusterUnavailable),
    (aiormq.exceptions.ChannelInvalidStateError("closed"), ClusterUnavailable),
    (ConnectionRefusedError(111, "refused"), ClusterUnavailable),
    (TimeoutError(), ClusterUnavailable),
])
def test_each_amqp_error_has_one_of_ours(theirs: Exception, ours: type[BrokerServeError]):
    translated = translate(theirs, "declare")
    assert type(translated) is ours
    assert isinstance(translated, BrokerServeError)
    assert str(translated).startswith("declare: ")


def test_map_amqp_errors_raises_ours_from_theirs():
    original = aiormq.exceptions.ChannelPreconditionFailed("inequivalent arg 'x-max-length'")
    with pytest.raises(PreconditionFailed, match="cannot declare q") as caught, \
            map_amqp_errors("cannot declare q"):
        raise original
    assert caught.value.__cause__ is original
    assert isinstance(caught.value, TransportError)


def test_map_amqp_errors_lets_other_errors_through():
    with pytest.raises(KeyError), map_amqp_errors("declare"):
        raise KeyError("not an AMQP error")


def test_an_unreachable_rabbitmq_raises_cluster_unavailable():
    broker = Broker("amqp://guest:guest@127.0.0.1:1/",  # nothing listens on port 1
                    connection_name("errors", "test", "unreachable"))
    with pytest.raises(ClusterUnavailable, match="cannot reach RabbitMQ at") as caught:
        asyncio.run(broker.connect())
    assert "guest:guest" not in str(caught.value)  # no password in the message
