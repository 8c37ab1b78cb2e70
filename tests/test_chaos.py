"""The chaos suite (docs/reliability.md): broker-serve in durable mode on a 3-node RabbitMQ
cluster and a Redis under Sentinel, with two controllers, two worker nodes and two proxies
behind a TCP balancer, under steady load, while one component at a time is SIGKILLed:

- a RabbitMQ node (the one leading the request queue), then started again;
- the Redis primary (the sentinels promote the replica), then started again as a replica;
- the leading controller (the standby takes the lease), then a new standby;
- a worker node (its replicas die with it; the controller replaces them), then a new node;
- one of the two proxies (the balancer skips it), then started again.

For each fault it counts the requests sent, answered (200 with the right body), failed (an
error status or a connection error: the caller knows), lost (no answer within the client's
timeout: the caller cannot know) and the longest stall (the longest time without an answer).
Lost must be 0; failed must stay under the number of requests in flight when the fault hit
(one per client): what was not yet in flight waits or is published again, and only a request
whose caller's path died mid-flight can fail. The figures are printed as the table of
docs/reliability.md, and written as JSON to $BROKER_SERVE_CHAOS_REPORT if it is set.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
import requests

from .broker_log import BrokerLog
from .conftest import free_port
from .rabbit_cluster import RabbitCluster, rabbitmqctl
from .redis_sentinel import RedisSentinel
from .tcp_balancer import TcpBalancer
from .waiting import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.rabbit_cluster, pytest.mark.timeout(300)]

CLIENTS = 16
CLIENT_TIMEOUT_S = 10.0
BEFORE_S = 3.0  # steady load before the fault
AFTER_S = 12.0  # and after it
TOKEN = "chaos-" + secrets.token_hex(8)

APP = '''
import asyncio

from starlette.requests import Request

from broker_serve import serve


@serve.deployment(queue_type="quorum", num_replicas=4, max_ongoing_requests=8)
class Echo:
    async def __call__(self, request: Request) -> str:
        await asyncio.sleep(0.005)
        return request.query_params["id"]


app = Echo.bind()
'''


@dataclass
class Outcome:
    started: float
    ended: float
    status: int  # 0: a connection error; -1: no answer within the client's timeout
    right: bool
    request_id: str = ""


@dataclass
class Load:
    """CLIENTS threads requesting through the balancer until stopped."""

    url: str
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        return threads

    def _client(self) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            request_id = secrets.token_hex(8)
            started = time.monotonic()
            try:
                # Sent as its X-Request-Id too, which every process's access log shows.
                answer = session.get(self.url, params={"id": request_id},
                                     headers={"X-Request-Id": request_id},
                                     timeout=CLIENT_TIMEOUT_S)
                status, right = answer.status_code, answer.text == request_id
            except requests.Timeout:
                status, right = -1, False
            except requests.RequestException:
                status, right = 0, False
                session = requests.Session()
            with self._lock:
                self.outcomes.append(Outcome(started, time.monotonic(), status, right,
                                             request_id))


@dataclass
class Figures:
    fault: str
    sent: int
    answered: int
    failed: int
    lost: int
    wrong: int
    longest_stall_s: float
    recovered: bool
    lost_ids: list[str] = field(default_factory=list)  # to look for in the processes' logs

    def row(self) -> str:
        return (f"| {self.fault} | {self.sent} | {self.answered} | {self.failed} | {self.lost} "
                f"| {self.longest_stall_s:.2f} s |")


def figures(fault: str, outcomes: list[Outcome], end: float) -> Figures:
    answered = [o for o in outcomes if o.status == 200 and o.right]
    wrong = [o for o in outcomes if o.status == 200 and not o.right]
    lost = [o for o in outcomes if o.status == -1]
    failed = [o for o in outcomes if o.status not in (200, -1)]
    times = sorted(o.ended for o in answered)
    stall = max((b - a for a, b in itertools.pairwise(times)),
                default=end - min((o.started for o in outcomes), default=end))
    tail = [o for o in outcomes if o.started > end - 2.0]
    return Figures(fault, len(outcomes), len(answered), len(failed), len(lost), len(wrong),
                   stall, bool(tail) and all(o.status == 200 and o.right for o in tail),
                   [o.request_id for o in lost])


class Processes:
    """The broker-serve processes of the cluster, each with its log file."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        process = subprocess.Popen([sys.executable, "-m", "broker_serve", *args],
                                   env={**self.env, **env}, stdout=log, stderr=log)
        self.running[name] = process
        return process

    def kill(self, name: str) -> None:
        process = self.running.pop(name)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop_all(self) -> None:
        for process in self.running.values():
            process.send_signal(signal.SIGTERM)
        for process in self.running.values():
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log_tail(self, name: str, lines: int = 30) -> str:
        text = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


@dataclass
class Chaos:
    rabbit: RabbitCluster
    sentinel: RedisSentinel
    processes: Processes
    balancer: TcpBalancer
    cluster: str
    proxy_ports: dict[str, int]
    dashboard_ports: dict[str, int]
    results: list[Figures] = field(default_factory=list)
    node_logs: list[BrokerLog] = field(default_factory=list)

    def broker_errors(self) -> list[str]:
        """The channel and connection errors the cluster's nodes logged since the last look:
        as on the system node, each is a bug of ours (tests/broker_log.py)."""
        return [f"{log.path.name}: {error}" for log in self.node_logs for error in log.read()
                if not error.expected]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.balancer.port}/"

    def redis(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.sentinel.primary_port(), socket_timeout=5)

    def under_load(self, fault: str, inject: Callable[[], None]) -> Figures:
        load = Load(self.url)
        threads = load.run()
        time.sleep(BEFORE_S)
        inject()
        time.sleep(AFTER_S)
        end = time.monotonic()
        load.stop.set()
        for thread in threads:
            thread.join(CLIENT_TIMEOUT_S + 5)
        result = figures(fault, load.outcomes, end)
        self.results.append(result)
        print(f"\n{fault}: {result}")
        return result


def _deploy(chaos: Chaos, app_dir: Path) -> None:
    (app_dir / "chaos_app.py").write_text(APP)
    api = f"http://127.0.0.1:{chaos.dashboard_ports['controller-a']}"
    config = {"applications": [{"name": "echo", "route_prefix": "/", "import_path":
                                "chaos_app:app"}]}
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def listening() -> bool:
        try:
            return requests.get(f"{api}/api/serve/applications/", headers=auth,
                                timeout=5).status_code == 200
        except requests.RequestException:
            return False

    wait_for(listening, 60, 0.2)
    answer = requests.put(f"{api}/api/serve/applications/", json=config, timeout=120,
                          headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["applications"]["echo"]["result"] == "built", answer.text

    def serving() -> bool:
        try:
            return all(requests.get(f"http://127.0.0.1:{port}/", params={"id": "x"},
                                    timeout=5).text == "x" for port in chaos.proxy_ports.values())
        except requests.RequestException:
            return False

    wait_for(serving, 90, 0.5)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chaos]:
    base = tmp_path_factory.mktemp("chaos")
    app_dir, logs = base / "apps", base / "logs"
    app_dir.mkdir()
    logs.mkdir()
    name = f"chaos{secrets.token_hex(4)}"
    with RabbitCluster() as rabbit, RedisSentinel(base / "redis") as sentinel:
        env = {**os.environ, "BROKER_SERVE_CLUSTER": name,
               "BROKER_SERVE_AMQP_URL": rabbit.amqp_url,
               "BROKER_SERVE_REDIS_URL": sentinel.url,
               "BROKER_SERVE_API_TOKEN": TOKEN,
               "BROKER_SERVE_CLUSTER_SECRET": secrets.token_hex(32),  # as an operator gives it
               "BROKER_SERVE_QUEUE_TYPE": "quorum",
               "BROKER_SERVE_APP_DIR": str(app_dir),
               "BROKER_SERVE_STATE_DIR": str(base / "state"),
               "BROKER_SERVE_METRICS_PORT": "0"}
        processes = Processes(env, logs)
        dashboards = {"controller-a": free_port(), "controller-b": free_port()}
        proxies = {"proxy-a": free_port(), "proxy-b": free_port()}
        for controller, port in dashboards.items():
            processes.start(controller, "controller", "--dashboard-port", str(port))
        for worker in ("worker-a", "worker-b"):
            processes.start(worker, "worker", "--no-proxy", "--num-cpus", "4")
        for proxy, port in proxies.items():
            processes.start(proxy, "proxy", "--port", str(port))
        balancer = TcpBalancer([("127.0.0.1", port) for port in proxies.values()])
        balancer.start()
        created = Chaos(rabbit, sentinel, processes, balancer, name, proxies, dashboards,
                        node_logs=[BrokerLog(node.log_file) for node in rabbit.nodes])
        try:
            _deploy(created, app_dir)
            yield created
        finally:
            _report(created.results)
            balancer.stop()
            processes.stop_all()


def _report(results: list[Figures]) -> None:
    if not results:
        return
    table = ["| fault | sent | answered | failed | lost | longest stall |",
             "| --- | --- | --- | --- | --- | --- |", *(r.row() for r in results)]
    print("\n" + "\n".join(table))
    path = os.environ.get("BROKER_SERVE_CHAOS_REPORT")
    if path:
        Path(path).write_text(json.dumps([r.__dict__ for r in results], indent=2))


def _check(result: Figures, chaos: Chaos) -> None:
    assert chaos.broker_errors() == []
    assert result.sent > 100, result
    assert result.lost == 0, result
    assert result.wrong == 0, result
    assert result.failed <= CLIENTS, result  # at most what was in flight when it hit
    assert result.recovered, result  # the last 2 s: every request answered


def test_a_rabbitmq_node_is_killed(chaos: Chaos) -> None:
    queue = f"bs.{chaos.cluster}.echo.Echo"
    listed = rabbitmqctl(chaos.rabbit.node_names[0], "list_queues", "--quiet", "--no-table-headers",
                         "name", "leader").stdout
    leader = next(line.split()[1] for line in listed.splitlines() if line.startswith(queue))
    index = chaos.rabbit.node_names.index(leader)
    result = chaos.under_load("a RabbitMQ node (the request queue's leader)",
                              lambda: chaos.rabbit.kill(index))
    chaos.rabbit.start(index)
    _check(result, chaos)


def test_the_redis_primary_is_killed(chaos: Chaos) -> None:
    killed: list[int] = []
    result = chaos.under_load("the Redis primary",
                              lambda: killed.append(chaos.sentinel.kill_primary()))
    chaos.sentinel.wait_failover(killed[0])
    chaos.sentinel.revive(killed[0])
    _check(result, chaos)
    # the control plane resumed on the promoted replica: the lease is held again
    wait_for(lambda: chaos.redis().get(f"bs:{chaos.cluster}:controller:lease"), 20, 0.2)


def test_the_leading_controller_is_killed(chaos: Chaos) -> None:
    lease = f"bs:{chaos.cluster}:controller:lease"
    holder = wait_for(lambda: chaos.redis().get(lease), 20, 0.2).decode()
    leader = next(n for n, p in chaos.processes.running.items()
                  if n.startswith("controller") and holder.endswith(f"-{p.pid}"))
    result = chaos.under_load("the leading controller", lambda: chaos.processes.kill(leader))
    # the standby leads within the lease's 4 s
    try:
        wait_for(lambda: (value := chaos.redis().get(lease)) and value.decode() != holder,
                 20, 0.2)
    except AssertionError:
        standbys = [n for n in chaos.processes.running if n.startswith("controller")]
        raise AssertionError(f"no controller took the lease of {holder} within 20 s; "
                             + "".join(f"\n--- {n} ---\n{chaos.processes.log_tail(n, 60)}"
                                       for n in standbys)) from None
    chaos.processes.start(leader, "controller", "--dashboard-port",
                          str(chaos.dashboard_ports[leader]))
    _check(result, chaos)


def test_a_worker_node_is_killed(chaos: Chaos) -> None:
    result = chaos.under_load("a worker node (and its replicas)",
                              lambda: chaos.processes.kill("worker-a"))
    chaos.processes.start("worker-a", "worker", "--no-proxy", "--num-cpus", "4")
    _check(result, chaos)


def test_a_proxy_is_killed(chaos: Chaos) -> None:
    result = chaos.under_load("one of the two proxies", lambda: chaos.processes.kill("proxy-a"))
    chaos.processes.start("proxy-a", "proxy", "--port", str(chaos.proxy_ports["proxy-a"]))
    _check(result, chaos)
