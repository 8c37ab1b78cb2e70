"""The status page's endpoints: the page, its login form, its assets and its JSON.

    GET   /                          the page, or the login form without a valid cookie
    POST  /login                     form field `token`: sets the cookie, or the form again (401)
    POST  /logout                    drops the cookie
    GET   /static/{status.js,status.css}
    GET   /api/serve/overview/       the page's data (`overview.py`): the cookie or the bearer
                                     token, else 401

The cookie holds no token: it holds an HMAC of the token it signed in with, so a stolen cookie
reads this page and nothing else of the REST API, and removing that token from the list logs
its browsers out. It is
HttpOnly, SameSite=Strict, and Secure when the page is served over HTTPS. With
`BROKER_SERVE_STATUS_PAGE_PUBLIC=1` neither the page nor its JSON needs anything.
"""

from __future__ import annotations

import hashlib
import hmac
import html
from collections.abc import Sequence
from importlib import resources
from urllib.parse import parse_qs

import orjson
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from ...settings import Settings
from ...state.store import Store
from ..api_token import bearer_matches, presented, token_bytes, token_matches
from .overview import Overview, QueueDepths

OVERVIEW_PATH = "/api/serve/overview/"
STATIC_PREFIX = "/static/"
PATHS = frozenset({"/", "/login", "/logout", OVERVIEW_PATH})
MAX_FORM_BYTES = 16 * 1024
_SESSION_CONTEXT = b"broker-serve status page session"
_ASSETS = {"status.js": "text/javascript; charset=utf-8", "status.css": "text/css; charset=utf-8"}
_HEADERS = {
    # Scripts, styles and data come from here only: nothing the state holds can run.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; form-action 'self'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_WRONG_TOKEN = '<p class="error" role="alert">That is not the REST API token.</p>'


def handles(path: str) -> bool:
    """Whether the page answers this path itself (and checks who may see it)."""
    return path in PATHS or path.startswith(STATIC_PREFIX)


def _file(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


class StatusPage:
    def __init__(self, store: Store, settings: Settings, tokens: str | Sequence[str],
                 queue_depths: QueueDepths | None = None) -> None:
        self.public = settings.status_page_public
        self.overview = Overview(store, queue_depths)
        self._tokens = token_bytes(tokens)
        # One session value per token: a cookie lives as long as its token is listed.
        self._sessions = tuple(_session(token).encode() for token in self._tokens)
        # Cookies ignore ports: one name per cluster keeps two clusters on a host apart.
        self.cookie = f"broker_serve_status_{settings.cluster}"
        cluster = html.escape(settings.cluster)
        self._index = _file("index.html").replace("{{cluster}}", cluster)
        self._login = _file("login.html").replace("{{cluster}}", cluster)
        self._assets = {name: _file(name) for name in _ASSETS}

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.index, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route(OVERVIEW_PATH, self.data, methods=["GET"]),
            Route(STATIC_PREFIX + "{name}", self.asset, methods=["GET"]),
        ]

    def signed_in(self, request: Request) -> bool:
        if self.public:
            return True
        cookie = request.cookies.get(self.cookie, "")
        return token_matches(cookie.encode(), self._sessions) or \
            bearer_matches(request.headers.get("authorization", ""), self._tokens)

    async def index(self, request: Request) -> Response:
        if self.signed_in(request):
            return _html(self._index)
        return _html(self._login.replace("<!--error-->", ""))

    async def login(self, request: Request) -> Response:
        if self.public:
            return RedirectResponse("/", 303)
        given = await _form_field(request, "token")
        token = None if given is None else presented(given)
        if token is None or not token_matches(token, self._tokens):
            return _html(self._login.replace("<!--error-->", _WRONG_TOKEN), 401)
        response = RedirectResponse("/", 303, headers={"Cache-Control": "no-store"})
        response.set_cookie(self.cookie, _session(token), path="/", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        return response

    async def logout(self, request: Request) -> Response:
        response = RedirectResponse("/", 303, headers={"Cache-Control": "no-store"})
        response.delete_cookie(self.cookie, path="/", httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response

    async def data(self, request: Request) -> Response:
        if not self.signed_in(request):
            return Response(orjson.dumps({"detail": "sign in, or send the bearer token"}),
                            401, media_type="application/json",
                            headers={"WWW-Authenticate": 'Bearer realm="broker-serve"'})
        view = {**await self.overview.read(), "public": self.public}
        return Response(orjson.dumps(view), media_type="application/json", headers=_HEADERS)

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self._assets:
            return Response("not found", 404, media_type="text/plain")
        return Response(self._assets[name], media_type=_ASSETS[name],
                        headers={**_HEADERS, "Cache-Control": "no-cache"})


def _session(token: bytes) -> str:
    """The cookie's value for a browser signed in with this token."""
    return hmac.new(token, _SESSION_CONTEXT, hashlib.sha256).hexdigest()


def _html(page: str, status: int = 200) -> Response:
    return Response(page, status, media_type="text/html; charset=utf-8", headers=_HEADERS)


async def _form_field(request: Request, name: str) -> str | None:
    """One field of a URL-encoded form (the login's), or None."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return None
    values = parse_qs(body.decode("utf-8", "replace")).get(name)
    return values[0] if values else None
