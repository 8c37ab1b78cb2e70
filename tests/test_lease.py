"""The controller lease: taken, extended and released only by its holder, and a leader that
stalled past it never writes as the leader again (docs/architecture.md, "Controller")."""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import pytest
import redis
import requests

from broker_serve import serve
from broker_serve.controller.leadership import Leadership, LeadershipLost
from broker_serve.protocol.names import Names
from broker_serve.state.liveness import process_id
from broker_serve.state.store import Store

from .asyncio_tests import in_loop
from .conftest import REDIS_URL, Cluster, free_port
from .waiting import wait_for

# Commands that change state. A standby sends none of them but the SET of its heartbeat (its
# `:alive` key); its lease attempts are EVALSHA, which change nothing unless it gets the lease.
_WRITES = {"SET", "DEL", "UNLINK", "HSET", "HMSET", "HDEL", "PUBLISH", "ZADD", "ZREM",
           "ZREMRANGEBYSCORE", "SADD", "SREM", "MULTI", "EXEC", "PEXPIRE", "EXPIRE", "XADD"}
_AMQP_HEARTBEAT_FRAME = 8  # the first byte of an AMQP heartbeat frame


# the Store's lease operations ---------------------------------------------------------------
@in_loop
async def test_only_the_holder_takes_extends_or_releases_the_lease(cluster: Cluster) -> None:
    first, second = Store(REDIS_URL, cluster.name), Store(REDIS_URL, cluster.name)
    lease = first.names.controller_lease
    probe = redis.Redis.from_url(REDIS_URL)
    try:
        assert await first.take_lease("first", 2_000)
        assert not await second.take_lease("second", 60_000)
        assert not await second.extend_lease("second", 60_000)
        assert 0 < probe.pttl(lease) <= 2_000  # neither call refreshed it
        assert await first.lease_value() == "first"

        assert await first.take_lease("first", 30_000)  # taking one's own lease extends it
        assert probe.pttl(lease) > 2_000
        assert await first.extend_lease("first", 40_000)
        assert probe.pttl(lease) > 30_000

        await second.release_lease("second")
        assert await second.lease_value() == "first"
        await first.release_lease("first")
        assert await second.lease_value() is None
        assert not await first.extend_lease("first", 4_000)  # a lost lease is not revived
        assert await first.lease_value() is None
        assert await second.take_lease("second", 4_000)
    finally:
        probe.close()
        await first.close()
        await second.close()


@in_loop
async def test_the_guard_renews_its_own_lease_and_raises_once_another_holds_it(
        cluster: Cluster) -> None:
    store, other = Store(REDIS_URL, cluster.name), Store(REDIS_URL, cluster.name)
    clock = [100.0]
    leadership = Leadership(store, "first", lease_ms=4_000, margin_s=1.0, clock=lambda: clock[0])
    try:
        with pytest.raises(LeadershipLost):
            await leadership.check()  # never held
        assert await leadership.hold()
        clock[0] += 2.9
        assert leadership.may_act()
        clock[0] += 0.2  # past lease - margin: the check renews the lease, still ours
        await leadership.check()
        assert leadership.confirmed_at == clock[0]
        # It expires (a stall) and another controller takes it.
        await store.release_lease("first")
        assert await other.take_lease("second", 4_000)
        clock[0] += 3.5
        with pytest.raises(LeadershipLost):
            await leadership.check()
        assert await other.lease_value() == "second"
        assert not leadership.may_act()
        assert not await leadership.hold()
    finally:
        await store.close()
        await other.close()


# a stalled leader, as real controller processes ---------------------------------------------
class StallingProxy:
    """A TCP proxy whose forwarding can be paused in both directions: a connection that
    hangs, as one stuck behind a slow broker or a dropped route. `parked` is set when the
    client sends something other than a heartbeat while paused: it is waiting for a reply."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.parked = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._flowing = asyncio.Event()
        self._transports: set[asyncio.WriteTransport] = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        async def close_all() -> None:
            for transport in list(self._transports):
                transport.abort()

        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def pause(self) -> None:
        self.parked.clear()
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def resume(self) -> None:
        self._loop.call_soon_threadsafe(self._flowing.set)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._flowing.set()
        server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._transports.update((writer.transport, up_writer.transport))
        await asyncio.gather(self._pipe(reader, up_writer, from_client=True),
                             self._pipe(up_reader, writer, from_client=False),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    *, from_client: bool) -> None:
        try:
            while data := await reader.read(65536):
                if from_client and not self._flowing.is_set() \
                        and data[0] != _AMQP_HEARTBEAT_FRAME:
                    self.parked.set()
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()


class RedisMonitor:
    """Redis' MONITOR feed, kept for one cluster's keys: (client address, command words)."""

    def __init__(self, cluster: str) -> None:
        self.prefix = f"bs:{cluster}:"
        self.name = f"lease-test-monitor-{cluster}"
        self.commands: list[tuple[str, list[str]]] = []
        self._client = redis.Redis.from_url(REDIS_URL, client_name=self.name)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._started = threading.Event()

    def __enter__(self) -> Self:
        self._thread.start()
        assert self._started.wait(10), "MONITOR did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        with redis.Redis.from_url(REDIS_URL) as admin:
            for client in admin.client_list():
                if client.get("name") == self.name:
                    admin.client_kill_filter(_id=client["id"])
        self._thread.join(5)
        self._client.close()

    def sync(self) -> int:
        """Wait until the feed has caught up with now; the number of commands kept by then."""
        marker = f"{self.prefix}monitor-marker-{os.urandom(4).hex()}"
        with redis.Redis.from_url(REDIS_URL) as client:
            client.exists(marker)
        return int(wait_for(lambda: next((i + 1 for i, (_, words) in
                                          enumerate(self.commands) if marker in words), 0),
                            timeout=10))

    def _read(self) -> None:
        try:
            with self._client.monitor() as feed:
                self._started.set()
                for entry in feed.listen():
                    if self.prefix in entry["command"]:
                        address = f"{entry['client_address']}:{entry['client_port']}"
                        self.commands.append((address, entry["command"].split(" ")))
        except (redis.ConnectionError, OSError):  # killed by __exit__
            return


@dataclass
class ControllerProcess:
    process: subprocess.Popen[bytes]
    rest_port: int
    log_path: Path

    @property
    def controller_id(self) -> str:
        return process_id(self.process.pid)

    def is_leader_metric(self) -> float | None:
        """`broker_serve_controller_is_leader` from its REST API's /metrics."""
        try:
            response = requests.get(f"http://127.0.0.1:{self.rest_port}/metrics", timeout=5)
        except requests.ConnectionError:  # not serving yet
            return None
        found = re.search(r"^broker_serve_controller_is_leader (\S+)$", response.text,
                          re.MULTILINE)
        return float(found.group(1)) if found else None

    def logged(self, text: str) -> bool:
        return text in self.log_path.read_text(errors="replace")


@contextmanager
def controller(cluster: Cluster, log_path: Path, **env: str) -> Iterator[ControllerProcess]:
    """A real `python -m broker_serve controller` with a REST port of its own."""
    rest_port = free_port()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "broker_serve", "controller"],
            env={**cluster.env, "BROKER_SERVE_DASHBOARD_PORT": str(rest_port), **env},
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield ControllerProcess(process, rest_port, log_path)
        finally:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)  # in case it is still stopped
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)


def _lease_value(cluster: Cluster) -> str | None:
    with redis.Redis.from_url(REDIS_URL) as client:
        value = client.get(Names(cluster.name).controller_lease)
    return value.decode() if value is not None else None


def _with_query(url: str, **query: str) -> str:
    joined = "&".join(f"{name}={value}" for name, value in query.items())
    return f"{url}{'&' if '?' in url else '?'}{joined}"


# An autoscaled deployment at zero replicas runs without a worker node, and the controller
# reads its queue's depth over AMQP on every reconcile round (metrics_interval_s).
@serve.deployment(autoscaling_config={"min_replicas": 0, "initial_replicas": 0,
                                      "max_replicas": 1, "metrics_interval_s": 0.1})
class Idle:
    def __call__(self) -> str:
        return "ok"


def test_a_leader_stalled_past_its_lease_does_not_write_as_leader_after_it_resumes(
        cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Started by hand, not as a local cluster: the operator gives every process the secret.
    secret = secrets.token_hex(32)
    monkeypatch.setenv("BROKER_SERVE_CLUSTER_SECRET", secret)
    cluster.env["BROKER_SERVE_CLUSTER_SECRET"] = secret
    stalled_name = f"stalled-{cluster.name}"
    with StallingProxy(5672) as amqp, RedisMonitor(cluster.name) as monitor, controller(
            cluster, tmp_path / "stalled.log",
            BROKER_SERVE_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{amqp.port}/",
            BROKER_SERVE_REDIS_URL=_with_query(REDIS_URL, client_name=stalled_name),
    ) as stalled:
        wait_for(lambda: _lease_value(cluster) == stalled.controller_id, timeout=20)
        serve.run(Idle.bind())
        with controller(cluster, tmp_path / "standby.log") as standby:
            wait_for(lambda: standby.is_leader_metric() == 0, timeout=20)
            try:
                # The leader's next round confirms the lease, then hangs on its AMQP call;
                # then the whole process stalls until the standby has taken over, so longer
                # than what was left of its lease.
                amqp.pause()
                assert amqp.parked.wait(10), "the leader made no AMQP call while paused"
                os.kill(stalled.process.pid, signal.SIGSTOP)
                wait_for(lambda: _lease_value(cluster) == standby.controller_id, timeout=15)
                wait_for(lambda: standby.is_leader_metric() == 1, timeout=10)
                since_stall = monitor.sync()  # while it is stopped: all it sends comes after
            finally:
                amqp.resume()
                os.kill(stalled.process.pid, signal.SIGCONT)
            wait_for(lambda: stalled.logged(
                f"controller {stalled.controller_id} lost the lease; standing by"), timeout=15)
            wait_for(lambda: stalled.is_leader_metric() == 0, timeout=10)
            seen = monitor.sync()

            with redis.Redis.from_url(REDIS_URL) as admin:
                stalled_addresses = {client["addr"] for client in admin.client_list()
                                     if client.get("name") == stalled_name}
            assert stalled_addresses, "the stalled controller's connections are not named"
            writes = [words for address, words in monitor.commands[since_stall:seen]
                      if address in stalled_addresses and words[0].upper() in _WRITES
                      and not words[1].endswith(":alive")]
            assert not writes, f"the stalled controller wrote as the leader: {writes[:5]}"
            assert _lease_value(cluster) == standby.controller_id
            assert standby.is_leader_metric() == 1
            serve.delete("default")  # while the standby leads, so its queue goes
