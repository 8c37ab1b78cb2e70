"""WebSockets through the proxy, pinned to one replica, frames carried over queues."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from broker_serve import serve

app = FastAPI()


@serve.deployment
@serve.ingress(app)
class EchoServer:  # the seed's example, plus a marker file and a pid
    def __init__(self, markers: str = "") -> None:
        self.markers = Path(markers) if markers else None

    @app.websocket("/")
    async def echo(self, ws: WebSocket):
        await ws.accept()

        try:
            while True:
                message = await ws.receive()
                if message.get("text") == "pid":
                    await ws.send_text(str(os.getpid()))
                elif message.get("bytes") is not None:
                    await ws.send_bytes(message["bytes"])
                elif message.get("text") is not None:
                    await ws.send_text(message["text"])
                else:
                    raise WebSocketDisconnect(message.get("code", 1000))
        except WebSocketDisconnect:
            print("Client disconnected.")
            if self.markers:
                (self.markers / "disconnected").touch()


def ws_url(cluster) -> str:
    return f"ws://127.0.0.1:{cluster.port}/"


def test_seed_echo_example_and_large_frames(cluster):
    serve.run(EchoServer.bind())
    with connect(ws_url(cluster), max_size=2 ** 24) as websocket:
        websocket.send("Eureka!")
        assert websocket.recv() == "Eureka!"

        websocket.send("I've found it!")
        assert websocket.recv() == "I've found it!"

        big_text = "x" * 100_000
        websocket.send(big_text)
        assert websocket.recv() == big_text
        big_binary = os.urandom(1024 * 1024)
        websocket.send(big_binary)
        assert websocket.recv() == big_binary


def test_client_disconnect_raises_in_the_handler(cluster, tmp_path):
    serve.run(EchoServer.bind(str(tmp_path)))
    with connect(ws_url(cluster)) as websocket:
        websocket.send("hello")
        assert websocket.recv() == "hello"
    deadline = time.monotonic() + 10
    while not (tmp_path / "disconnected").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "disconnected").exists(), "WebSocketDisconnect never reached the handler"


def test_replica_death_closes_the_client_with_1011(cluster):
    serve.run(EchoServer.options(num_replicas=2).bind())
    with connect(ws_url(cluster)) as websocket:
        websocket.send("pid")
        pid = int(websocket.recv())
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ConnectionClosed) as closed:
            websocket.send("anyone there?")
            websocket.recv(timeout=15)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
