"""Redis ACL users per role (broker_serve/protocol/redis_acls.py; docs/security.md, "Redis ACL
users"): a cluster whose controller, proxy and worker node each use their role's user serves
composed calls, streams, jobs and cancellations without one denial, a proxy's or worker's
user cannot write the control state, and users made on every node of a Sentinel-watched Redis
keep working after a failover.

The cluster runs on the shared RabbitMQ and on a Redis of this test's own, whose users it
creates; the processes are started here, as the local cluster starts them, each with its URL.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from starlette.requests import Request
from starlette.responses import StreamingResponse

from broker_serve import serve
from broker_serve.protocol.names import Names
from broker_serve.protocol.redis_acls import ROLES, glob_escape, redis_acl_rules
from broker_serve.state import connection

from . import conftest
from .conftest import ROOT, Cluster, free_port
from .redis_sentinel import redis_sentinel_fixture  # noqa: F401
from .waiting import wait_for

ASYNC = {"Prefer": "respond-async"}


@serve.deployment
class Back:
    async def double(self, x: int) -> int:
        return 2 * x

    async def count(self, n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            await asyncio.sleep(0.01)
            yield i

    async def gate(self, directory: str) -> str:
        """Waits for a file that never comes, until cancelled; says both in files."""
        (Path(directory) / "started").touch()
        try:
            while True:
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            (Path(directory) / "cancelled").touch()
            raise


@serve.deployment
class Front:
    """The ingress: every route calls `Back` through a handle, from the replica."""

    def __init__(self, back: Any) -> None:
        self.back = back

    async def __call__(self, request: Request) -> Any:
        query = request.query_params
        if request.url.path == "/double":
            return {"doubled": await self.back.double.remote(int(query["x"]))}
        if request.url.path == "/count":
            items = self.back.options(method_name="count", stream=True).remote(int(query["n"]))

            async def lines():  # type: ignore[no-untyped-def]
                async for item in items:
                    yield json.dumps(item) + "\n"

            return StreamingResponse(lines(), media_type="application/x-ndjson")
        return await self.back.gate.remote(query["dir"])


@dataclass
class AclRedis:
    port: int
    passwords: dict[str, str]

    def url(self, role: str | None = None) -> str:
        """The URL of `role`'s user, or of the default user (all rights) for the test itself."""
        user = f"bs-{role}:{self.passwords[role]}@" if role else ""
        return f"redis://{user}127.0.0.1:{self.port}/0"

    def client(self, role: str | None = None) -> redis.Redis:
        return redis.Redis.from_url(self.url(role))

    def denials(self) -> list[str]:
        """What Redis refused, as `ACL LOG` lists it: who, which command or key, and why."""
        with self.client() as admin:
            entries = admin.acl_log()
        return [f"{entry['username']}: {entry['reason']} {entry['object']} "
                f"({entry['context']}, {entry['count']}x)" for entry in entries]


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[int]:
    """A Redis of this test's own, thrown away after it."""
    port = free_port()
    with open(tmp_path / "redis.log", "wb") as log:
        process = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=log, stderr=subprocess.STDOUT)
    try:
        with redis.Redis(port=port) as client:
            wait_for(lambda: _answers(client), timeout=10)
        yield port
    finally:
        process.terminate()
        process.wait(10)


def create_users(port: int, cluster: str, passwords: dict[str, str] | None = None) -> AclRedis:
    """One user per role, `bs-<role>`, with the role's rules."""
    passwords = passwords or {role: secrets.token_hex(8) for role in ROLES}
    with redis.Redis(port=port) as admin:
        for role, password in passwords.items():
            admin.execute_command("ACL", "SETUSER", f"bs-{role}", "reset", f">{password}",
                                  *redis_acl_rules(cluster, role))
    return AclRedis(port, passwords)


@dataclass
class AclCluster:
    """The processes of a cluster, each with its role's user."""

    cluster: Cluster
    users: AclRedis
    processes: dict[str, subprocess.Popen[bytes]]

    def stop(self) -> None:
        """Delete this test's apps while the controller runs, then stop every process, as
        SIGTERM does: what they write to Redis as they leave is checked too."""
        if all(process.poll() is None for process in self.processes.values()):
            conftest._shutdown_in_process()
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def acl_cluster(acl_redis: int, cluster: Cluster, monkeypatch: pytest.MonkeyPatch,
                tmp_path: Path) -> Iterator[AclCluster]:
    """A controller, a worker node (with its replicas) and a proxy, each with its role's user;
    this test's serve API is a deploying driver, with the controller's."""
    users = create_users(acl_redis, cluster.name)
    # The namespace's cleanup reads this Redis, which holds the cluster's apps.
    monkeypatch.setattr(conftest, "REDIS_URL", users.url())
    secret = {"BROKER_SERVE_CLUSTER_SECRET": secrets.token_hex(32)}
    monkeypatch.setenv("BROKER_SERVE_CLUSTER_SECRET", secret["BROKER_SERVE_CLUSTER_SECRET"])
    monkeypatch.setenv("BROKER_SERVE_REDIS_URL", users.url("controller"))
    commands = {"controller": ["controller"], "worker": ["worker", "--no-proxy"],
                "proxy": ["proxy", "--host", "127.0.0.1", "--port", str(cluster.port)]}
    started = AclCluster(cluster, users, {})
    try:
        for role, args in commands.items():
            env = {**cluster.env, **secret, "BROKER_SERVE_REDIS_URL": users.url(role)}
            with open(tmp_path / f"{role}.log", "wb") as log:
                started.processes[role] = subprocess.Popen(
                    [sys.executable, "-m", "broker_serve", *args], env=env, cwd=ROOT,
                    stdout=log, stderr=subprocess.STDOUT)
        names = Names(cluster.name)
        with users.client() as admin:

            def ready() -> bool:
                for role, process in started.processes.items():
                    assert process.poll() is None, (role, (tmp_path / f"{role}.log").read_text())
                return bool(admin.exists(names.controller_lease) and admin.hlen(names.nodes)
                            and admin.hlen(names.proxies))

            wait_for(ready, timeout=30)
        yield started
    finally:
        started.stop()


def connected_users(users: AclRedis) -> set[str]:
    with users.client() as admin:
        return {client["user"] for client in admin.client_list()}


def test_each_role_serves_with_its_own_user_and_none_is_denied(acl_cluster, tmp_path):
    cluster, users = acl_cluster.cluster, acl_cluster.users
    serve.run(Front.bind(Back.bind()), name="acl", route_prefix="/")

    composed = requests.get(f"{cluster.url}/double", params={"x": 21}, timeout=30)
    assert composed.status_code == 200, composed.text
    assert composed.json() == {"doubled": 42}

    with requests.get(f"{cluster.url}/count", params={"n": 5}, stream=True,
                      timeout=30) as streamed:
        assert streamed.status_code == 200
        assert [json.loads(line) for line in streamed.iter_lines() if line] == [0, 1, 2, 3, 4]

    submitted = requests.post(f"{cluster.url}/double", params={"x": 5}, headers=ASYNC,
                              timeout=30)
    assert submitted.status_code == 202, submitted.text
    result = requests.get(f"{cluster.url}/-/jobs/{submitted.json()['id']}/result",
                          params={"wait_s": 20}, timeout=30)
    assert result.status_code == 200, result.text
    assert result.json() == {"doubled": 10}

    # A running job cancelled over HTTP: the ingress's replica cancels its call to `Back`.
    gated = requests.post(f"{cluster.url}/gate", params={"dir": str(tmp_path)}, headers=ASYNC,
                          timeout=30)
    assert gated.status_code == 202, gated.text
    job = f"{cluster.url}/-/jobs/{gated.json()['id']}"
    wait_for(lambda: (tmp_path / "started").exists())
    assert requests.delete(job, timeout=30).status_code == 202
    assert requests.get(f"{job}/result", params={"wait_s": 20}, timeout=30).status_code == 499
    wait_for(lambda: (tmp_path / "cancelled").exists())
    assert requests.get(job, timeout=30).json()["status"] == "CANCELLED"

    # Every process used its role's user (replicas their node's), and none was refused,
    # neither while serving nor while leaving.
    assert {f"bs-{role}" for role in ROLES} <= connected_users(users)
    acl_cluster.stop()
    assert users.denials() == []


def test_only_the_controllers_user_writes_the_control_state(acl_redis):
    cluster = "t[*]?\\"  # every glob character: escaped, the patterns match only this cluster
    users = create_users(acl_redis, cluster)
    names = Names(cluster)
    writes = {
        "apps": lambda client: client.hset(names.apps, "app", b"{}"),
        "spec": lambda client: client.set(names.spec("app", "Back", "v1"), b"pickle"),
        "routes": lambda client: client.set(names.routes, b"{}"),
        "traffic": lambda client: client.hset(names.traffic, "t", b"{}"),
        "grpc_options": lambda client: client.set(names.key("grpc_options"), b"{}"),
        "deploy_config": lambda client: client.set(names.deploy_config, b"{}"),
        "assignments": lambda client: client.hset(names.node_assignments("n"), "r", b"{}"),
        "lease": lambda client: client.set(names.controller_lease, b"me"),
        # The unescaped pattern `bs:t[*]?\:*` would match this other cluster's keys (and not
        # its own).
        "another cluster's apps": lambda client: client.hset(Names("t*Z").apps, "app", b"{}"),
    }
    for role in ("proxy", "worker"):
        with users.client(role) as client:
            for what, write in writes.items():
                with pytest.raises(redis.exceptions.NoPermissionError):
                    write(client)
                    pytest.fail(f"the {role}'s user wrote {what}")
            # What they do need still works.
            assert client.get(names.routes) is None
    with users.client("controller") as client:
        for what, write in writes.items():
            if what == "another cluster's apps":
                with pytest.raises(redis.exceptions.NoPermissionError):
                    write(client)
            else:
                write(client)
    assert glob_escape(cluster) == "t\\[\\*\\]\\?\\\\"


def test_role_users_created_on_every_node_work_after_a_sentinel_failover(redis_sentinel):
    cluster = f"t{secrets.token_hex(5)}"
    names = Names(cluster)
    primary = redis_sentinel.primary_port()
    users = create_users(primary, cluster)
    # ACL users are not replicated: the replica does not know them until they are made there.
    replica = redis_sentinel.replica_ports()[0]
    with redis.Redis(port=replica) as admin:
        assert admin.acl_getuser("bs-proxy") is None
    create_users(replica, cluster, users.passwords)

    url = redis_sentinel.url.replace("://", f"://bs-proxy:{users.passwords['proxy']}@", 1)
    proxy = connection.sync_client(url)

    def serve_as_a_proxy() -> bool:
        try:
            proxy.hset(names.proxies, "p1", b"{}")
            proxy.set(names.proxy_alive("p1"), b"1", px=10_000)
            proxy.get(names.routes)
            with pytest.raises(redis.exceptions.NoPermissionError):
                proxy.hset(names.apps, "app", b"{}")
            return True
        except (redis.ConnectionError, redis.TimeoutError, redis.ReadOnlyError):
            return False  # no primary yet: the sentinels are failing over

    try:
        assert serve_as_a_proxy()
        promoted = redis_sentinel.fail_over()
        wait_for(serve_as_a_proxy, timeout=30)
    finally:
        proxy.close()
    promoted_users = AclRedis(promoted, users.passwords)
    # Only the refused write to the apps, made on purpose.
    assert [denial.split()[:3] for denial in promoted_users.denials()] == [
        ["bs-proxy:", "key", names.apps]]
