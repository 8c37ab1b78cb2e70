"""Application names become part of queue names: what the AMQP client refuses is refused at
`serve.run`, with a clear message, before anything is written."""

from __future__ import annotations

import pytest

from broker_serve import serve
from broker_serve.schema import check_app_name


@pytest.mark.parametrize("name", ["default", "my-app_1", "team/app", "echo+3Av1", "v1.2@x#y,z"])
def test_names_a_queue_can_hold_are_accepted(name):
    check_app_name(name)


@pytest.mark.parametrize("name", ["", "a:b", "a b", "a%b", "a*b", "café", "a\nb"])
def test_other_names_are_refused(name):
    with pytest.raises(ValueError, match="invalid application name"):
        check_app_name(name)


@serve.deployment
def hello() -> str:
    return "hello"


def test_serve_run_refuses_a_name_its_queues_could_not_carry(cluster):
    with pytest.raises(ValueError, match="invalid application name 'a%b'"):
        serve.run(hello.bind(), name="a%b", route_prefix="/a")
    serve.run(hello.bind(), name="fine", route_prefix="/fine")
    assert "a%b" not in serve.status().applications
