"""A replicated Redis under Sentinel, made of real processes, for tests that fail it over.

`RedisSentinel` starts, on free ports in a directory of its own, a primary, one replica and
three sentinels (quorum 2, a node is down after 1 s), and waits until the sentinels agree on
the primary and see the replica. `url` is the Sentinel URL broker-serve takes;
`kill_primary` SIGKILLs the current primary and `wait_failover` waits until the sentinels
agree on the promoted replica; `revive` starts a killed node again as a replica, so that a
test can fail over once more. Use it as a context manager, or through the `redis_sentinel`
fixture (import `redis_sentinel_fixture` into a test module to have it there).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest
import redis

from .conftest import free_port

SERVICE_NAME = "bs-primary"
SENTINELS = 3
QUORUM = 2
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
HOST = "127.0.0.1"


class RedisSentinel:
    def __init__(self, directory: Path, service_name: str = SERVICE_NAME,
                 timeout_s: float = 30.0) -> None:
        self.directory = directory
        self.service_name = service_name
        self.timeout_s = timeout_s
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}  # Redis nodes by port
        self.sentinels: dict[int, subprocess.Popen[bytes]] = {}

    # lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def start(self) -> None:
        try:
            primary = self._start_node(free_port())
            replica = self._start_node(free_port(), replica_of=primary)
            self._wait(lambda: self._replica_linked(replica), f"replica {replica} to sync")
            for _ in range(SENTINELS):
                self._start_sentinel(free_port(), primary)
            self._wait(lambda: self._agreed_on(primary, replicas=1),
                       f"the sentinels to agree on primary {primary}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGKILL everything: nothing here holds data worth a clean shutdown."""
        for process in [*self.sentinels.values(), *self.nodes.values()]:
            if process.poll() is None:
                process.kill()
            process.wait(10)

    # what tests use --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service_name}/0"

    def node_url(self, port: int) -> str:
        """A plain URL of one node, bypassing the sentinels."""
        return f"redis://{HOST}:{port}/0"

    def primary_port(self) -> int:
        """The primary as the sentinels agree on it now."""
        ports = {int(self._master_state(port)["port"]) for port in self.sentinels}
        if len(ports) != 1:
            raise AssertionError(f"the sentinels disagree on the primary: {sorted(ports)}")
        return ports.pop()

    def replica_ports(self) -> list[int]:
        primary = self.primary_port()
        return [port for port, process in self.nodes.items()
                if port != primary and process.poll() is None]

    def kill_primary(self) -> int:
        """SIGKILL the current primary; returns its port."""
        port = self.primary_port()
        process = self.nodes[port]
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        return port

    def wait_failover(self, old_primary: int) -> int:
        """Wait until the sentinels agree on a new primary that acts as one; returns its port."""
        promoted: list[int] = []

        def failed_over() -> bool:
            ports = {int(self._master_state(port)["port"]) for port in self.sentinels}
            if len(ports) != 1 or old_primary in ports:
                return False
            port = ports.pop()
            if not self._is_primary(port):
                return False
            promoted.append(port)
            return True

        self._wait(failed_over, f"a failover away from {old_primary}")
        return promoted[-1]

    def fail_over(self) -> int:
        """SIGKILL the primary and wait for the failover; returns the new primary's port."""
        return self.wait_failover(self.kill_primary())

    def revive(self, port: int) -> None:
        """Start a killed node again, as a replica of the current primary, and wait until it
        synced and the sentinels see it healthy."""
        if self.nodes[port].poll() is None:
            raise AssertionError(f"node {port} still runs")
        primary = self.primary_port()
        self._start_node(port, replica_of=primary)
        self._wait(lambda: self._replica_linked(port) and self._sees_healthy_replica(port),
                   f"node {port} to rejoin as a replica")

    # processes --------------------------------------------------------------------------------
    def _start_node(self, port: int, replica_of: int | None = None) -> int:
        directory = self.directory / f"redis-{port}"
        directory.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
                   "--appendonly", "no", "--dir", str(directory)]
        if replica_of is not None:
            command += ["--replicaof", HOST, str(replica_of)]
        self.nodes[port] = self._spawn(command, directory / "redis.log")
        self._wait(lambda: self._answers(port), f"Redis on {port} to start")
        return port

    def _start_sentinel(self, port: int, primary: int) -> None:
        directory = self.directory / f"sentinel-{port}"
        directory.mkdir(parents=True, exist_ok=True)
        name = self.service_name
        config = directory / "sentinel.conf"  # sentinels rewrite theirs, so one each
        config.write_text("\n".join([
            f"port {port}",
            f"bind {HOST}",
            f"dir {directory}",
            "sentinel resolve-hostnames no",
            f"sentinel monitor {name} {HOST} {primary} {QUORUM}",
            f"sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}",
            "",
        ]))
        self.sentinels[port] = self._spawn(["redis-server", str(config), "--sentinel"],
                                           directory / "sentinel.log")
        self._wait(lambda: self._answers(port), f"the sentinel on {port} to start")

    @staticmethod
    def _spawn(command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:  # the child has its own copy
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)

    # what the processes say -------------------------------------------------------------------
    def _ask(self, port: int, ask: Callable[[redis.Redis], Any]) -> Any:
        with redis.Redis(host=HOST, port=port, socket_timeout=2, socket_connect_timeout=2,
                         decode_responses=True) as client:
            return ask(client)

    def _answers(self, port: int) -> bool:
        try:
            return bool(self._ask(port, lambda client: client.ping()))
        except redis.ConnectionError:
            return False

    def _replica_linked(self, port: int) -> bool:
        info = self._ask(port, lambda client: client.info("replication"))
        return info.get("role") == "slave" and info.get("master_link_status") == "up"

    def _is_primary(self, port: int) -> bool:
        try:
            info = self._ask(port, lambda client: client.info("replication"))
        except redis.ConnectionError:
            return False
        return bool(info.get("role") == "master")

    def _master_state(self, sentinel_port: int) -> dict[str, Any]:
        state: dict[str, Any] = self._ask(
            sentinel_port, lambda client: client.sentinel_master(self.service_name))
        return state

    def _agreed_on(self, primary: int, replicas: int) -> bool:
        for port in self.sentinels:
            state = self._master_state(port)
            if (int(state["port"]) != primary or not state["is_master"] or state["is_sdown"]
                    or int(state["num-slaves"]) < replicas
                    or int(state["num-other-sentinels"]) < SENTINELS - 1):
                return False
        return True

    def _sees_healthy_replica(self, replica: int) -> bool:
        for port in self.sentinels:
            replicas = self._ask(port, lambda client: client.sentinel_slaves(self.service_name))
            if not any(int(state["port"]) == replica and not state["is_sdown"]
                       and state.get("master-link-status") == "ok" for state in replicas):
                return False
        return True

    def _wait(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {self.timeout_s}s waiting for {what}; "
                                     f"logs in {self.directory}")
            time.sleep(0.1)


@pytest.fixture(name="redis_sentinel")
def redis_sentinel_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinel]:
    with RedisSentinel(tmp_path_factory.mktemp("redis-sentinel")) as sentinel:
        yield sentinel
