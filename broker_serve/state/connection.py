"""Redis clients made from a URL: the one place broker-serve creates them.

A plain URL (`redis://`, `rediss://`) names one Redis. A Sentinel URL names the sentinels that
watch a replicated Redis and the service they know it by:

    redis+sentinel://[user:password@]host1:26379,host2:26379/<service_name>[/<db>]

(`rediss+sentinel://` for TLS to the Redis nodes). Its client asks the sentinels for the
primary on every new connection, so after a failover it connects to the promoted replica. The
URL's user and password are the Redis nodes'; the sentinels' own password, if they have one,
is the query parameter `sentinel_password=`. Other query parameters are redis-py's connection
options, as a plain URL takes them (`?socket_timeout=3`, `?ssl_ca_certs=...`); they win over
the CA and client certificate of BROKER_SERVE_TLS_* (tls.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.sentinel import Sentinel

from ..tls import ClientTls

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme -> TLS
DEFAULT_SENTINEL_PORT = 26379

# A lost Redis shows as an error within seconds, so callers' retries and backoff take over;
# the health check finds a connection that died while idle before a command is sent on it.
TIMEOUTS: dict[str, Any] = {
    "socket_connect_timeout": 5, "socket_timeout": 10, "health_check_interval": 30,
}


@dataclass(frozen=True)
class SentinelAddress:
    """What a Sentinel URL says: where the sentinels are and how to reach the primary."""

    sentinels: list[tuple[str, int]]
    service_name: str
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def node_options(self) -> dict[str, Any]:
        """The Redis nodes' connection options."""
        credentials = {"username": self.username, "password": self.password}
        return {**TIMEOUTS, **{k: v for k, v in credentials.items() if v is not None},
                "db": self.db, "ssl": self.tls, **self.options}

    def sentinel_options(self) -> dict[str, Any]:
        """The sentinels' connection options: plain TCP, with the nodes' timeouts."""
        timeouts = {k: v for k, v in {**TIMEOUTS, **self.options}.items()
                    if k.startswith("socket_")}
        if self.sentinel_password is not None:
            timeouts["password"] = self.sentinel_password
        return timeouts


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0] in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelAddress:
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL (redis+sentinel:// or rediss+sentinel://): "
                         f"{parts.scheme}://...")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    path = [unquote(segment) for segment in parts.path.split("/") if segment]
    if not hosts or not 1 <= len(path) <= 2:
        raise ValueError("a Sentinel URL reads redis+sentinel://[user:password@]host:port[,"
                         "host:port...]/<service_name>[/<db>]")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"the database in a Sentinel URL is a number, not {path[1]!r}")
    query = {name: values[-1] for name, values in parse_qs(parts.query).items()}
    sentinel_password = query.pop("sentinel_password", None)
    return SentinelAddress(
        sentinels=[_host_and_port(host) for host in hosts.split(",")],
        service_name=path[0],
        db=int(path[1]) if len(path) == 2 else 0,
        tls=SENTINEL_SCHEMES[parts.scheme],
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_password=sentinel_password,
        options={name: _option(name, value) for name, value in query.items()},
    )


def async_client(url: str, tls: ClientTls | None = None) -> aioredis.Redis:
    """An asyncio client of the Redis (or the Sentinel-watched primary) that `url` names;
    `tls` is the CA and client certificate of a `rediss://` URL, which the URL's own `ssl_*`
    options override."""
    tls_options = tls.redis_options(url) if tls is not None else {}
    if not is_sentinel_url(url):
        return aioredis.Redis.from_url(url, **TIMEOUTS, **tls_options)
    address = parse_sentinel_url(url)
    address = dataclasses.replace(address, options={**tls_options, **address.options})
    sentinel = AsyncSentinel(  # type: ignore[no-untyped-call]
        address.sentinels, sentinel_kwargs=address.sentinel_options())
    client = cast("_AsyncSentinelPrimary", sentinel.master_for(
        address.service_name, redis_class=_AsyncSentinelPrimary, **address.node_options()))
    client.sentinel_manager = sentinel
    return client


def sync_client(url: str, tls: ClientTls | None = None, **timeouts: float) -> redis.Redis:
    """A blocking client of the Redis (or the Sentinel-watched primary) that `url` names;
    `tls` as `async_client`'s, and `timeouts` replace TIMEOUTS' (a health check's must be
    short)."""
    tls_options = tls.redis_options(url) if tls is not None else {}
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **{**TIMEOUTS, **timeouts, **tls_options})
    address = parse_sentinel_url(url)
    address = dataclasses.replace(address,
                                  options={**timeouts, **tls_options, **address.options})
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        address.sentinels, sentinel_kwargs=address.sentinel_options())
    client = cast("_SentinelPrimary", sentinel.master_for(  # type: ignore[no-untyped-call]
        address.service_name, redis_class=_SentinelPrimary, **address.node_options()))
    client.sentinel_manager = sentinel
    return client


class _AsyncSentinelPrimary(aioredis.Redis):
    """The primary's client; closing it closes its clients of the sentinels too, which
    `Sentinel` leaves to whoever made it."""

    sentinel_manager: AsyncSentinel

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        try:
            await super().aclose(close_connection_pool)
        finally:
            await self.sentinel_manager.aclose()


class _SentinelPrimary(redis.Redis):
    """The blocking counterpart of `_AsyncSentinelPrimary`."""

    sentinel_manager: Sentinel

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.sentinel_manager.close()


def _host_and_port(address: str) -> tuple[str, int]:
    parts = urlsplit(f"//{address}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"a sentinel's address reads host[:port], not {address!r}") from exc
    if not parts.hostname:
        raise ValueError(f"a sentinel's address reads host[:port], not {address!r}")
    return unquote(parts.hostname), port or DEFAULT_SENTINEL_PORT


def _option(name: str, value: str) -> Any:
    """A connection option from the query, typed as redis-py types a plain URL's."""
    parser = cast("Callable[[str], Any] | None", URL_QUERY_ARGUMENT_PARSERS.get(name))
    try:
        return parser(value) if parser else value
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid value for {name!r} in the Redis URL") from exc
