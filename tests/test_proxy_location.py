"""Proxy locations: worker nodes run proxies as `--proxy` and the cluster's location say."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import requests

from broker_serve import serve

from .conftest import free_port
from .waiting import wait_for


@serve.deployment
class Hello:
    def __call__(self) -> str:
        return "hello"


def answers(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/", timeout=5).text == "hello"
    except requests.ConnectionError:
        return False


def start_node(cluster, node_id: str, *flags: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "broker_serve", "worker", "--node-id",
                             node_id, *flags], env=cluster.env, start_new_session=True)


def test_every_node_runs_a_proxy_and_disabled_stops_them(cluster):
    serve.start(proxy_location="EveryNode")
    serve.run(Hello.bind())
    assert answers(cluster.port)  # the head's own proxy
    every, flagged, never = free_port(), free_port(), free_port()
    nodes = [start_node(cluster, "every", "--proxy-port", str(every)),
             start_node(cluster, "never", "--no-proxy", "--proxy-port", str(never))]
    try:
        wait_for(lambda: answers(every))
        assert not answers(never)

        serve.start(http_options={"location": "HeadOnly"})
        wait_for(lambda: not answers(every))
        nodes.append(start_node(cluster, "flagged", "--proxy", "--proxy-port", str(flagged)))
        wait_for(lambda: answers(flagged))  # an operator's --proxy holds under HeadOnly

        serve.start(http_options={"location": "NoServer"})  # Ray 1.x's name for Disabled
        wait_for(lambda: not answers(flagged))
    finally:
        for node in nodes:
            os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            node.wait(60)
