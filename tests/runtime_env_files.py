"""What runtime_env tests serve and install: zip archives made in the test, a loopback HTTP
server for them, and a small pure-Python wheel."""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def zip_of(files: dict[str, str | bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


@dataclass
class FileServer:
    """Serves `files` by path on 127.0.0.1, counting the requests for each."""

    port: int
    files: dict[str, bytes] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@contextmanager
def file_server() -> Iterator[FileServer]:
    served = FileServer(0)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served.hits[self.path] += 1
            body = served.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/zip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    served.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()


def pure_python_wheel(directory: Path, name: str, version: str, module_source: str) -> Path:
    """A wheel of one module, `name`, as pip installs it (PEP 427)."""
    dist = f"{name}-{version}"
    files = {
        f"{name}.py": module_source.encode(),
        f"{dist}.dist-info/METADATA": (f"Metadata-Version: 2.1\nName: {name}\n"
                                        f"Version: {version}\n").encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: "
                                   b"true\nTag: py3-none-any\n",
    }
    records = []
    for path, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=")
        records.append(f"{path},sha256={digest.decode()},{len(content)}")
    records.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(records) + "\n").encode()
    wheel = directory / f"{dist}-py3-none-any.whl"
    wheel.write_bytes(zip_of(files))  # type: ignore[arg-type]
    return wheel
