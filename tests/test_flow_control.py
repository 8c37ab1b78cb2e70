"""A slow client reading a fast stream: the replica pauses, the proxy does not buffer it."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import redis
from starlette.requests import Request
from starlette.responses import StreamingResponse

from broker_serve import serve

from .conftest import REDIS_URL

CHUNK = 1024 * 1024
TOTAL_CHUNKS = 64


@serve.deployment
class Firehose:
    def __init__(self, markers: str) -> None:
        self.produced = Path(markers) / "produced"

    async def __call__(self, request: Request) -> StreamingResponse:
        async def chunks():
            for i in range(TOTAL_CHUNKS):
                self.produced.write_text(str(i + 1))
                yield bytes([i % 256]) * CHUNK

        return StreamingResponse(chunks(), media_type="application/octet-stream")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def proxy_pid(cluster) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    records = client.hvals(f"bs:{cluster.name}:proxies")
    client.close()
    return int(json.loads(records[0])["pid"])


def test_slow_reader_pauses_the_stream_instead_of_filling_the_proxy(cluster, tmp_path):
    serve.run(Firehose.bind(str(tmp_path)))
    pid = proxy_pid(cluster)
    before = rss_mib(pid)
    with socket.create_connection(("127.0.0.1", cluster.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(3)  # the client reads nothing
        produced = int((tmp_path / "produced").read_text())
        grown = rss_mib(pid) - before
        # The window (2 MiB), a message in flight and the sockets' buffers: not the stream.
        assert produced <= 16, f"the replica ran {produced} MiB ahead of a stalled client"
        assert grown < 40, f"the proxy grew by {grown:.0f} MiB"
        received = 0
        sock.settimeout(30)
        while data := sock.recv(1 << 20):  # now read it all: nothing was lost
            received += len(data)
            if data.endswith(b"0\r\n\r\n"):
                break
    assert received > TOTAL_CHUNKS * CHUNK
    assert int((tmp_path / "produced").read_text()) == TOTAL_CHUNKS
