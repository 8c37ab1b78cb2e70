"""Each chunk a StreamingResponse yields reaches the HTTP client as its own HTTP chunk, as in Ray.

The replica may carry several chunks in one reply event (`chunk_sizes`, docs/protocol.md,
"Chunking"); the proxy writes each as its own `http.response.body`. These tests read the
response at the level of HTTP/1.1 chunked framing, from a raw socket, so a proxy that joined
chunks (or a replica that lost their boundaries) fails them.
"""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor
from itertools import accumulate
from typing import Any

import pytest
import requests
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from broker_serve import serve
from broker_serve.settings import CHUNK_BYTES

from .test_protocol_foreign import ForeignClient, request_queue

app = FastAPI()


def expected_chunks(tag: str, n: int) -> list[bytes]:
    """Distinct contents and lengths, so a joined or split chunk cannot pass for another."""
    return [f"{tag}:{i};".encode() + b"x" * (i % 7) for i in range(n)]


@app.get("/tight")
async def tight(n: int, tag: str = "t") -> StreamingResponse:
    async def chunks() -> Any:
        for chunk in expected_chunks(tag, n):
            yield chunk  # no await between chunks: the replica joins them into few events

    return StreamingResponse(chunks(), media_type="application/octet-stream")


@app.get("/slow")
async def slow(n: int) -> StreamingResponse:
    async def chunks() -> Any:
        for chunk in expected_chunks("s", n):
            yield chunk
            await asyncio.sleep(0.01)

    return StreamingResponse(chunks(), media_type="text/plain")


@app.get("/big")
async def big() -> StreamingResponse:
    async def chunks() -> Any:
        yield b"head"
        yield b"b" * (2 * CHUNK_BYTES + CHUNK_BYTES // 2)
        yield b"tail"

    return StreamingResponse(chunks(), media_type="application/octet-stream")


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class Chunks:
    pass


def http_chunks(port: int, path: str, timeout: float = 30) -> list[bytes]:
    """GET `path` over a raw socket and return the body's HTTP chunks, as framed on the wire."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                     .encode())
        data = bytearray()
        while block := sock.recv(1 << 20):
            data += block
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"transfer-encoding: chunked" in head.lower(), head
    chunks, position = [], 0
    while True:
        line_end = rest.index(b"\r\n", position)
        size = int(rest[position:line_end].split(b";")[0], 16)
        if size == 0:
            assert rest[line_end:] == b"\r\n\r\n", "trailing bytes after the last chunk"
            return chunks
        start = line_end + 2
        chunks.append(rest[start:start + size])
        assert rest[start + size:start + size + 2] == b"\r\n", "a chunk's size is wrong"
        position = start + size + 2


@pytest.fixture
def deployed(cluster: Any) -> Any:
    serve.run(Chunks.bind(), name="chunks", route_prefix="/c")
    return cluster


def test_a_tight_loop_arrives_as_one_http_chunk_per_yield(deployed):
    n = 3000
    assert http_chunks(deployed.port, f"/c/tight?n={n}") == expected_chunks("t", n)


def test_requests_iter_content_sees_each_yield(deployed):
    with requests.get(f"{deployed.url}/c/tight?n=500", stream=True, timeout=30) as response:
        assert list(response.iter_content(chunk_size=None)) == expected_chunks("t", 500)


def test_slow_yields_arrive_one_chunk_each(deployed):
    assert http_chunks(deployed.port, "/c/slow?n=20") == expected_chunks("s", 20)


def test_concurrent_streams_each_get_exactly_their_own_chunks_in_order(deployed):
    n, streams = 400, 32

    def one(index: int) -> list[bytes]:
        return http_chunks(deployed.port, f"/c/tight?n={n}&tag=s{index}")

    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(one, range(streams)))
    for index, chunks in enumerate(results):
        assert chunks == expected_chunks(f"s{index}", n), f"stream {index}"


def test_a_chunk_over_a_mebibyte_is_cut_into_mebibyte_pieces_and_its_neighbours_kept(deployed):
    chunks = http_chunks(deployed.port, "/c/big")
    assert chunks[0] == b"head" and chunks[-1] == b"tail"
    assert [len(c) for c in chunks[1:-1]] == [CHUNK_BYTES, CHUNK_BYTES, CHUNK_BYTES // 2]
    assert b"".join(chunks[1:-1]) == b"b" * (2 * CHUNK_BYTES + CHUNK_BYTES // 2)


def test_the_reply_events_carry_joined_bytes_and_the_chunk_sizes(deployed):
    """A foreign caller reading only `body` gets every byte; `chunk_sizes` gives the chunks."""
    n = 3000
    client = ForeignClient()
    try:
        reply = client.http(request_queue(deployed.name, "chunks", "Chunks"), "GET", "/c/tight",
                            query_string=f"n={n}".encode(), root_path="/c")
    finally:
        client.close()
    wanted = expected_chunks("t", n)
    assert reply.response_body() == b"".join(wanted)
    carried: list[bytes] = []
    for event in reply.events:
        body, sizes = event.body.get("body", b""), event.body.get("chunk_sizes")
        if sizes is None:
            carried.extend([body] if body else [])
            continue
        assert sum(sizes) == len(body) and all(size > 0 for size in sizes), sizes
        ends = list(accumulate(sizes))
        carried.extend(body[end - size:end] for end, size in zip(ends, sizes))
    assert carried == wanted
    assert len(reply.events) < n / 10  # still joined: one message per millisecond at most
