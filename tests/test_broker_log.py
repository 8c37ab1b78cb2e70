"""The RabbitMQ log oracle reads channel and connection errors and names their connections.

The lines are RabbitMQ 3.10's own, as it logged them for the first wave's bugs, so the suite's
check needs no broker error of its own to prove it works.
"""

from __future__ import annotations

from pathlib import Path

from .broker_log import EXPECTED_PREFIX, BrokerLog

LOGGED = """\
2026-12-01 10:35:08.420000+00:00 [info] <0.896.0> accepting AMQP connection <0.896.0> (127.0.0.1:60958 -> 127.0.0.1:5672)
2026-12-01 10:35:08.421000+00:00 [info] <0.896.0> connection <0.896.0> (127.0.0.1:60958 -> 127.0.0.1:5672) has a client-provided name: broker-serve t1 replica default#Noop#XSmacW0v
2026-12-01 10:35:17.936344+00:00 [error] <0.941.0> Channel error on connection <0.896.0> (127.0.0.1:60958 -> 127.0.0.1:5672, vhost: '/', user: 'guest'), channel 5:
2026-12-01 10:35:17.936344+00:00 [error] <0.941.0> operation basic.ack caused a channel exception precondition_failed: unknown delivery tag 1185
2026-12-01 10:35:20.287482+00:00 [error] <0.896.0> Error on AMQP connection <0.896.0> (127.0.0.1:60958 -> 127.0.0.1:5672 - broker-serve t1 replica default#Noop#XSmacW0v, vhost: '/', user: 'guest', state: running), channel 5:
2026-12-01 10:35:20.287482+00:00 [error] <0.896.0>  operation basic.ack caused a connection exception channel_error: "expected 'channel.open'"
2026-12-01 10:39:02.870005+00:00 [info] <0.2421.0> connection <0.2421.0> (127.0.0.1:34758 -> 127.0.0.1:5672) has a client-provided name: test-expects-error probe
2026-12-01 10:39:02.871193+00:00 [error] <0.2430.0> Channel error on connection <0.2421.0> (127.0.0.1:34758 -> 127.0.0.1:5672, vhost: '/', user: 'guest'), channel 1:
2026-12-01 10:39:02.871193+00:00 [error] <0.2430.0> operation queue.declare caused a channel exception not_found: no queue 'x' in vhost '/'
2026-12-01 10:39:41.242065+00:00 [warning] <0.4220.0> client unexpectedly closed TCP connection
"""


def test_errors_are_read_with_the_name_of_their_connection(tmp_path: Path) -> None:
    path = tmp_path / "rabbit.log"
    path.write_text("")
    log = BrokerLog(path)
    with path.open("a") as file:
        file.write(LOGGED)
        file.write("2026-12-01 10:40:00.000000+00:00 [error] <0.5.0> Channel error on conn")
    errors = log.read()
    replica = "broker-serve t1 replica default#Noop#XSmacW0v"
    assert [(e.kind, e.connection, e.expected) for e in errors] == [
        ("channel", replica, False), ("connection", replica, False),
        ("channel", f"{EXPECTED_PREFIX} probe", True)]
    assert errors[0].detail.endswith("unknown delivery tag 1185")
    assert "expected 'channel.open'" in errors[1].detail
    assert log.read() == []  # the unfinished last line waits for its end
