"""The hot path's publish frames are byte-identical to what aiormq and pamqp produce."""

import pytest
from aiormq.abc import ChannelFrame
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader

from broker_serve.transport import frames


def reference(channel, routing_key, body, mandatory, exchange="", max_body_frame=0,
              **properties):
    publish = spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
    header = ContentHeader(body_size=len(body), properties=spec.Basic.Properties(
        delivery_mode=1, **properties))
    step = max_body_frame or len(body) or 1
    bodies = [ContentBody(body[i:i + step]) for i in range(0, len(body), step)]
    return ChannelFrame.marshall(channel, [publish, header, *bodies]).payload


CASES = [
    dict(message_type="start", correlation_id="vm-12-3", content_type="application/msgpack"),
    dict(message_type="http", correlation_id="proxy-1-99", message_id="proxy-1-99",
         reply_to="bs.c.reply.proxy-1", headers={"bs-version": 1},
         content_type="application/msgpack"),
    dict(message_type="call", correlation_id="x" * 128, message_id="x" * 128, reply_to="r",
         headers={"bs-version": 1, "bs-deadline": 1_795_000_000_123},
         content_type="application/msgpack", expiration="1500"),
    dict(message_type="body", correlation_id="é-ünïcode", content_type="application/msgpack"),
]


@pytest.mark.parametrize("properties", CASES)
@pytest.mark.parametrize("body", [b"", b"x", bytes(range(256)) * 100])
@pytest.mark.parametrize("mandatory", [True, False])
def test_publish_frames_match_pamqp(properties, body, mandatory):
    ours = frames.publish(7, "bs.c.app.Deployment", body, mandatory=mandatory, **properties)
    assert ours == reference(7, "bs.c.app.Deployment", body, mandatory, **properties)


def test_publish_to_a_named_exchange():
    properties = dict(message_type="cancel", correlation_id="c", content_type="application/msgpack")
    ours = frames.publish(3, "", b"ids", exchange="bs.c.cancel", **properties)
    assert ours == reference(3, "", b"ids", False, exchange="bs.c.cancel", **properties)


def test_names_longer_than_a_short_string_are_refused():
    with pytest.raises(ValueError):
        frames.publish(1, "q" * 256, b"", content_type="a", message_type="b",
                        correlation_id="c")


@pytest.mark.parametrize("headers", [
    {"bs-version": 1, "bs-published-us": 1_795_000_000_123_456, "bs-request-id": "abc-1"},
    {"bs-version": 1, "bs-deadline": 1_795_000_000_123, "bs-published-us": 1},
    {"a": -2 ** 31, "b": 2 ** 32 - 1, "c": 2 ** 32, "d": -2 ** 31 - 1, "e": True, "f": 1.5},
    {"nested": {"x": [1, "two"]}, "k" * 200: 1},
])
def test_header_tables_match_pamqp(headers):
    properties = dict(message_type="call", correlation_id="c", content_type="application/msgpack",
                      headers=headers)
    ours = frames.publish(1, "q", b"x", **properties)
    assert ours == reference(1, "q", b"x", False, **properties)


@pytest.mark.parametrize("size", [1, 999, 1000, 1001, 3000, 3001])
def test_a_body_longer_than_a_frame_is_cut_as_aiormq_cuts_it(size):
    properties = CASES[1]
    body = bytes(range(256)) * (size // 256 + 1)
    body = body[:size]
    ours = frames.publish(7, "q", body, max_body_frame=1000, **properties)
    assert ours == reference(7, "q", body, False, max_body_frame=1000, **properties)


@pytest.mark.parametrize("tag", [1, 255, 2 ** 32 + 7, 2 ** 63 - 1])
@pytest.mark.parametrize("flag", [True, False])
def test_settlements_match_pamqp(tag, flag):
    ack = spec.Basic.Ack(delivery_tag=tag, multiple=flag)
    reject = spec.Basic.Reject(delivery_tag=tag, requeue=flag)
    assert frames.ack(5, tag, flag) == ChannelFrame.marshall(5, [ack]).payload
    assert frames.reject(5, tag, flag) == ChannelFrame.marshall(5, [reject]).payload
