"""What a Ray Serve 0.8 backend gets as its first argument (`replica/backend.py`).

Ray 0.8 passed a `flask.Request` for a request over HTTP, and for a handle call a stand-in that
refuses to be read. `FlaskStyleRequest` gives the Flask attributes 0.8 programs read (`url` is
text, `args`, `data`, `get_json()`, `json`), from a Starlette request whose body was read
before the backend runs, so a sync backend reads it in its worker thread without awaiting.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.datastructures import Headers, QueryParams
from starlette.requests import Request

__all__ = ["FlaskStyleRequest", "NotWebRequest"]


class FlaskStyleRequest:
    """One HTTP request, as a 0.8 backend reads it (a subset of `flask.Request`)."""

    def __init__(self, request: Request, body: bytes) -> None:
        self.scope = request.scope
        self.method: str = request.method
        self.url = str(request.url)
        self.base_url = str(request.url.replace(query=""))  # Flask's: the URL without query
        self.path: str = request.url.path
        self.query_string: bytes = request.scope.get("query_string", b"")
        self.args: QueryParams = request.query_params
        self.headers: Headers = request.headers
        self.cookies: dict[str, str] = request.cookies
        self.remote_addr = request.client.host if request.client else None
        self.data = body

    @classmethod
    async def read(cls, request: Request) -> FlaskStyleRequest:
        return cls(request, await request.body())

    @property
    def mimetype(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    @property
    def is_json(self) -> bool:
        mimetype = self.mimetype
        return mimetype == "application/json" or (
            mimetype.startswith("application/") and mimetype.endswith("+json"))

    def get_data(self, as_text: bool = False) -> bytes | str:
        return self.data.decode("utf-8", errors="replace") if as_text else self.data

    def get_json(self, force: bool = False, silent: bool = False) -> Any:
        """The body parsed as JSON; None if it is not labelled JSON (unless `force`)."""
        if not (force or self.is_json):
            return None
        try:
            return orjson.loads(self.data)
        except orjson.JSONDecodeError:
            if silent:
                return None
            raise ValueError("the request body is not valid JSON") from None

    @property
    def json(self) -> Any:
        return self.get_json()

    def __repr__(self) -> str:
        return f"<FlaskStyleRequest {self.method} {self.url!r}>"


class NotWebRequest:
    """The first argument of a backend called from Python, as Ray 0.8 passed one: reading it
    fails with a message that says why."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(
            f"the request has no {name!r}: this call came from Python (a handle), not over "
            "HTTP. Check `serve.context.web` before reading the request.")

    def __repr__(self) -> str:
        return "<NotWebRequest: called from Python>"
