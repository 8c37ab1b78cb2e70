"""Job records in Redis (docs/protocol.md, "The job record").

Every change of a job's status is one Lua script, which also keeps the job counts of
`bs:<cluster>:jobs:counts` and announces finished jobs on `bs:<cluster>:jobs:done`: a record
and its counts never disagree, and two writers (a replica finishing a job, a caller cancelling
it) cannot both win.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..exceptions import ClusterUnavailable, StateError
from ..protocol.deadlines import now_ms
from ..protocol.jobs import JobStatus
from ..protocol.names import Names
from .errors import translate_errors

log = logging.getLogger("broker_serve.state.jobs")

# A waiter reads the record again at least this often: pub/sub loses what is announced while
# its connection is down.
RECHECK_S = 1.0

# The counts field of a status: `<status>|<priority>|<app>|<deployment>` (names have no `|`).
_COUNT_FIELD = "local function field(s, r) return s .. '|' .. (r.priority or '0') .. '|' .. " \
    "(r.app or '') .. '|' .. (r.deployment or '') end\n"
_READ = """
local function read(key)
  local flat = redis.call('HGETALL', key)
  local r = {}
  for i = 1, #flat, 2 do r[flat[i]] = flat[i + 1] end
  return r
end
local function finished(s) return s == 'SUCCEEDED' or s == 'FAILED' or s == 'CANCELLED' end
local function open(s) return s == 'PENDING' or s == 'RUNNING' end
"""

# A submitted job: PENDING, unless a record exists. KEYS: record, counts. ARGV: ttl_s, then
# field, value pairs. 1 if written.
_SUBMIT = _READ + _COUNT_FIELD + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'status', 'PENDING', unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], field('PENDING', read(KEYS[1])), 1)
return 1
"""

# A replica takes the job: RUNNING and one more attempt, unless it has finished. KEYS: record,
# counts. ARGV: ttl_s, now_ms, replica, then field, value pairs for a record that does not
# exist yet. Returns {status before, attempts}.
_START = _READ + _COUNT_FIELD + """
local r = read(KEYS[1])
if finished(r.status) then return {r.status, tonumber(r.attempts or '0')} end
if r.status == nil then
  redis.call('HSET', KEYS[1], unpack(ARGV, 4))
  r = read(KEYS[1])
else
  redis.call('HINCRBY', KEYS[2], field(r.status, r), -1)
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'RUNNING', 'started_ms', ARGV[2], 'replica', ARGV[3])
redis.call('HDEL', KEYS[1], 'retry_at_ms')
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], field('RUNNING', r), 1)
return {r.status or false, attempts}
"""

# A failed attempt that will run again: back to PENDING. KEYS: record, counts. ARGV: ttl_s,
# retry_at_ms, error, message. 1 if it was RUNNING.
_RETRYING = _READ + _COUNT_FIELD + """
local r = read(KEYS[1])
if r.status ~= 'RUNNING' then return 0 end
redis.call('HINCRBY', KEYS[2], field('RUNNING', r), -1)
redis.call('HSET', KEYS[1], 'status', 'PENDING', 'retry_at_ms', ARGV[2], 'error', ARGV[3],
           'message', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], field('PENDING', r), 1)
redis.call('HINCRBY', KEYS[2], 'retries|' .. (r.app or '') .. '|' .. (r.deployment or ''), 1)
return 1
"""

# The job ends. KEYS: record, counts, done channel. ARGV: ttl_s, status, now_ms, result,
# error, message, dead (1/0), job id, then field, value pairs for a record that does not exist.
# Returns the status it has now (a finished job keeps its first end).
_FINISH = _READ + _COUNT_FIELD + """
local r = read(KEYS[1])
if finished(r.status) then return r.status end
if r.status == nil then
  redis.call('HSET', KEYS[1], unpack(ARGV, 9))
  r = read(KEYS[1])
else
  redis.call('HINCRBY', KEYS[2], field(r.status, r), -1)
end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_ms', ARGV[3], 'result', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[5], 'message', ARGV[6]) end
redis.call('HDEL', KEYS[1], 'retry_at_ms')
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], field(ARGV[2], r), 1)
if ARGV[7] == '1' then
  redis.call('HINCRBY', KEYS[2], 'dead|' .. (r.app or '') .. '|' .. (r.deployment or ''), 1)
end
redis.call('PUBLISH', KEYS[3], ARGV[8])
return ARGV[2]
"""

# A caller cancels: a PENDING job is CANCELLED now; a RUNNING one is marked, and its replica
# ends it. KEYS: record, counts, done channel. ARGV: now_ms, job id. Returns the status
# before, or nil if there is no such job.
_CANCEL = _READ + _COUNT_FIELD + """
local r = read(KEYS[1])
if r.status == nil then return false end
if r.status == 'PENDING' then
  redis.call('HINCRBY', KEYS[2], field('PENDING', r), -1)
  redis.call('HSET', KEYS[1], 'status', 'CANCELLED', 'finished_ms', ARGV[1], 'error',
             'Cancelled', 'message', 'the job was cancelled before it ran')
  redis.call('HDEL', KEYS[1], 'retry_at_ms')
  redis.call('EXPIRE', KEYS[1], tonumber(r.ttl_s or '86400'))
  redis.call('HINCRBY', KEYS[2], field('CANCELLED', r), 1)
  redis.call('PUBLISH', KEYS[3], ARGV[2])
elseif r.status == 'RUNNING' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
end
return r.status
"""

# A dead letter replayed: PENDING again, with its attempts from 0. KEYS: record, counts.
# ARGV: ttl_s, then field, value pairs for a record that expired. Returns the status before.
_REPLAYED = _READ + _COUNT_FIELD + """
local r = read(KEYS[1])
if r.status == nil then
  redis.call('HSET', KEYS[1], unpack(ARGV, 2))
  r = read(KEYS[1])
elseif open(r.status) then
  redis.call('HINCRBY', KEYS[2], field(r.status, r), -1)
end
redis.call('HDEL', KEYS[1], 'result', 'finished_ms', 'started_ms', 'retry_at_ms', 'replica',
           'cancel_requested')
redis.call('HSET', KEYS[1], 'status', 'PENDING', 'attempts', '0')
redis.call('HINCRBY', KEYS[1], 'replays', 1)
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], field('PENDING', r), 1)
return r.status or false
"""


def _flat(fields: dict[str, Any]) -> list[Any]:
    """Field, value pairs for a script's ARGV, skipping what is None."""
    pairs: list[Any] = []
    for name, value in fields.items():
        if value is not None:
            pairs += [name, value]
    return pairs


@translate_errors
class JobStore:
    """The job records of one cluster, on the Store's Redis client."""

    def __init__(self, client: aioredis.Redis, names: Names) -> None:
        self._redis = client
        self.names = names
        self._submit = client.register_script(_SUBMIT)
        self._start = client.register_script(_START)
        self._retrying = client.register_script(_RETRYING)
        self._finish = client.register_script(_FINISH)
        self._cancel = client.register_script(_CANCEL)
        self._replayed = client.register_script(_REPLAYED)
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._listener: asyncio.Task[None] | None = None

    def _keys(self, job_id: str) -> list[str]:
        return [self.names.job(job_id), self.names.job_counts]

    async def submit(self, job_id: str, ttl_s: int, **fields: Any) -> bool:
        """Record a job as PENDING before it is published; False if its id is taken."""
        return bool(await self._submit(keys=self._keys(job_id),
                                       args=[ttl_s, *_flat({"ttl_s": ttl_s, **fields})]))

    async def start(self, job_id: str, ttl_s: int, replica: str,
                    **fields: Any) -> tuple[JobStatus | None, int]:
        """A replica takes the job: its status before (None: no record) and its attempts now.
        A finished status means it must not run again."""
        before, attempts = await self._start(
            keys=self._keys(job_id),
            args=[ttl_s, now_ms(), replica, *_flat({"ttl_s": ttl_s, **fields})])
        return (JobStatus(before.decode()) if before else None), int(attempts)

    async def retrying(self, job_id: str, ttl_s: int, retry_at_ms: int, error: str,
                       message: str) -> None:
        await self._retrying(keys=self._keys(job_id),
                             args=[ttl_s, retry_at_ms, error, message])

    async def finish(self, job_id: str, ttl_s: int, status: JobStatus, result: bytes, *,
                     error: str = "", message: str = "", dead: bool = False,
                     **fields: Any) -> JobStatus:
        """End the job (unless it ended already: the first end stays); its status now."""
        ended = await self._finish(
            keys=[*self._keys(job_id), self.names.jobs_done],
            args=[ttl_s, status.value, now_ms(), result, error, message, int(dead), job_id,
                  *_flat({"ttl_s": ttl_s, **fields})])
        return JobStatus(ended.decode())

    async def cancel(self, job_id: str) -> JobStatus | None:
        """Cancel a PENDING job, or mark a RUNNING one; its status before (None: unknown)."""
        before = await self._cancel(keys=[*self._keys(job_id), self.names.jobs_done],
                                    args=[now_ms(), job_id])
        return JobStatus(before.decode()) if before else None

    async def replayed(self, job_id: str, ttl_s: int, **fields: Any) -> JobStatus | None:
        """A dead letter of the job is published again: PENDING, attempts from 0."""
        before = await self._replayed(keys=self._keys(job_id),
                                      args=[ttl_s, *_flat({"ttl_s": ttl_s, **fields})])
        return JobStatus(before.decode()) if before else None

    async def get(self, job_id: str) -> dict[str, bytes] | None:
        raw = cast("dict[bytes, bytes]", await self._redis.hgetall(self.names.job(job_id)))
        return {k.decode(): v for k, v in raw.items()} if raw else None

    async def counts(self) -> dict[str, int]:
        raw = cast("dict[bytes, bytes]", await self._redis.hgetall(self.names.job_counts))
        return {k.decode(): int(v) for k, v in raw.items()}

    async def wait_finished(self, job_id: str, timeout_s: float) -> dict[str, bytes] | None:
        """The record once the job has finished, or as it is after `timeout_s` (None: no
        such job)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout_s, 0.0)
        woken = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(woken)
        self._listen()
        try:
            while True:
                woken.clear()
                record = await self.get(job_id)
                if (record is None or JobStatus(record["status"].decode()).finished
                        or loop.time() >= deadline):
                    return record
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(RECHECK_S, deadline - loop.time()))
        finally:
            waiting = self._waiters.get(job_id)
            if waiting is not None:
                waiting.discard(woken)
                if not waiting:
                    del self._waiters[job_id]

    def _listen(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.ensure_future(self._listen_for_done())

    async def _listen_for_done(self) -> None:
        """Wake the waiters of each job announced finished, while any waits."""
        while self._waiters:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.names.jobs_done)
                while self._waiters:
                    message = await pubsub.get_message(timeout=RECHECK_S)
                    if message is None:
                        continue
                    for woken in self._waiters.get(message["data"].decode(), ()):
                        woken.set()
            except (RedisError, OSError, ClusterUnavailable, StateError) as exc:
                # The waiters read the record every RECHECK_S meanwhile.
                log.warning("lost the job announcements (%s); subscribing again", exc)
                await asyncio.sleep(RECHECK_S)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
