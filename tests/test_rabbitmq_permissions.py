"""Per-role RabbitMQ users (docs/security.md, "Per-role RabbitMQ users"): a cluster whose
controller, worker node and proxy each run with their role's user serves as before, with no
access refused in RabbitMQ's log; and each boundary holds: a proxy's user cannot consume or
declare a request queue, a worker's cannot delete one nor read the dead letters, and a backend
service's reaches the deployments it was granted and no other.

The users live in a vhost of the test's own on the shared broker, deleted after. The refusals
the test provokes come from connections named `test-expects-error`, which the suite's oracle
of RabbitMQ's log expects (tests/broker_log.py); any other refusal fails the test."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pika
import pika.exceptions
import pytest
import redis
import requests

from broker_serve import serve
from broker_serve.protocol.names import Names
from broker_serve.protocol.permissions import ROLES, Permissions, rabbitmq_permissions

from .conftest import Cluster, _shutdown_in_process, free_port, namespace
from .test_protocol_foreign import ForeignClient, pack
from .waiting import wait_for

REFUSED = f"test-expects-error {__name__}"
APP = "perm"


@serve.deployment
class Echo:
    def __init__(self) -> None:
        self.ran: Counter[str] = Counter()

    def __call__(self, word: str) -> str:  # a sync handler, run in the replica's threads
        self.ran[word] += 1
        return word.upper()

    def runs(self) -> dict[str, int]:
        return dict(self.ran)

    def shout(self, word: str) -> str:
        return f"{word.upper()}!"


@serve.deployment
class Ingress:
    def __init__(self, echo) -> None:
        self.echo = echo

    async def __call__(self, request) -> dict[str, str]:
        word = request.query_params["word"]
        return {"word": word, "echoed": await self.echo.remote(word)}


@dataclass
class Vhost:
    name: str
    users: dict[str, str]  # role -> password; each role's user is named after it, suffixed

    def user(self, role: str) -> str:
        return f"{role}-{self.name}"

    def url(self, role: str) -> str:
        return f"amqp://{self.user(role)}:{self.users[role]}@127.0.0.1:5672/{self.name}"


def _rabbitmqctl(*args: str, input: str | None = None) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True,
                   input=input, timeout=60)


def _connects(url: str) -> bool:
    try:
        pika.BlockingConnection(pika.URLParameters(url)).close()
    except pika.exceptions.AMQPConnectionError:
        return False
    return True


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path]]:
    """One cluster namespace for the module's tests: starting its processes is most of their
    time."""
    logs = tmp_path_factory.mktemp("permissions")
    with pytest.MonkeyPatch.context() as monkeypatch, namespace(monkeypatch, logs) as cluster:
        yield cluster, logs


@pytest.fixture(scope="module")
def vhost(shared: tuple[Cluster, Path]) -> Iterator[Vhost]:
    """A vhost with one user per role, each with `broker-serve permissions`' rights; the
    backend is granted Echo only. Imported as one definitions file: one rabbitmqctl call."""
    cluster = shared[0]
    created = Vhost(f"bs-{cluster.name}", {role: secrets.token_hex(8) for role in ROLES})
    grants: dict[str, Permissions] = {
        role: rabbitmq_permissions(cluster.name, role, [(APP, "Echo")] if role == "backend"
                                   else ()) for role in ROLES}
    definitions = {
        "vhosts": [{"name": created.name}],
        "users": [{"name": created.user(role), "password": password, "tags": ""}
                  for role, password in created.users.items()],
        "permissions": [{"user": created.user(role), "vhost": created.name,
                         "configure": grant.configure, "write": grant.write,
                         "read": grant.read} for role, grant in grants.items()],
    }
    # From standard input: the broker itself could not read a file in the test's tmp_path.
    _rabbitmqctl("import_definitions", input=json.dumps(definitions))
    for role in ROLES:  # the import is asynchronous
        wait_for(lambda role=role: _connects(created.url(role)), timeout=30)
    try:
        yield created
    finally:
        _rabbitmqctl("delete_vhost", created.name)
        for role in ROLES:
            _rabbitmqctl("delete_user", created.user(role))


@dataclass
class RoleCluster:
    cluster: Cluster
    vhost: Vhost
    proxy_url: str


@pytest.fixture(scope="module")
def role_cluster(shared: tuple[Cluster, Path], vhost: Vhost) -> Iterator[RoleCluster]:
    """The controller, a worker node and a proxy, each with its role's user; this process
    (the driver, an operator's) deploys with the controller's."""
    cluster, tmp_path = shared
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("BROKER_SERVE_AMQP_URL", vhost.url("controller"))
    proxy_port = free_port()
    commands = {
        "controller": ["controller"],
        "worker": ["worker", "--no-proxy"],
        "proxy": ["proxy", "--port", str(proxy_port)],
    }
    processes = []
    try:
        for role, command in commands.items():
            with (tmp_path / f"{role}.log").open("ab") as log:  # the child has its own copy
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "broker_serve", *command],
                    env={**cluster.env, "BROKER_SERVE_AMQP_URL": vhost.url(role)},
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        # The driver joins the controller once it leads (else it would start a cluster).
        lease = Names(cluster.name).controller_lease
        with redis.Redis.from_url(cluster.env["BROKER_SERVE_REDIS_URL"]) as client:
            wait_for(lambda: client.exists(lease), timeout=60)
        serve.run(Ingress.bind(Echo.bind()), name=APP, route_prefix="/")
        wait_for(lambda: _answers(f"{proxy_url}/-/healthz"), timeout=60)  # it has the route
        yield RoleCluster(cluster, vhost, proxy_url)
    finally:
        _shutdown_in_process()  # its connection is in the vhost, deleted after
        monkeypatch.undo()
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        for role in commands:
            print(f"--- {role} ---\n" + (tmp_path / f"{role}.log").read_text()[-3000:])


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _refused(url: str, action) -> pika.exceptions.ChannelClosedByBroker:
    """What RabbitMQ closes the channel with when `action(channel)` runs on a connection of
    `url`'s user."""
    parameters = pika.URLParameters(url)
    parameters.client_properties = {"connection_name": REFUSED}
    connection = pika.BlockingConnection(parameters)
    try:
        channel = connection.channel()
        channel.confirm_delivery()  # so that a publish waits for its answer, as the rest do
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            action(channel)
        return refused.value
    finally:
        connection.close()


def _access_refused(url: str, action) -> None:
    closed = _refused(url, action)
    assert closed.reply_code == 403 and "ACCESS_REFUSED" in closed.reply_text, closed


def test_each_role_serves_with_its_own_user_and_every_request_runs_once(role_cluster):
    """Through the proxy's user to the ingress, through the worker's to Echo (a handle call
    from a replica), and back: concurrent requests, each answered with its own word."""
    words = [f"w{index}" for index in range(64)]

    def ask(word: str) -> tuple[int, dict[str, str]]:
        response = requests.get(role_cluster.proxy_url, params={"word": word}, timeout=30)
        return response.status_code, response.json()

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, words))
    assert answers == [(200, {"word": word, "echoed": word.upper()}) for word in words]
    runs = serve.get_deployment_handle("Echo", APP).runs.remote().result(timeout_s=10)
    assert {word: runs.get(word) for word in words} == dict.fromkeys(words, 1)
    # A job, published persistently by the proxy, run by the worker, its result stored.
    submitted = requests.get(role_cluster.proxy_url, params={"word": "later"},
                             headers={"Prefer": "respond-async"}, timeout=10)
    assert submitted.status_code == 202, submitted.text
    result = requests.get(f"{role_cluster.proxy_url}{submitted.headers['Location']}/result",
                          params={"wait_s": 20}, timeout=30)
    assert result.status_code == 200 and result.json() == {"word": "later", "echoed": "LATER"}


def test_a_proxy_cannot_consume_or_declare_a_request_queue(role_cluster):
    names = Names(role_cluster.cluster.name)
    queue = names.request_queue(APP, "Echo")
    proxy = role_cluster.vhost.url("proxy")
    _access_refused(proxy, lambda channel: channel.basic_consume(queue, lambda *_: None))
    _access_refused(proxy, lambda channel: channel.basic_get(queue))
    _access_refused(proxy, lambda channel: channel.queue_declare(queue, durable=True))
    _access_refused(proxy, lambda channel: channel.queue_delete(queue))
    _access_refused(proxy, lambda channel: channel.basic_consume(names.dead_letters,
                                                                 lambda *_: None))


def test_a_worker_cannot_delete_a_request_queue_nor_read_the_dead_letters(role_cluster):
    names = Names(role_cluster.cluster.name)
    worker = role_cluster.vhost.url("worker")
    _access_refused(worker, lambda channel: channel.queue_delete(
        names.request_queue(APP, "Echo")))
    _access_refused(worker, lambda channel: channel.queue_declare(
        names.request_queue(APP, "Other"), durable=True))
    _access_refused(worker, lambda channel: channel.basic_get(names.dead_letters))
    _access_refused(worker, lambda channel: channel.exchange_delete(
        names.deployment_exchange(APP, "Echo")))


def test_a_backend_reaches_the_deployment_it_was_granted_and_no_other(role_cluster):
    names = Names(role_cluster.cluster.name)
    backend = ForeignClient(role_cluster.vhost.url("backend"), name=f"{__name__} backend")
    try:
        reply = backend.call("", "shout", "hi", exchange=names.deployment_exchange(APP, "Echo"))
        assert reply.types == ["result"] and reply.terminal.body["value"] == "HI!"
    finally:
        backend.close()
    url = role_cluster.vhost.url("backend")
    call = pack({"method": "__call__", "args": ["x"], "kwargs": {}})
    # Not granted: the ingress's exchange, and any queue through the default exchange.
    _access_refused(url, lambda channel: channel.basic_publish(
        names.deployment_exchange(APP, "Ingress"), "", call))
    _access_refused(url, lambda channel: channel.basic_publish(
        "", names.request_queue(APP, "Echo"), call))
    _access_refused(url, lambda channel: channel.basic_consume(
        names.request_queue(APP, "Echo"), lambda *_: None))
    _access_refused(url, lambda channel: channel.exchange_declare(
        names.deployment_exchange(APP, "Other"), "fanout"))


def test_the_permissions_command_prints_what_the_tests_grant(cluster):
    printed = subprocess.run(
        [sys.executable, "-m", "broker_serve", "permissions", "backend", "svc", "-p", "v",
         "--grant", f"{APP}/Echo"], env=cluster.env, capture_output=True, text=True, check=True)
    assert printed.stdout.strip() == rabbitmq_permissions(
        cluster.name, "backend", [(APP, "Echo")]).rabbitmqctl("svc", "v")
    wrong = subprocess.run(
        [sys.executable, "-m", "broker_serve", "permissions", "proxy", "p", "--grant", "a/B"],
        env=cluster.env, capture_output=True, text=True)
    assert wrong.returncode == 2 and "--grant is for the backend role" in wrong.stderr
