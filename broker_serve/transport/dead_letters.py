"""The dead-letter queue, read and acted on (docs/protocol.md, "Dead letters"): list, show,
replay and purge, for the REST API and `broker-serve dead`.

Each call reads the queue on a channel of its own with basic.get, never more than `limit`
messages, and acks only the ones it replays or drops. Closing the channel gives the others
back: a classic queue puts them back where they were, so reading loses and reorders nothing.
A quorum queue (durable mode) puts them behind the messages not read: the order is kept
only while a call reads the whole queue, i.e. it holds at most `limit`. The queue is read only
once the controller has declared it (its arguments are recorded in Redis), so a call never
provokes a channel error with a queue that is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import AsyncIterator, Collection
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from ..config import JobConfig
from ..exceptions import ProtocolError
from ..protocol import jobs
from ..protocol import messages as protocol
from ..protocol.names import Names
from ..state.store import Store
from .broker import Broker
from .errors import map_amqp_errors

log = logging.getLogger("broker_serve.transport.dead_letters")

DEFAULT_LIMIT = 1000
REQUEUE_WAIT_S = 5.0
REQUEUE_POLL_S = 0.02
PREVIEW_CHARS = 200  # a string or byte string of a body preview is cut here
# Headers RabbitMQ adds when it dead-letters a message: a replay leaves them off.
_RABBITMQ_DEATH = ("x-death", "x-delivery-count")
_RABBITMQ_DEATH_PREFIXES = ("x-first-death-", "x-last-death-")


@dataclass(frozen=True)
class DeadLetter:
    id: str
    queue: str  # the request queue it came from
    app: str | None
    deployment: str | None
    reason: str  # bs-dead-reason, or RabbitMQ's: rejected, expired, maxlen, ...
    error: str | None
    message: str | None
    dead_at: float | None  # Unix seconds
    kind: str  # the AMQP type: call, http, ...
    attempts: int | None
    priority: int
    size: int  # of the body, in bytes
    is_job: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Selector(NamedTuple):
    """Which dead letters a call acts on; None matches any."""

    ids: Collection[str] | None = None
    app: str | None = None
    deployment: str | None = None

    def matches(self, letter: DeadLetter) -> bool:
        return ((self.ids is None or letter.id in self.ids)
                and (self.app is None or letter.app == self.app)
                and (self.deployment is None or letter.deployment == self.deployment))


class Replayed(NamedTuple):
    replayed: list[str]
    kept: dict[str, str]  # id -> why it is still in the dead-letter queue


# The dead letters a call holds, unacked, with their messages.
Held = list[tuple[DeadLetter, AbstractIncomingMessage]]


class DeadLetters:
    def __init__(self, broker: Broker, names: Names, store: Store) -> None:
        self.broker = broker
        self.names = names
        self.store = store
        # One read at a time: the messages one call holds are invisible to another.
        self._lock = asyncio.Lock()

    async def list(self, app: str | None = None, deployment: str | None = None,
                   limit: int = DEFAULT_LIMIT) -> list[DeadLetter]:
        async with self._read(limit) as letters:
            selector = Selector(app=app, deployment=deployment)
            return [letter for letter, _ in letters if selector.matches(letter)]

    async def show(self, letter_id: str, limit: int = DEFAULT_LIMIT
                   ) -> tuple[DeadLetter, Any] | None:
        """The first dead letter with this id, and a preview of its decoded body."""
        async with self._read(limit) as letters:
            for letter, message in letters:
                if letter.id == letter_id:
                    return letter, _body_preview(message.body)
        return None

    async def replay(self, selector: Selector, limit: int = DEFAULT_LIMIT) -> Replayed:
        """Publish each matching dead letter again to the queue it came from, then drop it.
        A job's record is set back to PENDING first; a job dead-lettered twice runs once."""
        replayed: list[str] = []
        kept: dict[str, str] = {}
        async with self._read(limit) as letters:
            for letter, message in letters:
                if not selector.matches(letter):
                    continue
                if letter.is_job and letter.id in replayed:
                    await message.ack()  # another copy of a job just replayed
                    continue
                if await self.store.queue_arguments(letter.queue) is None:
                    kept[letter.id] = f"its queue {letter.queue} does not exist"
                    continue
                if letter.is_job:
                    await self.store.jobs.replayed(
                        letter.id, _ttl_s(message), app=letter.app,
                        deployment=letter.deployment, kind=letter.kind,
                        priority=letter.priority)
                if await self._publish_again(letter, message):
                    await message.ack()
                    replayed.append(letter.id)
                else:
                    kept[letter.id] = f"its queue {letter.queue} refused it"
        return Replayed(replayed, kept)

    async def purge(self, selector: Selector, limit: int = DEFAULT_LIMIT) -> int:
        purged = 0
        async with self._read(limit) as letters:
            for letter, message in letters:
                if selector.matches(letter):
                    await message.ack()
                    purged += 1
        return purged

    @contextlib.asynccontextmanager
    async def _read(self, limit: int) -> AsyncIterator[Held]:
        """Up to `limit` dead letters, unacked, in queue order; those not acked go back when
        the reading channel closes, and this waits until they are back."""
        async with self._lock:
            arguments = await self.store.queue_arguments(self.names.dead_letters)
            if arguments is None:
                yield []  # the controller has not declared it: nothing was dead-lettered
                return
            owners = await self._queue_owners()
            with map_amqp_errors(f"cannot read {self.names.dead_letters}"):
                counting = await self.broker.channel()
                try:
                    # As the controller declares it: a declare with other arguments fails.
                    dead = await counting.declare_queue(self.names.dead_letters, durable=True,
                                                        arguments=arguments)
                    ready = (await dead.declare()).message_count or 0
                    reading = await self.broker.channel()
                    try:
                        letters = await self._get(reading, limit, owners)
                        yield letters
                        acked = sum(1 for _, message in letters if message.processed)
                    finally:
                        await reading.close()
                    if len(letters) > acked:
                        await _wait_for_ready(dead, ready - acked)
                finally:
                    await counting.close()

    async def _get(self, channel: AbstractChannel, limit: int,
                   owners: dict[str, tuple[str, str]]) -> Held:
        # Not declared again: the controller did, and a declare could only differ.
        queue = await channel.get_queue(self.names.dead_letters, ensure=False)
        letters: Held = []
        while len(letters) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            letters.append((self._dead_letter(message, owners), message))
        return letters

    async def _queue_owners(self) -> dict[str, tuple[str, str]]:
        """Request queue -> (app, deployment), from the app records: app names may hold
        dots, so a queue name alone does not say where one ends."""
        return {entry["queue"]: (app, deployment)
                for app, record in (await self.store.apps()).items()
                for deployment, entry in record["deployments"].items()}

    def _dead_letter(self, message: AbstractIncomingMessage,
                     queues: dict[str, tuple[str, str]]) -> DeadLetter:
        headers = dict(message.headers or {})
        death = _first_death(headers)
        queue = _text(headers.get(jobs.HEADER_DEAD_QUEUE)) or _text(death.get("queue")) or ""
        app, deployment = queues.get(queue) or self._split(queue)
        dead_at_ms = headers.get(jobs.HEADER_DEAD_AT)
        died = death.get("time")
        attempts = headers.get(jobs.HEADER_ATTEMPT)
        return DeadLetter(
            id=message.message_id or message.correlation_id or "",
            queue=queue, app=app, deployment=deployment,
            reason=_text(headers.get(jobs.HEADER_DEAD_REASON)) or _text(death.get("reason"))
            or "",
            error=_text(headers.get(jobs.HEADER_DEAD_ERROR)),
            message=_text(headers.get(jobs.HEADER_DEAD_MESSAGE)),
            dead_at=(dead_at_ms / 1000 if isinstance(dead_at_ms, int)
                     else died.timestamp() if isinstance(died, datetime.datetime) else None),
            kind=message.type or "",
            attempts=attempts if isinstance(attempts, int) else None,
            priority=message.priority or 0,
            size=len(message.body),
            is_job=jobs.is_job(headers),
        )

    def _split(self, queue: str) -> tuple[str | None, str | None]:
        """(app, deployment) of a request queue no app record names (its app was deleted)."""
        prefix = self.names.request_queue("", "")[:-1]  # "bs.<cluster>."
        if not queue.startswith(prefix) or "." not in queue[len(prefix):]:
            return None, None
        app, deployment = queue[len(prefix):].rsplit(".", 1)
        return app, deployment

    async def _publish_again(self, letter: DeadLetter, message: AbstractIncomingMessage
                             ) -> bool:
        """Persistent, confirmed and mandatory; False if the queue refused or returned it (a
        returned message is matched by its message_id, so one is always set)."""
        return await self.broker.publish_durably(
            letter.queue, message.body, deadline_ms=None, type=message.type or "",
            correlation_id=message.correlation_id or "",
            message_id=message.message_id or message.correlation_id or letter.id,
            reply_to=message.reply_to, headers=_replay_headers(message.headers or {}),
            priority=message.priority or 0, mandatory=True, refuse_returned=True)


async def _wait_for_ready(queue: AbstractQueue, ready: int) -> None:
    """Wait, a moment at most, until `ready` messages are in the queue again. A quorum queue
    takes back the messages of a closed channel through its Raft log, after the channel is
    gone: the next read must find them all."""
    deadline = asyncio.get_running_loop().time() + REQUEUE_WAIT_S
    while ((await queue.declare()).message_count or 0) < ready:
        if asyncio.get_running_loop().time() > deadline:
            log.warning("%s: the dead letters read are not all back after %.0fs", queue.name,
                        REQUEUE_WAIT_S)
            return
        await asyncio.sleep(REQUEUE_POLL_S)


def _replay_headers(headers: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in headers.items()
            if name not in jobs.DEAD_HEADERS and name not in _RABBITMQ_DEATH
            and not name.startswith(_RABBITMQ_DEATH_PREFIXES)}


def _first_death(headers: dict[str, Any]) -> dict[str, Any]:
    """RabbitMQ's most recent dead-lettering of the message (the first `x-death` entry)."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return {}


def _ttl_s(message: AbstractIncomingMessage) -> int:
    """The job's `bs-job`, or the default TTL for one whose header is unreadable (a job
    dead-lettered as malformed)."""
    try:
        return jobs.checked_ttl((message.headers or {}).get(jobs.HEADER_JOB))
    except ValueError:
        return JobConfig().result_ttl_s


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None if value is None else str(value)


def _body_preview(body: bytes) -> Any:
    """The decoded body, with long strings and byte strings cut, as JSON can carry it."""
    try:
        return _shortened(protocol.decode_map(body))
    except ProtocolError:
        return _shortened(body)


def _shortened(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _shortened(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shortened(item) for item in value]
    if isinstance(value, bytes):
        shown = repr(value[:PREVIEW_CHARS])
        return shown if len(value) <= PREVIEW_CHARS else f"{shown}... ({len(value)} bytes)"
    if isinstance(value, str) and len(value) > PREVIEW_CHARS:
        return f"{value[:PREVIEW_CHARS]}... ({len(value)} characters)"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
