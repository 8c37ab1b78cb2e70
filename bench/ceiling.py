"""The ceiling: the same no-op served directly by uvicorn + Starlette, one process.

Run as `python -m uvicorn bench.ceiling:app --loop uvloop --http httptools --no-access-log`.
It answers exactly what the broker-serve no-op deployment answers: `PlainTextResponse("ok")`.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route


async def noop(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/", noop), Route("/{path:path}", noop)])
