"""Cancellation end to end: client disconnects, timeouts, shield, and requests cancelled while
queued. Replicas write marker files so the tests can see what ran inside them."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import msgpack
import pika
import redis
import requests
from starlette.requests import Request
from starlette.responses import StreamingResponse

from broker_serve import serve

from .conftest import AMQP_URL
from .waiting import wait_for


def wait_for_file(path: Path, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def send_then_leave(port: int, path: str, stay_s: float) -> None:
    """An HTTP client that sends a request and hangs up before the answer."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(stay_s)


@serve.deployment
class StreamingResponder:  # the seed's stream-disconnect example, with a marker file
    def __init__(self, markers: str) -> None:
        self.markers = Path(markers)

    async def generate_forever(self):
        try:
            i = 0
            while True:
                yield str(i)
                i += 1
                await asyncio.sleep(0.1)
        except asyncio.CancelledError:
            (self.markers / "cancelled").write_text("Cancelled! Exiting.")

    def __call__(self, request: Request) -> StreamingResponse:
        return StreamingResponse(self.generate_forever(), status_code=200,
                                 media_type="text/plain")


def test_stream_disconnect_cancels_the_generator(cluster, tmp_path):
    serve.run(StreamingResponder.bind(str(tmp_path)))
    r = requests.get(f"{cluster.url}?max=10", stream=True)
    r.raise_for_status()
    for i, _ in enumerate(r.iter_content(chunk_size=None, decode_unicode=True)):
        if i == 10:
            break
    r.close()
    assert wait_for_file(tmp_path / "cancelled"), "the generator never saw CancelledError"


@serve.deployment
class Sleeper:
    def __init__(self, markers: str) -> None:
        self.markers = Path(markers)

    async def __call__(self, request: Request) -> str:
        name = request.query_params.get("name", "request")
        (self.markers / f"{name}.started").touch()
        try:
            await asyncio.sleep(float(request.query_params.get("s", "10")))
        except asyncio.CancelledError:
            (self.markers / f"{name}.cancelled").touch()
            raise
        (self.markers / f"{name}.finished").touch()
        return "slept"


def test_timeout_gives_408_and_cancels_the_handler(cluster, tmp_path):
    serve.start(http_options={"request_timeout_s": 1})
    serve.run(Sleeper.bind(str(tmp_path)))
    started = time.monotonic()
    response = requests.get(f"{cluster.url}?s=10")
    elapsed = time.monotonic() - started
    assert response.status_code == 408
    assert 1.0 <= elapsed < 2.0, elapsed
    assert wait_for_file(tmp_path / "request.cancelled")
    assert requests.get(f"{cluster.url}?s=0.1&name=quick").text == "slept"


@serve.deployment
class SnoringSleeper:  # the seed's shield example, with marker files
    def __init__(self, markers: str) -> None:
        self.markers = Path(markers)

    async def snore(self) -> None:
        await asyncio.sleep(1)
        (self.markers / "ZZZ").touch()

    async def __call__(self) -> None:
        try:
            (self.markers / "received").touch()
            await asyncio.shield(self.snore())
        except asyncio.CancelledError:
            (self.markers / "cancelled").touch()


def test_shielded_work_finishes_after_a_disconnect(cluster, tmp_path):
    serve.run(SnoringSleeper.bind(str(tmp_path)))
    send_then_leave(cluster.port, "/", stay_s=0.3)
    assert wait_for_file(tmp_path / "cancelled")
    assert not (tmp_path / "ZZZ").exists()  # the request was cancelled before snore finished
    assert wait_for_file(tmp_path / "ZZZ"), "asyncio.shield did not protect snore()"


def test_request_cancelled_while_queued_never_runs(cluster, tmp_path):
    serve.run(Sleeper.options(max_ongoing_requests=1).bind(str(tmp_path)))
    with requests.Session() as first:
        import threading

        busy = threading.Thread(target=first.get, args=(f"{cluster.url}?s=2&name=busy",))
        busy.start()
        assert wait_for_file(tmp_path / "busy.started")
        # Queued behind the busy one; its client leaves before a replica is free.
        send_then_leave(cluster.port, "/?s=0&name=queued", stay_s=0.5)
        busy.join(10)
    assert (tmp_path / "busy.finished").exists()
    assert requests.get(f"{cluster.url}?s=0&name=after").text == "slept"
    assert not (tmp_path / "queued.started").exists(), "a cancelled request ran"


def test_a_replica_that_starts_later_loads_live_tombstones(cluster):
    """Tombstones in Redis reach replicas that were not there for the broadcast."""
    from broker_serve.state.store import Store
    from broker_serve.transport.cancellation import CancelledSet

    async def scenario() -> tuple[bool, bool, bool]:
        store = Store(cluster.env["BROKER_SERVE_REDIS_URL"], cluster.name)
        now_ms = int(time.time() * 1000)
        await store.add_tombstones(["live"], now_ms + 60_000)
        await store.add_tombstones(["expired"], now_ms - 1)
        late_replica = CancelledSet()
        await late_replica.load(store)
        await store.close()
        late_replica.prune()
        return "live" in late_replica, "expired" in late_replica, len(late_replica) == 1

    assert asyncio.run(scenario()) == (True, False, True)


@serve.deployment(max_ongoing_requests=1)
class OneAtATime:
    async def nap(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "rested"

    def ping(self) -> str:
        return "pong"


def _waiting(queue: str) -> int:
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as connection:
        return int(connection.channel().queue_declare(queue, passive=True).method.message_count)


def _broadcast_cancel(cluster_name: str, request_id: str) -> None:
    """A cancel as docs/protocol.md's "Cancellation" says, published straight to the
    broadcast (no Redis involved)."""
    with pika.BlockingConnection(pika.URLParameters(AMQP_URL)) as connection:
        connection.channel().basic_publish(
            f"bs.{cluster_name}.cancel", "",
            msgpack.packb({"ids": [request_id], "expires": int(time.time() * 1000) + 60_000}),
            pika.BasicProperties(type="cancel", content_type="application/msgpack",
                                 headers={"bs-version": 1}))


def test_a_cancel_during_a_deliverys_pickup_still_settles_it(cluster):
    """A delivery's pickup makes Redis round trips (a job's record, a redelivery's count)
    before it runs. A cancel arriving then must not end the delivery unsettled: it would hold
    the replica's prefetch slot for good, and the replica would take no request again (after
    a broker outage, every slot of a replica was held so, while the proxies' cancels of the
    requests they had failed came in with the redeliveries). Here the job's pickup waits on a
    paused Redis while its cancel arrives."""
    handle = serve.run(OneAtATime.bind(), name="pickup", route_prefix=None)
    queue = f"bs.{cluster.name}.pickup.OneAtATime"
    busy = handle.nap.remote(1.5)  # holds the one slot
    wait_for(lambda: _waiting(queue) == 0)  # taken
    job = handle.ping.submit()  # queued behind it
    wait_for(lambda: _waiting(queue) == 1)
    with redis.Redis.from_url(cluster.env["BROKER_SERVE_REDIS_URL"]) as client:
        client.execute_command("CLIENT", "PAUSE", 3000, "WRITE")  # the job's record waits
    try:
        assert busy.result(timeout_s=10) == "rested"
        wait_for(lambda: _waiting(queue) == 0, timeout=5)  # the job is being picked up
        _broadcast_cancel(cluster.name, job.id)
    finally:
        with redis.Redis.from_url(cluster.env["BROKER_SERVE_REDIS_URL"]) as client:
            client.execute_command("CLIENT", "UNPAUSE")
    assert wait_for(lambda: job.status() == "CANCELLED", timeout=10)
    # The slot is free again: the next call runs.
    assert handle.ping.remote().result(timeout_s=10) == "pong"
