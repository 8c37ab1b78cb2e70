"""A minimal raw-asyncio HTTP/1.1 client: enough to time streams frame by frame and to hold
many streaming connections open cheaply. Only 127.0.0.1 is ever targeted."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

HOST = "127.0.0.1"
READ_BYTES = 256 * 1024


class HttpError(RuntimeError):
    pass


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    chunked: bool
    content_length: int | None
    _buffer: bytearray = field(default_factory=bytearray)
    _done: bool = False


class Connection:
    """One HTTP/1.1 connection to 127.0.0.1:port."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.response: Response | None = None

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, port, limit=4 * READ_BYTES)
        return cls(reader, writer)

    def send_request(self, method: str, path: str, body: bytes = b"",
                     headers: dict[str, str] | None = None) -> None:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", "User-Agent: broker-serve-bench"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.writer.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self.writer.write(body)

    async def read_head(self) -> Response:
        buffer = bytearray()
        while b"\r\n\r\n" not in buffer:
            data = await self.reader.read(READ_BYTES)
            if not data:
                raise HttpError("connection closed before the response head")
            buffer += data
            if len(buffer) > 1 << 20:
                raise HttpError("response head too large")
        head, rest = bytes(buffer).split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise HttpError(f"bad status line {status_line!r}")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self.response = Response(int(parts[1]), headers, chunked,
                                 int(length) if length is not None else None, bytearray(rest))
        return self.response

    async def read_frames(self) -> list[bytes] | None:
        """The chunked-encoding frames now available (waiting for at least one); None at the
        terminating zero-size frame."""
        response = self.response
        assert response is not None and response.chunked, "read_head() of a chunked response"
        if response._done:
            return None
        frames: list[bytes] = []
        buffer = response._buffer
        while True:
            position = 0
            while True:
                end = buffer.find(b"\r\n", position)
                if end < 0:
                    break
                size_text = bytes(buffer[position:end]).split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise HttpError(f"bad chunk size line {size_text!r}") from None
                if size == 0:
                    # The last frame: "0\r\n", trailers if any, then an empty line.
                    if buffer.find(b"\r\n\r\n", end) < 0:
                        break
                    response._done = True
                    del buffer[:]
                    return frames or None
                if len(buffer) < end + 2 + size + 2:
                    break
                frames.append(bytes(buffer[end + 2:end + 2 + size]))
                position = end + 2 + size + 2
            if position:
                del buffer[:position]
            if frames:
                return frames
            data = await self.reader.read(READ_BYTES)
            if not data:
                raise HttpError("connection closed inside a chunked body")
            buffer += data

    async def read_body(self) -> bytes:
        """The whole body of the current response."""
        response = self.response
        assert response is not None
        if response.chunked:
            parts = []
            while (frames := await self.read_frames()) is not None:
                parts.extend(frames)
            return b"".join(parts)
        if response.content_length is None:
            raise HttpError("response has neither content-length nor chunked encoding")
        buffer = response._buffer
        while len(buffer) < response.content_length:
            data = await self.reader.read(READ_BYTES)
            if not data:
                raise HttpError("connection closed inside the body")
            buffer += data
        body = bytes(buffer[:response.content_length])
        del buffer[:response.content_length]
        return body

    async def close(self) -> None:
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 5)
        except (TimeoutError, OSError):
            pass


@dataclass
class StreamTiming:
    status: int
    ttfc_s: float
    total_s: float
    frames: int
    bytes: int


async def time_stream(port: int, path: str, timeout_s: float) -> StreamTiming:
    """GET a chunked stream; time to the first body frame and to the terminating frame."""
    async def run() -> StreamTiming:
        connection = await Connection.open(port)
        try:
            start = time.perf_counter()
            connection.send_request("GET", path)
            response = await connection.read_head()
            if response.status != 200 or not response.chunked:
                body = await connection.read_body()
                raise HttpError(f"expected a 200 chunked stream, got {response.status}: "
                                f"{body[:200]!r}")
            first: float | None = None
            frames = size = 0
            while (batch := await connection.read_frames()) is not None:
                if first is None:
                    first = time.perf_counter()
                frames += len(batch)
                size += sum(len(frame) for frame in batch)
            end = time.perf_counter()
            return StreamTiming(response.status, (first or end) - start, end - start, frames,
                                size)
        finally:
            await connection.close()

    return await asyncio.wait_for(run(), timeout_s)


async def request(connection: Connection, method: str, path: str, body: bytes = b"",
                  timeout_s: float = 60) -> tuple[int, bytes]:
    """One request on a keep-alive connection: (status, body)."""
    async def run() -> tuple[int, bytes]:
        connection.send_request(method, path, body)
        await connection.writer.drain()
        response = await connection.read_head()
        return response.status, await connection.read_body()

    return await asyncio.wait_for(run(), timeout_s)


async def open_stream(port: int, path: str) -> Connection:
    """Open a streaming GET and read until its first body frame has arrived."""
    connection = await Connection.open(port)
    try:
        connection.send_request("GET", path)
        response = await connection.read_head()
        if response.status != 200 or not response.chunked:
            raise HttpError(f"expected a 200 chunked stream, got {response.status}")
        if await connection.read_frames() is None:
            raise HttpError("the stream ended before its first chunk")
    except BaseException:
        await connection.close()
        raise
    return connection
