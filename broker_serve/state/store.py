"""The cluster's control state in Redis. The Store is the one object that talks to Redis: it
knows the key layout (`Names`) and the records' shapes (`records.py`), and its methods raise
broker-serve's errors, never redis's (`errors.py`).

Writers are split so that no record has two owners, but one:
- the driver (serve.run / REST) writes desired applications (`apps`, `spec:*`, `specs:*`),
  traffic records (`traffic`) and the HTTP options; a config's PUT also writes `deploy_config`
  and `app_builds`;
- the controller writes statuses, the route table, node assignments and queue arguments;
- a replica writes its own record and heartbeat, and its worker node marks the record FAILED or
  DEAD when the process exits: the one record with two writers (`update_replica`);
- a proxy and a worker node each write their own record and heartbeat.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, NamedTuple, Unpack, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential

from ..config import HTTPOptions, gRPCOptions
from ..exceptions import ClusterUnavailable, StateError, UntrustedPayload
from ..protocol import messages
from ..protocol.call_values import not_verified, sign, verifies
from ..protocol.names import Names
from ..schema import ServeDeploySchema
from ..tls import ClientTls
from . import connection
from .errors import translate_errors
from .jobs import JobStore
from .liveness import is_gone, stamp
from .records import (
    AppBuild,
    AppRecord,
    AppStatusRecord,
    Assignment,
    FailureRecord,
    NodeRecord,
    ProxyRecord,
    ReplicaChanges,
    ReplicaRecord,
    RouteTableRecord,
    TrafficRecord,
)

log = logging.getLogger("broker_serve.store")

HEARTBEAT_TTL_S = 10.0
# The status page's recent failures: the latest this many (`failures`).
FAILURES_KEPT = 50

# Deletes a key only if it still holds ARGV[1]: a lease or lock whose holder is known.
_DELETE_IF_HELD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The controller lease (KEYS[1]) for controller ARGV[1], for ARGV[2] ms: taken if free, or
# extended if ARGV[1] holds it, in one step, so that nobody ever extends another's lease.
# 1 if ARGV[1] holds it now, else 0.
_TAKE_OR_EXTEND_LEASE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# The same lease extended only if ARGV[1] holds it (never taken): 1 if extended, else 0.
_EXTEND_IF_HELD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# Deletes an application's specs, except those its current record names: decided and done in
# one step, so a spec written (with its record, atomically) by a deploy that comes back a
# moment later is never lost. KEYS: the `apps` hash, the app's spec index. ARGV: the app's
# name, the prefix of its spec keys. The spec keys come from the index, not from KEYS, which
# is fine on a single Redis (not on Redis Cluster).
_DELETE_UNNAMED_SPECS = """
local keep = {}
local record = redis.call('HGET', KEYS[1], ARGV[1])
if record then
  for deployment, dep in pairs(cjson.decode(record)['deployments'] or {}) do
    keep[ARGV[2] .. deployment .. ':' .. dep['version']] = true
  end
end
local deleted = 0
for _, key in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if not keep[key] then
    redis.call('DEL', key)
    redis.call('SREM', KEYS[2], key)
    deleted = deleted + 1
  end
end
return deleted
"""


# The metrics history (docs/protocol.md, "Metrics history"): one process's entry, added and
# the stream trimmed to the window by Redis' clock, in one step. KEYS: the stream, its meta
# hash. ARGV: the window while the cluster has none, the entry.
_APPEND_HISTORY = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local window = tonumber(redis.call('HGET', KEYS[2], 'window_s') or ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[2], 'since', string.format('%.0f', now))
end
redis.call('XADD', KEYS[1], 'MINID', '=', string.format('%.0f', now - window * 1000), '*',
           'd', ARGV[2])
redis.call('PEXPIRE', KEYS[1], string.format('%.0f', (window + 60) * 1000))
return 1
"""

# A new history window, applied at once. KEYS: the stream, its meta hash. ARGV: seconds.
_SET_HISTORY_WINDOW = """
redis.call('HSET', KEYS[2], 'window_s', ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 1 then
  local time = redis.call('TIME')
  local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
  local window = tonumber(ARGV[1])
  redis.call('XTRIM', KEYS[1], 'MINID', '=', string.format('%.0f', now - window * 1000))
  redis.call('PEXPIRE', KEYS[1], string.format('%.0f', (window + 60) * 1000))
end
return 1
"""

# The history's last ARGV[1] seconds (at most its window, ARGV[2] while unset), with Redis'
# time, the window and `since`, read at one instant. KEYS: the stream, its meta hash.
_READ_HISTORY = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local meta = redis.call('HMGET', KEYS[2], 'window_s', 'since')
local window = tonumber(meta[1] or ARGV[2])
local span = math.min(tonumber(ARGV[1]), window)
local entries = redis.call('XRANGE', KEYS[1], string.format('%.0f', now - span * 1000), '+')
return {string.format('%.0f', now), tostring(window), meta[2] or false, entries}
"""


def now() -> float:
    return time.time()


class HistoryRead(NamedTuple):
    """What `Store.history` read: Redis' time and the entries (id's milliseconds, data)."""

    now_ms: int
    window_s: float
    since_ms: int | None
    entries: list[tuple[int, bytes]]


class StateSnapshot:
    """The durable part of the state, as `Store.snapshot` read it (`controller/reseed.py`)."""

    def __init__(self) -> None:
        self.strings: dict[str, bytes] = {}
        self.hashes: dict[str, dict[bytes, bytes]] = {}
        self.sets: dict[str, set[bytes]] = {}

    def __bool__(self) -> bool:
        return bool(self.strings or self.hashes)


@translate_errors
class Store:
    def __init__(self, redis_url: str, cluster: str, tls: ClientTls | None = None) -> None:
        self.names = Names(cluster)
        # decode_responses=False: values are bytes (orjson reads them as they are).
        self._redis: aioredis.Redis = connection.async_client(redis_url, tls)
        self._delete_if_held = self._redis.register_script(_DELETE_IF_HELD)
        self._take_or_extend_lease = self._redis.register_script(_TAKE_OR_EXTEND_LEASE)
        self._extend_if_held = self._redis.register_script(_EXTEND_IF_HELD)
        self._delete_unnamed_specs = self._redis.register_script(_DELETE_UNNAMED_SPECS)
        self._append_history = self._redis.register_script(_APPEND_HISTORY)
        self._set_history_window = self._redis.register_script(_SET_HISTORY_WINDOW)
        self._read_history = self._redis.register_script(_READ_HISTORY)
        self.jobs = JobStore(self._redis, self.names)

    async def close(self) -> None:
        await self.jobs.close()
        await self._redis.aclose()

    async def ping(self) -> None:
        await self._redis.ping()

    # The cluster secret is the operator's (credentials.py), never in Redis: an older version's
    # copy is deleted.
    async def delete_legacy_secret(self) -> bool:
        """Delete the secret an older version kept in Redis; True if there was one."""
        return bool(await self._redis.delete(self.names.legacy_secret))

    # hashes of JSON records -------------------------------------------------------------------
    async def _get(self, key: str) -> bytes | None:
        return cast("bytes | None", await self._redis.get(key))

    async def _get_all(self, key: str) -> dict[str, Any]:
        raw = cast("dict[bytes, bytes]", await self._redis.hgetall(key))
        return {k.decode(): orjson.loads(v) for k, v in raw.items()}

    async def _get_one(self, key: str, field: str) -> Any:
        raw = cast("bytes | None", await self._redis.hget(key, field))
        return orjson.loads(raw) if raw else None

    async def _put(self, key: str, field: str, record: Any) -> None:
        await self._redis.hset(key, field, orjson.dumps(record))

    async def delete_field(self, key: str, *fields: str) -> None:
        if fields:
            await self._redis.hdel(key, *fields)

    # applications -----------------------------------------------------------------------------
    async def apps(self) -> dict[str, AppRecord]:
        return await self._get_all(self.names.apps)

    async def app(self, name: str) -> AppRecord | None:
        record: AppRecord | None = await self._get_one(self.names.apps, name)
        return record

    async def app_exists(self, name: str) -> bool:
        return bool(await self._redis.hexists(self.names.apps, name))

    async def put_app(self, record: AppRecord, specs: dict[str, bytes]) -> None:
        """Write an application's specs and its record in one transaction: a controller sees
        both or neither, so it never takes the specs for a deleted app's leftovers."""
        names, name = self.names, record["name"]
        async with self._redis.pipeline(transaction=True) as pipe:
            for key, blob in specs.items():
                # A version names one definition: the first stored. A hashed version's is the
                # same anyway; a user's `version=` keeps its replicas' code (build.py).
                pipe.set(key, blob, nx=True)
            if specs:
                pipe.sadd(names.spec_index(name), *specs)
            pipe.hset(names.apps, name, orjson.dumps(record))
            pipe.hdel(names.app_builds, name)  # a failed config build is superseded
            await pipe.execute()

    async def replace_app(self, record: AppRecord) -> None:
        """Rewrite an application's record, its specs unchanged (a scale)."""
        await self._put(self.names.apps, record["name"], record)

    async def delete_unnamed_specs(self, app: str) -> int:
        """Delete the app's specs that its record (if it has one again) does not name."""
        names = self.names
        deleted = await self._delete_unnamed_specs(
            keys=[names.apps, names.spec_index(app)], args=[app, names.key("spec", app) + ":"])
        return int(deleted)

    async def spec(self, app: str, deployment: str, version: str) -> bytes | None:
        return await self._get(self.names.spec(app, deployment, version))

    # runtime_env packages (docs/architecture.md, "Runtime environments") -------------------
    async def has_package(self, digest: str) -> bool:
        """Whether Redis holds the package; either way it counts as stored now, for pruning."""
        names = self.names
        await self._redis.zadd(names.packages, {digest: time.time()})
        return bool(await self._redis.exists(names.package(digest)))

    async def put_package(self, digest: str, archive: bytes) -> None:
        names = self.names
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.set(names.package(digest), archive, nx=True)
            pipe.zadd(names.packages, {digest: time.time()})
            await pipe.execute()

    async def package(self, digest: str) -> bytes | None:
        return await self._get(self.names.package(digest))

    async def packages_stored_before(self, when: float) -> list[str]:
        members = cast("list[bytes]", await self._redis.zrangebyscore(self.names.packages,
                                                                      "-inf", when))
        return [member.decode() for member in members]

    async def packages_in_specs(self) -> set[str]:
        """The digests of the packages that some stored spec names."""
        names, redis = self.names, self._redis
        apps = set(await self._hash_fields(names.apps)) | set(
            await self._hash_fields(names.key("app_status")))
        named: set[str] = set()
        for app in apps:
            for key in cast("set[bytes]", await redis.smembers(names.spec_index(app))):
                blob = await self._get(key.decode())
                if blob is not None:
                    named.update(messages.unpack(blob).get("packages", ()))
        return named

    async def delete_packages(self, digests: list[str]) -> None:
        if digests:
            names = self.names
            await self._redis.delete(*(names.package(digest) for digest in digests))
            await self._redis.zrem(names.packages, *digests)

    async def app_statuses(self) -> dict[str, AppStatusRecord]:
        return await self._get_all(self.names.key("app_status"))

    async def app_status(self, name: str) -> AppStatusRecord | None:
        status: AppStatusRecord | None = await self._get_one(self.names.key("app_status"), name)
        return status

    async def app_status_count(self) -> int:
        return int(await self._redis.hlen(self.names.key("app_status")))

    async def put_app_status(self, name: str, status: AppStatusRecord) -> None:
        await self._put(self.names.key("app_status"), name, status)

    # traffic records ---------------------------------------------------------------------------
    async def traffic(self) -> dict[str, TrafficRecord]:
        return await self._get_all(self.names.traffic)

    async def traffic_record(self, name: str) -> TrafficRecord | None:
        record: TrafficRecord | None = await self._get_one(self.names.traffic, name)
        return record

    async def put_traffic(self, record: TrafficRecord) -> None:
        await self._put(self.names.traffic, record["name"], record)

    async def delete_traffic(self, *names: str) -> int:
        """Delete traffic records; returns how many there were."""
        return int(await self._redis.hdel(self.names.traffic, *names)) if names else 0

    # declarative configs ------------------------------------------------------------------------
    async def app_builds(self) -> dict[str, AppBuild]:
        return await self._get_all(self.names.app_builds)

    async def put_app_build(self, name: str, build: AppBuild) -> None:
        await self._put(self.names.app_builds, name, build)

    async def deploy_config(self) -> ServeDeploySchema | None:
        """The config the REST API's last PUT applied, if any."""
        raw = await self._get(self.names.deploy_config)
        return ServeDeploySchema.model_validate_json(raw) if raw else None

    async def deploy_config_document(self) -> dict[str, Any] | None:
        """The stored config as written: only the fields its PUT set."""
        raw = await self._get(self.names.deploy_config)
        return orjson.loads(raw) if raw else None

    async def put_deploy_config(self, config: ServeDeploySchema | dict[str, Any]) -> None:
        """Store a config (only the fields it sets), or a document `deploy_config_document`
        read and changed."""
        blob = (config.model_dump_json(exclude_unset=True) if isinstance(config, ServeDeploySchema)
                else orjson.dumps(config))
        await self._redis.set(self.names.deploy_config, blob)

    async def forget_config(self) -> None:
        """Drop the stored config and the builds of its applications (a DELETE)."""
        await self._redis.delete(self.names.app_builds, self.names.deploy_config)

    async def take_lock(self, key: str, token: str, ttl_s: float) -> bool:
        return bool(await self._redis.set(key, token, nx=True, px=int(ttl_s * 1000)))

    async def release_lock(self, key: str, token: str) -> None:
        """Release a lock taken with `token`, unless it expired and another took it."""
        await self._delete_if_held(keys=[key], args=[token])

    # HTTP options -----------------------------------------------------------------------------
    async def http_options(self) -> HTTPOptions:
        """The cluster's HTTP options (`serve.start`, a config's PUT), or the defaults."""
        raw = await self._get(self.names.http_options)
        return HTTPOptions.model_validate_json(raw) if raw else HTTPOptions()

    async def put_http_options(self, options: HTTPOptions) -> None:
        await self._redis.set(self.names.http_options, options.model_dump_json())

    # gRPC options -----------------------------------------------------------------------------
    # They name the modules proxies and replicas import and the directories they import them
    # from, so the record is signed with the cluster secret and verified before anything of it
    # is imported (docs/architecture.md, "Trust"): Redis write access alone runs no code.
    async def displayed_grpc_options(self) -> gRPCOptions | None:
        """The stored gRPC options as they read, for the status API only: not verified, so
        nothing may import what they name."""
        raw = await self._get(self._grpc_options_key)
        if not raw:
            return None
        try:
            record = orjson.loads(orjson.loads(raw)["record"])
            record.pop("sys_path", None)
            return gRPCOptions.model_validate(record)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    async def grpc_options_and_paths(self, secret: bytes
                                     ) -> tuple[gRPCOptions, list[str]] | None:
        """The gRPC options and the directories the proxies import the servicer functions'
        modules from: the driver's paths (`serve.start`), or a config's app dir and
        working_dirs, as its replicas import from them. None: no gRPC. Raises
        UntrustedPayload if the record is unsigned or its signature does not verify."""
        raw = await self._get(self._grpc_options_key)
        if not raw:
            return None
        data, sig = _signed_parts(raw)
        if data is None or sig is None:
            raise UntrustedPayload("the stored grpc_options have no signature; refusing to "
                                   "import the modules they name. Store them again with "
                                   "serve.start(grpc_options=...) or a config's PUT")
        if not verifies(secret, self._grpc_options_domain + data, sig):
            raise UntrustedPayload(not_verified("the stored grpc_options", secret, "import"))
        record = orjson.loads(data)
        paths = record.pop("sys_path", [])
        return gRPCOptions.model_validate(record), [str(path) for path in paths]

    async def put_grpc_options(self, options: gRPCOptions, sys_path: list[str] | None,
                               secret: bytes) -> None:
        """Store the options signed; raises ClusterSecretMissing without a secret."""
        data = orjson.dumps({**options.model_dump(mode="json"), "sys_path": sys_path or []})
        sig = sign(secret, self._grpc_options_domain + data)
        await self._redis.set(self._grpc_options_key,
                              orjson.dumps({"record": data.decode(), "sig": sig.hex()}))

    @property
    def _grpc_options_domain(self) -> bytes:
        # What is signed starts with this: a signature of another kind of value, or another
        # cluster's options under the same secret, never verifies as these.
        return f"broker-serve grpc_options {self.names.cluster}\n".encode()

    @property
    def _grpc_options_key(self) -> str:
        return self.names.key("grpc_options")

    # routes -----------------------------------------------------------------------------------
    async def routes(self) -> RouteTableRecord:
        raw = await self._get(self.names.routes)
        table: RouteTableRecord = orjson.loads(raw) if raw else {"version": 0, "routes": {}}
        return table

    async def put_routes(self, table: RouteTableRecord) -> None:
        await self._redis.set(self.names.routes, orjson.dumps(table))

    # queues -----------------------------------------------------------------------------------
    async def queue_arguments(self, queue: str) -> dict[str, Any] | None:
        """The arguments this cluster last declared a request queue with."""
        arguments: dict[str, Any] | None = await self._get_one(self.names.queue_arguments, queue)
        return arguments

    async def put_queue_arguments(self, queue: str, arguments: dict[str, Any]) -> None:
        await self._put(self.names.queue_arguments, queue, arguments)

    async def delete_queue_arguments(self, queue: str) -> None:
        await self._redis.hdel(self.names.queue_arguments, queue)

    # replicas and their placement -------------------------------------------------------------
    async def replicas(self) -> dict[str, ReplicaRecord]:
        return await self._get_all(self.names.replicas)

    async def replica(self, replica_id: str) -> ReplicaRecord | None:
        record: ReplicaRecord | None = await self._get_one(self.names.replicas, replica_id)
        return record

    async def put_replica(self, record: ReplicaRecord) -> None:
        await self._put(self.names.replicas, record["replica_id"], record)

    async def update_replica(self, replica_id: str, /, **changes: Unpack[ReplicaChanges]) -> None:
        """Set some fields of a replica record, keeping the others (it is created if missing).

        The replica and its worker node both write the record, so the read, merge and write
        run as one optimistic transaction (WATCH/MULTI), retried if another write to
        `replicas` came between: neither writer loses the other's fields. The record stays one
        JSON value in the hash, which readers take with one HGETALL; a Lua merge would
        re-encode the record's numbers through cjson, which keeps 14 digits. These writes are
        rare (a replica's state changes), so retries are too.
        """
        key = self.names.replicas

        async def merge(pipe: Any) -> None:
            raw = await pipe.hget(key, replica_id)
            record = orjson.loads(raw) if raw else {}
            record.update(changes)
            pipe.multi()
            pipe.hset(key, replica_id, orjson.dumps(record))

        await self._redis.transaction(merge, key)

    async def assignments(self, node_id: str) -> dict[str, Assignment]:
        return await self._get_all(self.names.node_assignments(node_id))

    async def assigned_replica_ids(self, node_id: str) -> list[str]:
        return await self._hash_fields(self.names.node_assignments(node_id))

    async def put_assignment(self, node_id: str, replica_id: str, assignment: Assignment) -> None:
        await self._put(self.names.node_assignments(node_id), replica_id, assignment)

    async def drop_assignments(self, node_id: str) -> None:
        await self._redis.delete(self.names.node_assignments(node_id))

    # nodes and proxies ------------------------------------------------------------------------
    async def nodes(self) -> dict[str, NodeRecord]:
        return await self._get_all(self.names.nodes)

    async def put_node(self, record: NodeRecord) -> None:
        await self._put(self.names.nodes, record["node_id"], record)

    async def deregister_node(self, node_id: str) -> None:
        """A worker node that stops: its record, heartbeat and assignments go."""
        names = self.names
        await self._redis.hdel(names.nodes, node_id)
        await self._redis.delete(names.node_alive(node_id), names.node_assignments(node_id))

    async def proxies(self) -> dict[str, ProxyRecord]:
        return await self._get_all(self.names.proxies)

    async def put_proxy(self, record: ProxyRecord) -> None:
        await self._put(self.names.proxies, record["proxy_id"], record)

    # recent failures (the status page) ----------------------------------------------------
    async def add_failure(self, record: FailureRecord, keep: int = FAILURES_KEPT) -> None:
        """Record a failure, keeping only the latest `keep`, in one transaction."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.lpush(self.names.failures, orjson.dumps(record))
            pipe.ltrim(self.names.failures, 0, keep - 1)
            await pipe.execute()

    async def failures(self) -> list[FailureRecord]:
        """The recorded failures, newest first."""
        raw = cast("list[bytes]", await self._redis.lrange(self.names.failures, 0, -1))
        return [orjson.loads(entry) for entry in raw]

    # redeliveries and cancellations -------------------------------------------------------------
    async def count_redelivery(self, correlation_id: str, ttl_s: float) -> tuple[int, int]:
        """Count one more redelivery of a request: (redeliveries, those released by live
        replicas). One round trip."""
        key = self.names.deliveries(correlation_id)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, "redelivered", 1)
            pipe.hget(key, "released")
            pipe.expire(key, int(ttl_s))
            redelivered, released, _ = await pipe.execute()
        return int(redelivered), int(released or 0)

    async def count_released(self, correlation_ids: list[str], ttl_s: float) -> None:
        """Write down requests a live replica gives back to RabbitMQ unfinished."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for correlation_id in correlation_ids:
                key = self.names.deliveries(correlation_id)
                pipe.hincrby(key, "released", 1)
                pipe.expire(key, int(ttl_s))
            await pipe.execute()

    async def add_tombstones(self, ids: list[str], expires_ms: int) -> None:
        await self._redis.zadd(self.names.tombstones, {i: expires_ms for i in ids})

    async def live_tombstones(self, now_ms: int) -> dict[str, int]:
        """Cancelled request ids that have not expired by `now_ms`, with their expiry."""
        live = cast("list[tuple[bytes, float]]", await self._redis.zrangebyscore(
            self.names.tombstones, now_ms, "+inf", withscores=True))
        return {member.decode(): int(score) for member, score in live}

    async def prune_tombstones(self, now_ms: int) -> None:
        await self._redis.zremrangebyscore(self.names.tombstones, "-inf", now_ms)

    # the metrics history ------------------------------------------------------------------
    async def append_history(self, entry: bytes, default_window_s: float) -> None:
        """Add one process's entry, trimming the stream to the history window."""
        await self._append_history(keys=[self.names.history, self.names.history_meta],
                                   args=[repr(default_window_s), entry])

    async def set_history_window(self, seconds: float) -> None:
        await self._set_history_window(keys=[self.names.history, self.names.history_meta],
                                       args=[repr(seconds)])

    async def history(self, span_s: float, default_window_s: float) -> HistoryRead:
        """The entries of the last `span_s` seconds, at most the history window."""
        now_ms, window, since, entries = await self._read_history(
            keys=[self.names.history, self.names.history_meta],
            args=[repr(span_s), repr(default_window_s)])
        return HistoryRead(int(now_ms), float(window), int(since) if since else None,
                           [(int(entry_id.split(b"-")[0]), dict(_pairs(fields))[b"d"])
                            for entry_id, fields in entries])

    # liveness ---------------------------------------------------------------------------------
    async def heartbeat(self, key: str, value: str | None = None,
                        ttl_s: float = HEARTBEAT_TTL_S) -> None:
        """Say this process lives; `value` (default: the process's stamp, which lets a reader
        on the same machine see at once that it died, `liveness.py`) is for whoever reads it."""
        await self._redis.set(key, value or stamp(), px=int(ttl_s * 1000))

    async def drop_heartbeat(self, key: str) -> None:
        """A process that stops says so at once, rather than when its heartbeat expires."""
        await self._redis.delete(key)

    async def alive(self, keys: list[str]) -> list[bool]:
        """Whether each heartbeat is current and its writer not provably gone."""
        return [value is not None and not is_gone(value) for value in await self.heartbeats(keys)]

    async def heartbeats(self, keys: list[str]) -> list[bytes | None]:
        """The value of each heartbeat key, None where it expired."""
        return cast("list[bytes | None]", await self._redis.mget(keys)) if keys else []

    # the controller's lease -------------------------------------------------------------------
    async def lease_holder(self) -> str | None:
        """The id of the controller holding the lease, or None.

        A holder that provably died (a controller of this machine that was killed) gives the
        lease up at once, so that nobody waits up to the lease's TTL for a dead controller.
        """
        key = self.names.controller_lease
        holder = await self._get(key)
        if holder is None:
            return None
        holder_id = holder.decode()
        if is_gone(await self._get(self.names.controller_alive(holder_id))):
            if await self._delete_if_held(keys=[key], args=[holder]):
                log.info("controller %s is gone; its lease is released", holder_id)
            return None
        return holder_id

    async def lease_value(self) -> str | None:
        """The lease's holder as stored, dead or alive (no check, no release)."""
        holder = await self._get(self.names.controller_lease)
        return holder.decode() if holder is not None else None

    async def take_lease(self, controller_id: str, ttl_ms: int) -> bool:
        """Take the lease if it is free, or extend it if `controller_id` holds it, for `ttl_ms`
        (one Lua script); whether `controller_id` holds it now."""
        return bool(await self._take_or_extend_lease(keys=[self.names.controller_lease],
                                                     args=[controller_id, ttl_ms]))

    async def extend_lease(self, controller_id: str, ttl_ms: int) -> bool:
        """Extend the lease to `ttl_ms` if `controller_id` holds it; whether it did. A lease
        that expired, or that another controller took, is left alone."""
        return bool(await self._extend_if_held(keys=[self.names.controller_lease],
                                               args=[controller_id, ttl_ms]))

    async def release_lease(self, controller_id: str) -> None:
        """Give the lease up, if `controller_id` still holds it."""
        await self._delete_if_held(keys=[self.names.controller_lease], args=[controller_id])

    # Redis restarts: the durable state, copied and written back (controller/reseed.py) --------
    async def is_seeded(self) -> bool:
        """Whether a controller marked the state as written since Redis last started empty."""
        return bool(await self._redis.exists(self.names.seeded))

    async def mark_seeded(self) -> None:
        await self._redis.set(self.names.seeded, "1")

    async def snapshot(self, previous: StateSnapshot) -> StateSnapshot:
        """Copy the durable state: the desired applications with their specs (and
        spec index) and configs, the traffic records, the HTTP options, the nodes, their
        assignments, the replica records and queue arguments. Specs are immutable per
        version: those in `previous` are not read again."""
        names, redis = self.names, self._redis
        copy = StateSnapshot()
        for key in (names.http_options, self._grpc_options_key, names.routes):
            value = await self._get(key)
            if value is not None:
                copy.strings[key] = value
        hash_keys = [names.apps, names.app_builds, names.traffic, names.nodes, names.replicas,
                     names.queue_arguments]
        hash_keys += [names.node_assignments(node) for node in await self._hash_fields(names.nodes)]
        for key in hash_keys:
            copy.hashes[key] = cast("dict[bytes, bytes]", await redis.hgetall(key))
        for app, record in (await self.apps()).items():
            members = cast("set[bytes]", await redis.smembers(names.spec_index(app)))
            copy.sets[names.spec_index(app)] = members
            for dep_name, dep in record.get("deployments", {}).items():
                key = names.spec(app, dep_name, dep["version"])
                spec = previous.strings.get(key) or await self._get(key)
                if spec is not None:
                    copy.strings[key] = spec
        return copy

    async def write_back(self, copy: StateSnapshot) -> None:
        """Write a snapshot back, in one transaction."""
        async with self._redis.pipeline(transaction=True) as pipe:
            for key, value in copy.strings.items():
                pipe.set(key, value)
            for key, fields in copy.hashes.items():
                if fields:
                    pipe.hset(key, mapping=cast("dict[Any, Any]", fields))
            for key, members in copy.sets.items():
                if members:
                    pipe.sadd(key, *members)
            await pipe.execute()

    async def _hash_fields(self, key: str) -> list[str]:
        fields = cast("list[bytes]", await self._redis.hkeys(key))
        return [field.decode() for field in fields]

    # change notification --------------------------------------------------------------------
    async def announce(self, event: str) -> None:
        await self._redis.publish(self.names.events, event)

    async def watch_events(self, on_event: Any, period_s: float, stopping: Any) -> None:
        """Call `await on_event(name)` for each announced change and `on_event(None)` every
        `period_s`, until `stopping` (an asyncio.Event) is set.

        Pub/sub loses messages while disconnected, so the periodic call is what makes readers
        correct; the events only make them quick.
        """
        # Each loss starts the backoff again at 0.5 s, doubling up to 5 s while Redis is away.
        subscribing = AsyncRetrying(
            retry=retry_if_exception_type(_REDIS_LOST), wait=wait_exponential(0.5, max=5.0),
            stop=lambda state: stopping.is_set(), before_sleep=_warn_lost_redis,
            retry_error_callback=lambda state: None)
        while not stopping.is_set():
            pubsub: PubSub | None = await subscribing(self._subscribe, on_event)
            if pubsub is None:
                return
            try:
                last = asyncio.get_running_loop().time()
                while not stopping.is_set():
                    message = await pubsub.get_message(timeout=min(period_s, 1.0))
                    if message is not None:
                        await on_event(message["data"].decode())
                    elif asyncio.get_running_loop().time() - last >= period_s:
                        last = asyncio.get_running_loop().time()
                        await on_event(None)
            except _REDIS_LOST as exc:
                log.warning("lost Redis (%s); subscribing again", exc)
            finally:
                await _close_subscription(pubsub)

    async def _subscribe(self, on_event: Any) -> PubSub:
        """A subscription to the events, after one `on_event(None)` to catch up."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.names.events)
            await on_event(None)
        except BaseException:
            await _close_subscription(pubsub)
            raise
        return pubsub


# Ours too: `on_event` reads the state through this Store.
_REDIS_LOST = (RedisError, OSError, ClusterUnavailable, StateError)


def _pairs(flat: list[bytes]) -> list[tuple[bytes, bytes]]:
    """A stream entry's fields as Lua hands them over: name, value, name, value..."""
    return list(zip(flat[::2], flat[1::2]))


def _warn_lost_redis(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait_s = state.next_action.sleep if state.next_action else 0.0
    log.warning("lost Redis (%s); retrying in %.1fs", exc, wait_s)


async def _close_subscription(pubsub: PubSub) -> None:
    try:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
    except (RedisError, OSError) as exc:  # the connection is gone already
        log.debug("closing the subscription failed: %s", exc)


def _signed_parts(raw: bytes) -> tuple[bytes | None, bytes | None]:
    """The signed bytes and the signature of a stored signed record, None where absent."""
    try:
        stored = orjson.loads(raw)
        return str(stored["record"]).encode(), bytes.fromhex(str(stored["sig"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None, None
