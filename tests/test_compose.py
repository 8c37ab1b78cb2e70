"""docker-compose.yml and the operator files in deploy/.

No Docker engine runs on the test machines. So the first test starts every service built from
this repository as Compose would (tests/compose_local.py), scaled to two proxies and two workers,
with the machine's RabbitMQ and Redis in place of the compose ones, and drives requests through
both proxies. The others check the compose file, the RabbitMQ users of each role (and boot a
RabbitMQ node of the test's own on their definitions), the images, the load balancer,
Prometheus and the Grafana dashboard against each other, and run `docker compose config`,
`haproxy -c` and `promtool` where those are installed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pika
import pika.exceptions
import pytest
import redis
import requests
import yaml

from broker_serve.protocol.names import Names
from broker_serve.protocol.permissions import Permissions, rabbitmq_permissions
from broker_serve.protocol.redis_acls import redis_acl_rules
from broker_serve.state.connection import parse_sentinel_url
from broker_serve.transport.addresses import parse as parse_amqp_nodes

from .compose_local import (
    COMPOSE_FILE,
    ENV_FILE,
    Image,
    LocalCompose,
    built_services,
    depends_on,
    dockerfile_instructions,
    exec_form,
    exposed_ports,
    interpolate,
    load_compose,
    load_compose_file,
    read_env_file,
)
from .conftest import REDIS_URL, ROOT, free_port
from .rabbit_cluster import RabbitCluster, rabbitmqctl
from .waiting import wait_for

DEPLOY = ROOT / "deploy"
HA_ENV = DEPLOY / "ha.env"
RABBITMQ_NODES = ("rabbitmq-1", "rabbitmq-2", "rabbitmq-3")
SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
HA_INFRASTRUCTURE = {*RABBITMQ_NODES, "redis-primary", "redis-replica", *SENTINELS}
SINGLE_INFRASTRUCTURE = {"rabbitmq", "redis"}
HISTOGRAMS = {
    "broker_serve_proxy_request_duration_seconds",
    "broker_serve_replica_processing_seconds",
    "broker_serve_replica_queue_wait_seconds",
    "broker_serve_replica_batch_size",
}
# The metrics each process serves, and where (the contract the metrics code implements).
METRICS = HISTOGRAMS | {
    "broker_serve_proxy_requests_total",
    "broker_serve_proxy_inflight_requests",
    "broker_serve_proxy_open_streams",
    "broker_serve_proxy_open_websockets",
    "broker_serve_proxy_backpressure_rejections_total",
    "broker_serve_replica_ongoing_requests",
    "broker_serve_replica_errors_total",
    "broker_serve_replica_model_loads_total",
    "broker_serve_replica_redeliveries_total",
    "broker_serve_replica_channels_lost_total",
    "broker_serve_controller_queue_depth",
    "broker_serve_controller_replicas",
    "broker_serve_controller_autoscaling_decisions_total",
    "broker_serve_controller_is_leader",
    "broker_serve_jobs",
    "broker_serve_jobs_finished_total",
    "broker_serve_job_retries_total",
    "broker_serve_job_dead_letters_total",
    "broker_serve_dead_letters",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def ha_compose() -> dict[str, Any]:
    return load_compose(env_file=HA_ENV)


def _port_flag(command: list[str]) -> int:
    return int(command[command.index("--port") + 1])


# the compose services, started locally ----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_services_start_and_serve_scaled(cluster, tmp_path, compose):
    stack = LocalCompose(compose, cluster.name, tmp_path, scale={"proxy": 2, "worker": 2})
    try:
        stack.up()
        proxies = [f"http://127.0.0.1:{p.ports[8000]}" for p in stack.instances["proxy"]]
        for url in proxies:
            _wait_for_app(stack, url)
        # A proxy routes once one replica runs; the second may still be starting.
        _wait_for_running(cluster.name, "default")

        replicas = set()
        for n, url in enumerate(proxies):
            for i in range(8):
                answer = requests.get(f"{url}/", params={"name": f"p{n}-{i}"}, timeout=10)
                assert answer.status_code == 200, answer.text
                assert answer.json()["message"] == f"Hello, p{n}-{i}!"
                replicas.add(answer.json()["replica"])
        assert len(replicas) == 2, replicas  # examples/hello.py asks for two replicas
        stream = requests.get(f"{proxies[1]}/stream", params={"count": 3}, timeout=10)
        assert stream.text == "0\n1\n2\n"
        _assert_every_instance_serves_its_metrics(stack)

        workers = {f"{socket.gethostname()}-{w.process.pid}" for w in stack.instances["worker"]
                   if w.process is not None}
        assert _nodes_of(cluster.name, replicas) == workers  # one replica on each worker
        for service, definition in built_services(compose).items():
            if "healthcheck" in definition:
                assert stack.healthy(service), f"{service}'s healthcheck fails"
        stack.assert_running()
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.down()
    deadline = time.monotonic() + 10
    while stack.leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not stack.leftovers(), "processes of the namespace outlived the stack"


def _wait_for_app(stack: LocalCompose, url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.assert_running()
        try:
            if requests.get(f"{url}/", timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not serve the example within {timeout}s")


def _wait_for_running(cluster: str, app: str, timeout: float = 90) -> None:
    """Until the controller reports the app RUNNING: every replica it asks for runs."""
    client = redis.Redis.from_url(REDIS_URL)

    def running() -> bool:
        raw = client.hget(f"bs:{cluster}:app_status", app)
        return raw is not None and orjson.loads(raw)["status"] == "RUNNING"

    try:
        wait_for(running, timeout=timeout)
    finally:
        client.close()


# Where Prometheus scrapes each service (deploy/prometheus/prometheus.yml), and what must be
# there once the example has served requests.
SERVED = {
    "proxy": ("/-/metrics", 8000, {"broker_serve_proxy_requests_total",
                                   "broker_serve_proxy_request_duration_seconds_bucket",
                                   "broker_serve_proxy_inflight_requests"}),
    "worker": ("/metrics", 9500, {"broker_serve_replica_processing_seconds_bucket",
                                  "broker_serve_replica_queue_wait_seconds_bucket",
                                  "broker_serve_replica_ongoing_requests"}),
    "controller": ("/metrics", 8265, {"broker_serve_controller_replicas",
                                      "broker_serve_controller_queue_depth",
                                      "broker_serve_controller_is_leader"}),
}


def _assert_every_instance_serves_its_metrics(stack: LocalCompose) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    for service, (path, port, wanted) in SERVED.items():
        for instance in stack.instances[service]:
            url = f"http://127.0.0.1:{instance.ports[port]}{path}"
            deadline = time.monotonic() + 10  # a replica's metrics arrive within a second
            while True:
                text = requests.get(url, timeout=5).text
                names = {sample.name for family in text_string_to_metric_families(text)
                         for sample in family.samples}
                if wanted <= names or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert wanted <= names, (url, sorted(wanted - names))
            assert names <= METRICS | {f"{h}_{s}" for h in HISTOGRAMS
                                       for s in ("bucket", "count", "sum")} | {
                n for n in names if not n.startswith("broker_serve_")}, (url, names)


def _nodes_of(cluster: str, replica_ids: set[str]) -> set[str]:
    client = redis.Redis.from_url(REDIS_URL)
    try:
        records = client.hgetall(f"bs:{cluster}:replicas")
    finally:
        client.close()
    return {orjson.loads(raw)["node"] for rid, raw in records.items()
            if rid.decode() in replica_ids}


# the compose file ------------------------------------------------------------------------------
def test_compose_file_structure(compose):
    services = compose["services"]
    assert {"rabbitmq", "redis", "controller", "proxy", "worker", "app", "loadbalancer",
            "prometheus", "grafana"} <= services.keys()
    for name, service in services.items():
        assert "image" in service or "build" in service, name
    for name, service in built_services(compose).items():
        assert isinstance(service.get("command"), list) and service["command"], name
        env = service["environment"]
        assert _host(env["BROKER_SERVE_AMQP_URL"]) == "rabbitmq", name
        assert _host(env["BROKER_SERVE_REDIS_URL"]) == "redis", name
        assert env["BROKER_SERVE_CLUSTER"] == services["controller"]["environment"][
            "BROKER_SERVE_CLUSTER"], f"{name} is in another cluster"
    for name in ("proxy", "worker"):  # scalable with --scale
        assert "container_name" not in services[name], name
        assert "ports" not in services[name], name
    assert _port_flag(services["proxy"]["command"]) in exposed_ports(services["proxy"])

    assert "management" in services["rabbitmq"]["image"]
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--appendonly") + 1] == "yes"
    for name in ("rabbitmq", "redis"):
        assert services[name]["healthcheck"]["test"], name
        assert any(v.split(":")[0] in compose["volumes"] for v in services[name]["volumes"]), name
    assert services["controller"]["environment"]["BROKER_SERVE_QUEUE_TYPE"] == "classic"
    _assert_wiring(compose)
    for name in ("rabbitmq", "redis"):
        assert depends_on(services["controller"])[name] == "service_healthy"


def _assert_wiring(compose: dict[str, Any]) -> None:
    """Dependencies, mounts and named volumes exist; the app waits for what it needs."""
    services = compose["services"]
    for name, service in services.items():
        for dependency, condition in depends_on(service).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            assert condition in ("service_started", "service_healthy",
                                 "service_completed_successfully"), (name, condition)
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in (compose.get("volumes") or {}), f"{name}: undeclared {source}"
        for secret in service.get("secrets", []):
            assert (ROOT / compose["secrets"][secret]["file"]).is_file(), (name, secret)
    # `broker-serve run` starts a cluster of its own when no controller leads: it must wait.
    assert depends_on(services["app"])["controller"] == "service_healthy"
    assert depends_on(services["app"])["worker"] == "service_healthy"  # replicas spread


def _host(url: str) -> str | None:
    return urlsplit(url).hostname


def test_example_is_deployed_as_the_serve_config_says(compose):
    command = compose["services"]["app"]["command"]
    assert command[0] == "run"
    config = yaml.safe_load((DEPLOY / "serve-config.yaml").read_text())
    (application,) = config["applications"]
    assert application["import_path"] == command[1]
    assert application["name"] == command[command.index("--name") + 1]
    assert config["http_options"]["port"] == _port_flag(compose["services"]["proxy"]["command"])


# The services that sign or verify with the cluster secret (docs/architecture.md, "Trust"):
# the controller builds a config's applications, replicas verify, `run` is a driver, and a proxy
# verifies the grpc_options it imports gRPC servicer modules from.
SIGNERS = {"controller", "worker", "app", "proxy"}


def test_the_cluster_secret_is_mounted_where_it_signs_and_nowhere_else(compose, ha_compose):
    for project in (compose, ha_compose):
        services = built_services(project)
        assert set(services) == SIGNERS
        files = set()
        for name, service in services.items():
            env = service["environment"]
            assert "BROKER_SERVE_CLUSTER_SECRET" not in env, name  # a file, not a variable
            (secret,) = service["secrets"]
            assert env["BROKER_SERVE_CLUSTER_SECRET_FILE"] == f"/run/secrets/{secret}", name
            files.add(project["secrets"][secret]["file"])
        (path,) = files  # one secret: the same for every process
        assert re.fullmatch(r"[0-9a-f]{64}\n?", (ROOT / path).read_text()), path


def test_docker_compose_config_accepts_the_file():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"],
                                        capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    for env_file in (ENV_FILE, HA_ENV):
        check = subprocess.run([docker, "compose", "-f", str(COMPOSE_FILE), "--env-file",
                                str(env_file), "config", "--format", "json"],
                               capture_output=True, text=True, cwd=ROOT)
        assert check.returncode == 0, (env_file, check.stderr)
        # Compose enables the services this file's reading of the profiles says it does.
        assert json.loads(check.stdout)["services"].keys() == \
            load_compose(env_file=env_file)["services"].keys(), env_file


# the profiles ----------------------------------------------------------------------------------
def test_interpolation_resolves_as_compose_does():
    variables = {"SET": "value", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${UNSET:-d}", variables) == "value d d"
    assert interpolate("${SET-d} ${EMPTY-d} ${UNSET-d}", variables) == "value  d"
    assert interpolate("${SET:+a} ${EMPTY:+a} ${UNSET+a} $SET $$SET", variables) == \
        "a   value $SET"
    with pytest.raises(AssertionError, match="UNSET"):
        interpolate("${UNSET:?must be set}", variables)


def test_each_profile_runs_one_infrastructure(compose, ha_compose):
    written = load_compose_file()["services"]
    for name, service in written.items():
        expected = (["single"] if name in SINGLE_INFRASTRUCTURE
                    else ["ha"] if name in HA_INFRASTRUCTURE else None)
        assert service.get("profiles") == expected, name
    # A plain `docker compose up` reads .env: today's single nodes.
    assert read_env_file(ENV_FILE) == {"COMPOSE_PROFILES": "single"}
    assert read_env_file(HA_ENV)["COMPOSE_PROFILES"] == "ha"
    assert SINGLE_INFRASTRUCTURE <= compose["services"].keys()
    assert not HA_INFRASTRUCTURE & compose["services"].keys()
    assert HA_INFRASTRUCTURE <= ha_compose["services"].keys()
    assert not SINGLE_INFRASTRUCTURE & ha_compose["services"].keys()
    assert compose["services"].keys() - SINGLE_INFRASTRUCTURE == \
        ha_compose["services"].keys() - HA_INFRASTRUCTURE
    # Every variable the file interpolates is one deploy/ha.env sets.
    used = set(re.findall(r"\$\{(\w+)[:?+}-]", COMPOSE_FILE.read_text()))
    assert used and used <= read_env_file(HA_ENV).keys(), used - read_env_file(HA_ENV).keys()
    _assert_wiring(ha_compose)


def test_broker_serve_waits_for_the_ha_infrastructure(ha_compose):
    services = ha_compose["services"]
    waited = {*RABBITMQ_NODES, "redis-primary", *SENTINELS}
    for name in built_services(ha_compose):
        conditions = depends_on(services[name])
        assert {conditions.get(d) for d in waited} == {"service_healthy"}, name
    # The first node boots alone, the others join it (deploy/rabbitmq/cluster.conf).
    for name in RABBITMQ_NODES[1:]:
        assert depends_on(services[name]) == {RABBITMQ_NODES[0]: "service_healthy"}, name
    assert int(services["controller"]["deploy"]["replicas"]) == 2  # one leads, one stands by


def test_every_ha_service_is_checked_and_keeps_its_state(ha_compose, compose):
    services = ha_compose["services"]
    data_volumes = {}
    for name in HA_INFRASTRUCTURE:
        service = services[name]
        assert service["healthcheck"]["test"], name
        assert service["restart"] == "unless-stopped", name
        target = "/var/lib/rabbitmq" if name in RABBITMQ_NODES else "/data"
        (volume,) = [v.split(":")[0] for v in service["volumes"]
                     if v.split(":")[1] == target]
        assert volume in ha_compose["volumes"], name
        data_volumes[name] = volume
    assert len(set(data_volumes.values())) == len(data_volumes), data_volumes  # one each
    for name in RABBITMQ_NODES:
        assert services[name]["image"] == compose["services"]["rabbitmq"]["image"], name
    for name in HA_INFRASTRUCTURE - set(RABBITMQ_NODES):
        assert services[name]["image"] == compose["services"]["redis"]["image"], name


def _mounted(service: dict[str, Any], target: str) -> Path:
    (source,) = [v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == target]
    assert source.startswith("./"), source
    return ROOT / source


def _rabbitmq_config(path: Path) -> dict[str, str]:
    """rabbitmq.conf's `key = value` lines (the sysctl format)."""
    settings = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, equals, value = line.partition("=")
            assert equals, line
            settings[key.strip()] = value.strip()
    return settings


def test_rabbitmq_nodes_list_each_other_and_share_the_cookie(ha_compose):
    services = ha_compose["services"]
    names = {f"rabbit@{services[n]['hostname']}" for n in RABBITMQ_NODES}
    assert names == {f"rabbit@{n}" for n in RABBITMQ_NODES}  # resolvable: the service names
    cookies = set()
    for name in RABBITMQ_NODES:
        node = services[name]
        config = _rabbitmq_config(_mounted(node, "/etc/rabbitmq/conf.d/20-cluster.conf"))
        assert config["cluster_formation.peer_discovery_backend"] == "classic_config", name
        peers = {v for k, v in config.items()
                 if re.fullmatch(r"cluster_formation\.classic_config\.nodes\.\d+", k)}
        assert peers == names, name
        # The cookie: the shared secret copied, private to the rabbitmq user, before the
        # image's own entrypoint starts the node.
        assert "RABBITMQ_ERLANG_COOKIE" not in (node.get("environment") or {}), name
        (secret,) = node["secrets"]
        shell = node["entrypoint"][-1]
        assert node["entrypoint"][:2] == ["sh", "-c"], name
        assert re.search(rf"install -m 600 -o rabbitmq -g rabbitmq /run/secrets/{secret}\s+"
                         r"/var/lib/rabbitmq/\.erlang\.cookie &&", shell), shell
        assert shell.endswith("exec docker-entrypoint.sh rabbitmq-server"), shell
        cookies.add(ha_compose["secrets"][secret]["file"])
    (cookie_file,) = cookies
    cookie = (ROOT / cookie_file).read_text()
    # Erlang takes printable ASCII, up to 255 characters.
    assert re.fullmatch(r"[!-~]{20,255}", cookie), "the cookie must be one printable line"


def _directives(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _runs_a_copy(service: dict[str, Any], config: str, copy: str) -> str:
    """The mounted config `service` copies into its volume at its first start and runs."""
    assert service["command"][:2] == ["sh", "-c"]
    shell = service["command"][-1]
    assert f"test -f {copy} || cp {config} {copy};" in shell, shell
    return shell.split(";", 1)[1].strip()


def test_sentinels_monitor_the_primary_with_quorum_2(ha_compose):
    services = ha_compose["services"]
    monitored = set()
    for name in SENTINELS:
        sentinel = services[name]
        config = _mounted(sentinel, "/etc/redis/sentinel.conf")
        started = _runs_a_copy(sentinel, "/etc/redis/sentinel.conf", "/data/sentinel.conf")
        assert started == "exec docker-entrypoint.sh redis-server /data/sentinel.conf --sentinel"
        directives = _directives(config)
        assert ["port", "26379"] in directives
        (monitor,) = [d for d in directives if d[:2] == ["sentinel", "monitor"]]
        service_name, host, port, quorum = monitor[2:]
        assert (host, port, quorum) == ("redis-primary", "6379", "2"), name
        # Hostnames resolve only with this, and only for the lines after it.
        assert directives.index(["sentinel", "resolve-hostnames", "yes"]) < \
            directives.index(monitor)
        assert f"ckquorum {service_name}" in " ".join(sentinel["healthcheck"]["test"]), name
        monitored.add(service_name)
    assert len(monitored) == 1

    primary = services["redis-primary"]
    replica = services["redis-replica"]
    for node, name in ((primary, "primary"), (replica, "replica")):
        config = _mounted(node, f"/etc/redis/{name}.conf")
        assert _runs_a_copy(node, f"/etc/redis/{name}.conf", "/data/redis.conf") == \
            "exec docker-entrypoint.sh redis-server /data/redis.conf"
        directives = _directives(config)
        assert ["appendonly", "yes"] in directives, name  # as the single profile's redis
        assert ["port", "6379"] in directives, name
    assert ["replicaof", "redis-primary", "6379"] in _directives(
        _mounted(replica, "/etc/redis/replica.conf"))
    assert depends_on(replica) == {"redis-primary": "service_healthy"}


def test_ha_env_urls_name_the_ha_services(ha_compose):
    services = ha_compose["services"]
    env = services["controller"]["environment"]
    nodes = [urlsplit(url) for url in parse_amqp_nodes(env["BROKER_SERVE_AMQP_URL"])]
    assert [(n.hostname, n.port) for n in nodes] == [(n, 5672) for n in RABBITMQ_NODES]
    for name in RABBITMQ_NODES:  # they listen on the image's AMQP port, 5672
        config = _rabbitmq_config(_mounted(services[name], "/etc/rabbitmq/conf.d/20-cluster.conf"))
        assert not any(key.startswith("listeners.tcp") for key in config), name

    address = parse_sentinel_url(env["BROKER_SERVE_REDIS_URL"])
    assert address.sentinels == [(name, 26379) for name in SENTINELS]
    config = _directives(_mounted(services["sentinel-1"], "/etc/redis/sentinel.conf"))
    (monitor,) = [d for d in config if d[:2] == ["sentinel", "monitor"]]
    assert address.service_name == monitor[2]
    assert address.db == 0
    assert env["BROKER_SERVE_QUEUE_TYPE"] == "quorum"
    for name, service in built_services(ha_compose).items():
        assert service["environment"]["BROKER_SERVE_QUEUE_TYPE"] == "quorum", name
        # The same sentinels and service, each with the service's own Redis user
        # (test_each_service_is_its_roles_redis_user).
        own_redis = parse_sentinel_url(service["environment"]["BROKER_SERVE_REDIS_URL"])
        assert dataclasses.replace(own_redis, username=None, password=None) == \
            dataclasses.replace(address, username=None, password=None), name
        # Every node, each with the service's own user (test_each_service_is_its_roles_user).
        own = [urlsplit(url) for url in parse_amqp_nodes(
            service["environment"]["BROKER_SERVE_AMQP_URL"])]
        assert [(n.hostname, n.port, n.path) for n in own] == \
            [(n.hostname, n.port, n.path) for n in nodes], name


# RabbitMQ users per role ------------------------------------------------------------------------
# Each broker-serve service's role (docs/security.md, "Per-role RabbitMQ users"): `app` runs
# `broker-serve run`, a driver, which declares and deletes as the controller does; a worker
# node's own proxy, when the cluster's proxy location is EveryNode, inherits the worker's user.
ROLE_OF_SERVICE = {"controller": "controller", "app": "controller", "proxy": "proxy",
                   "worker": "worker"}
DEFINITIONS_TARGET = "/etc/rabbitmq/definitions.json"
DEFINITIONS_CONF_TARGET = "/etc/rabbitmq/conf.d/30-definitions.conf"


def _role_user(role: str) -> str:
    return f"bs-{role}"


def _definitions(project: dict[str, Any]) -> dict[str, Any]:
    """The definitions every RabbitMQ node of `project` imports at boot: the same file."""
    nodes = [n for n in ("rabbitmq", *RABBITMQ_NODES) if n in project["services"]]
    assert nodes
    files = set()
    for name in nodes:
        config = _rabbitmq_config(_mounted(project["services"][name], DEFINITIONS_CONF_TARGET))
        assert config == {"load_definitions": DEFINITIONS_TARGET}, name
        files.add(_mounted(project["services"][name], DEFINITIONS_TARGET))
    (path,) = files
    definitions: dict[str, Any] = json.loads(path.read_text())
    return definitions


def _permissions(definitions: dict[str, Any], user: str) -> dict[str, Permissions]:
    return {p["vhost"]: Permissions(p["configure"], p["write"], p["read"])
            for p in definitions["permissions"] if p["user"] == user}


def test_the_definitions_give_each_role_its_permissions(compose, ha_compose):
    cluster = compose["services"]["controller"]["environment"]["BROKER_SERVE_CLUSTER"]
    definitions = _definitions(compose)
    assert _definitions(ha_compose) == definitions
    # Defining users at boot means the image's guest is not made: `/` is defined here too.
    assert [v["name"] for v in definitions["vhosts"]] == ["/"]
    users = {u["name"]: u for u in definitions["users"]}
    assert users.keys() == {"admin", *(_role_user(r) for r in ROLE_OF_SERVICE.values())}
    for role in set(ROLE_OF_SERVICE.values()):
        user = users[_role_user(role)]
        assert user["tags"] == [], role  # no management UI, no HTTP API
        assert _permissions(definitions, user["name"]) == \
            {"/": rabbitmq_permissions(cluster, role)}, role
    # The management UI's user, as guest was: everything.
    assert users["admin"]["tags"] == ["administrator"]
    assert _permissions(definitions, "admin") == {"/": Permissions(".*", ".*", ".*")}
    for user in users.values():  # example values, committed like deploy/cluster-secret
        assert re.fullmatch(r"[0-9a-f]{24,}", user["password"]), user["name"]
    assert len({user["password"] for user in users.values()}) == len(users)


def test_each_service_is_its_roles_user(compose, ha_compose):
    for project in (compose, ha_compose):
        users = {u["name"]: u["password"] for u in _definitions(project)["users"]}
        services = built_services(project)
        assert services.keys() == ROLE_OF_SERVICE.keys()
        for name, service in services.items():
            role = ROLE_OF_SERVICE[name]
            for node in (urlsplit(url) for url in parse_amqp_nodes(
                    service["environment"]["BROKER_SERVE_AMQP_URL"])):
                assert (node.username, node.password) == \
                    (_role_user(role), users[_role_user(role)]), name
                assert node.path == "/", name  # the vhost the definitions give


def test_a_worker_nodes_user_has_its_proxys_rights():
    """A worker node runs a proxy of its own when the cluster's proxy location is EveryNode,
    with the worker's environment: every right a proxy uses, over the names it uses it on,
    the worker role has too."""
    names = Names("default")
    proxy, worker = rabbitmq_permissions("default", "proxy"), rabbitmq_permissions(
        "default", "worker")
    uses = {"configure": [names.reply_queue("proxy-1"), names.cancel_exchange],
            "write": ["amq.default", names.cancel_exchange],
            "read": [names.reply_queue("proxy-1")]}
    for right, resources in uses.items():
        for resource in resources:
            assert re.search(getattr(proxy, right), resource), (right, resource)
            assert re.search(getattr(worker, right), resource), (right, resource)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_rabbitmq_node_imports_the_definitions(compose):
    """A node booted with the committed definitions file (RabbitMQ of this machine, a node of
    the test's own): each role's user logs in with the password its services' URLs hold and
    gets its permissions, admin is an administrator, and there is no guest."""
    definitions = _definitions(compose)
    path = _mounted(compose["services"]["rabbitmq"], DEFINITIONS_TARGET)
    with RabbitCluster(size=1, extra_config=(f"load_definitions = {path}",)) as node:
        (rabbit,) = node.nodes
        listed = rabbitmqctl(rabbit.name, "list_permissions", "-p", "/", "--formatter", "json")
        assert listed.returncode == 0, listed.stderr
        granted = {p["user"]: Permissions(p["configure"], p["write"], p["read"])
                   for p in json.loads(listed.stdout)}
        assert granted == {u["name"]: _permissions(definitions, u["name"])["/"]
                           for u in definitions["users"]}
        listed = rabbitmqctl(rabbit.name, "list_users", "--formatter", "json")
        assert listed.returncode == 0, listed.stderr
        tags = {u["user"]: u["tags"] for u in json.loads(listed.stdout)}
        assert tags == {u["name"]: u["tags"] for u in definitions["users"]}  # no guest
        for service in built_services(compose).values():
            (url,) = parse_amqp_nodes(service["environment"]["BROKER_SERVE_AMQP_URL"])
            parts = urlsplit(url)
            userinfo = parts.netloc.rpartition("@")[0]
            local = parts._replace(netloc=f"{userinfo}@127.0.0.1:{rabbit.amqp_port}").geturl()
            pika.BlockingConnection(pika.URLParameters(local)).close()
        with pytest.raises(pika.exceptions.ProbableAuthenticationError):
            pika.BlockingConnection(pika.URLParameters(rabbit.amqp_url))  # guest:guest


# Redis users per role ---------------------------------------------------------------------------
# Every Redis node of a project loads the same ACL file (docs/security.md, "Redis ACL users"):
# the users of each role, `admin` for operators, the replicas' and the sentinels' users, and a
# `default` user that may only PING, for the health checks.
REDIS_NODES = ("redis", "redis-primary", "redis-replica")
ACL_TARGET = "/etc/redis/users.acl"
DEFAULT_RULES = ["on", "nopass", "resetkeys", "resetchannels", "-@all", "+ping"]
REPLICATION_USER = "bs-replication"
SENTINEL_USER = "bs-sentinel"


@dataclasses.dataclass(frozen=True)
class AclUser:
    password: str | None
    rules: list[str]


def _acl_file(project: dict[str, Any]) -> Path:
    """The ACL file every Redis node of `project` loads: the same, where it is mounted."""
    files = set()
    for name in (n for n in REDIS_NODES if n in project["services"]):
        service = project["services"][name]
        if name == "redis":
            command = service["command"]
            target = command[command.index("--aclfile") + 1]
        else:
            config = _mounted(service, f"/etc/redis/{name.removeprefix('redis-')}.conf")
            (target,) = [d[1] for d in _directives(config) if d[0] == "aclfile"]
        assert target == ACL_TARGET, name
        files.add(_mounted(service, ACL_TARGET))
    (path,) = files
    return path


def _acl_users(path: Path) -> dict[str, AclUser]:
    """`user NAME RULE...` lines as Redis reads them: a `>password` rule, and the others in
    their order, a selector's words joined again into one rule `(...)`."""
    users = {}
    for line in path.read_text().splitlines():
        keyword, name, *words = line.split()
        assert keyword == "user" and name not in users, line
        rules: list[str] = []
        passwords = []
        for word in words:
            if rules and rules[-1].startswith("(") and not rules[-1].endswith(")"):
                rules[-1] += " " + word
            elif word.startswith(">"):
                passwords.append(word[1:])
            else:
                rules.append(word)
        assert len(passwords) <= 1, name
        users[name] = AclUser(passwords[0] if passwords else None, rules)
    return users


def _redis_credentials(url: str) -> tuple[str | None, str | None]:
    if url.startswith("redis+sentinel://"):
        address = parse_sentinel_url(url)
        return address.username, address.password
    parts = urlsplit(url)
    return parts.username, parts.password


def test_the_acl_file_gives_each_role_its_rules(compose, ha_compose):
    cluster = compose["services"]["controller"]["environment"]["BROKER_SERVE_CLUSTER"]
    path = _acl_file(compose)
    assert _acl_file(ha_compose) == path
    users = _acl_users(path)
    roles = set(ROLE_OF_SERVICE.values())
    assert users.keys() == {"default", "admin", REPLICATION_USER, SENTINEL_USER,
                            *(_role_user(role) for role in roles)}
    for role in roles:
        assert users[_role_user(role)].rules == redis_acl_rules(cluster, role), role
    # No password, and PING only: whoever reaches Redis without a user learns that it is up.
    assert users["default"] == AclUser(None, DEFAULT_RULES)
    assert users["admin"].rules == ["on", "~*", "&*", "+@all"]
    for name in (REPLICATION_USER, SENTINEL_USER):  # no keys, no commands on data
        assert users[name].rules[:3] == ["on", "resetkeys",
                                         "resetchannels" if name == REPLICATION_USER
                                         else "allchannels"], name
        assert "-@all" in users[name].rules and "+@all" not in users[name].rules, name
    passwords = [user.password for name, user in users.items() if name != "default"]
    for password in passwords:  # example values, committed like deploy/cluster-secret
        assert password is not None and re.fullmatch(r"[0-9a-f]{24,}", password)
    assert len(set(passwords)) == len(passwords)


def test_each_service_is_its_roles_redis_user(compose, ha_compose):
    for project in (compose, ha_compose):
        users = _acl_users(_acl_file(project))
        for name, service in built_services(project).items():
            user = _role_user(ROLE_OF_SERVICE[name])
            assert _redis_credentials(service["environment"]["BROKER_SERVE_REDIS_URL"]) == \
                (user, users[user].password), name


def test_replicas_and_sentinels_log_in_as_their_users(ha_compose):
    """With `default` reduced to PING, a replica replicates, and a sentinel watches and fails
    over the nodes, only as a user of the ACL file that can."""
    services = ha_compose["services"]
    users = _acl_users(_acl_file(ha_compose))
    for name in ("primary", "replica"):  # the primary becomes a replica after a failover
        directives = _directives(_mounted(services[f"redis-{name}"], f"/etc/redis/{name}.conf"))
        assert ["masteruser", REPLICATION_USER] in directives, name
        assert ["masterauth", users[REPLICATION_USER].password] in directives, name
    for name in SENTINELS:
        directives = _directives(_mounted(services[name], "/etc/redis/sentinel.conf"))
        (monitor,) = [d for d in directives if d[:2] == ["sentinel", "monitor"]]
        service_name = monitor[2]
        auth = [d for d in directives if d[:2] in (["sentinel", "auth-user"],
                                                    ["sentinel", "auth-pass"])]
        assert auth == [["sentinel", "auth-user", service_name, SENTINEL_USER],
                        ["sentinel", "auth-pass", service_name, users[SENTINEL_USER].password]]
        assert directives.index(monitor) < directives.index(auth[0]), name  # names the service


def _start_redis(directory: Path, *arguments: str) -> tuple[subprocess.Popen[bytes], int]:
    """A redis-server of the test's own on a free port, answering PING (as `default`)."""
    port = free_port()
    directory.mkdir()
    with open(directory / "redis.log", "wb") as log:
        process = subprocess.Popen(
            ["redis-server", *arguments, "--port", str(port), "--bind", "127.0.0.1",
             "--dir", str(directory)], stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)

    def answers() -> bool:
        assert process.poll() is None, (directory / "redis.log").read_text()
        try:
            with redis.Redis(port=port, socket_timeout=2) as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        wait_for(answers, timeout=10)
    except BaseException:
        process.kill()
        raise
    return process, port


def _local(url: str, port: int) -> str:
    """A compose service's plain Redis URL, with its user, at 127.0.0.1:port."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return parts._replace(netloc=f"{userinfo}@127.0.0.1:{port}").geturl()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_redis_loads_the_acl_file(compose, ha_compose, tmp_path):
    """The committed ACL file, copied, loaded by Redis nodes of this machine: each service's
    URL logs in as its role's user, which writes its own records; a proxy or worker cannot
    write the application records; `default` can only PING. A replica replicates with the
    replication user, and a sentinel with the sentinel user watches both (without it, the
    sentinel sees the primary as disconnected) and promotes the replica once the primary is
    killed."""
    users = _acl_users(_acl_file(compose))
    acl = tmp_path / "users.acl"
    shutil.copyfile(_acl_file(compose), acl)  # Redis writes it on ACL SAVE: a copy
    settings = ["--save", "", "--appendonly", "no", "--aclfile", str(acl)]
    started = []
    try:
        primary, port = _start_redis(tmp_path / "primary", *settings)
        started.append(primary)
        for name, service in built_services(compose).items():
            with redis.Redis.from_url(
                    _local(service["environment"]["BROKER_SERVE_REDIS_URL"], port)) as client:
                assert client.ping(), name
                role = ROLE_OF_SERVICE[name]
                if role == "controller":
                    assert client.hset("bs:default:apps", name, "{}") == 1, name
                    continue
                with pytest.raises(redis.exceptions.NoPermissionError):
                    client.hset("bs:default:apps", "hello", "{}")
                own = {"proxy": "bs:default:proxies", "worker": "bs:default:nodes"}[role]
                assert client.hset(own, name, "{}") == 1, name  # its own records, as its role
        with redis.Redis(port=port) as anonymous, \
                pytest.raises(redis.exceptions.NoPermissionError):
            anonymous.get("bs:default:apps")
        with redis.Redis(port=port, username="admin", password=users["admin"].password,
                         decode_responses=True) as admin:
            listed = {line.split()[1] for line in admin.acl_list()}
            assert listed == users.keys()
            assert admin.hkeys("bs:default:apps") == ["controller", "app"]

        services = ha_compose["services"]
        directives = _directives(_mounted(services["redis-replica"], "/etc/redis/replica.conf"))
        replication = [argument for d in directives if d[0] in ("masteruser", "masterauth")
                       for argument in (f"--{d[0]}", d[1])]
        replica, replica_port = _start_redis(tmp_path / "replica", *settings, *replication,
                                             "--replicaof", "127.0.0.1", str(port))
        started.append(replica)
        with redis.Redis(port=replica_port, username="admin", password=users["admin"].password,
                         decode_responses=True) as admin:
            wait_for(lambda: admin.info("replication")["master_link_status"] == "up")
            assert admin.hkeys("bs:default:apps") == ["controller", "app"]  # replicated

        sentinel_config = _mounted(services["sentinel-1"], "/etc/redis/sentinel.conf")
        (monitor,) = [d for d in _directives(sentinel_config) if d[:2] == ["sentinel", "monitor"]]
        service_name = monitor[2]
        auth = [" ".join(d) for d in _directives(sentinel_config)
                if d[:2] in (["sentinel", "auth-user"], ["sentinel", "auth-pass"])]
        config = tmp_path / "sentinel.conf"  # Sentinel rewrites it
        config.write_text("\n".join([f"sentinel monitor {service_name} 127.0.0.1 {port} 1",
                                     f"sentinel down-after-milliseconds {service_name} 1000",
                                     *auth, ""]))
        sentinel, sentinel_port = _start_redis(tmp_path / "sentinel", str(config),
                                               "--sentinel")
        started.append(sentinel)
        with redis.Redis(port=sentinel_port, decode_responses=True) as client:
            def watched() -> bool:
                state = client.sentinel_master(service_name)
                return bool(state["is_master"] and not state["is_disconnected"]
                            and state["num-slaves"] == 1)
            wait_for(watched, timeout=30)
            # A failover: what the sentinel sends the replica to promote it (REPLICAOF NO ONE,
            # CONFIG REWRITE in a transaction, CLIENT KILL), the sentinel user may send.
            primary.kill()
            primary.wait(10)
            wait_for(lambda: tuple(client.sentinel_get_master_addr_by_name(service_name)) ==
                     ("127.0.0.1", replica_port), timeout=30)
        with redis.Redis(port=replica_port, username="admin", password=users["admin"].password,
                         decode_responses=True) as admin:
            wait_for(lambda: admin.info("replication")["role"] == "master", timeout=10)
    finally:
        for process in reversed(started):
            process.terminate()
            process.wait(10)


# the images ------------------------------------------------------------------------------------
def test_one_image_with_an_entrypoint_per_role(compose):
    image = Image.from_dockerfile()
    assert image.entrypoint == ["broker-serve"]
    steps = dockerfile_instructions(ROOT / "Dockerfile")
    assert any(k == "RUN" and "pip install" in a for k, a in steps)
    copied = " ".join(a for k, a in steps if k == "COPY")
    for path in ("pyproject.toml", "broker_serve", "examples", "deploy/healthcheck.py"):
        assert path in copied, path
    services = compose["services"]
    for name in built_services(compose):
        assert services[name]["image"] == services["controller"]["image"], name
    # proxy/ and workers/ build the same image with their role as its default command.
    for folder, service in (("proxy", "proxy"), ("workers", "worker")):
        steps = dockerfile_instructions(ROOT / folder / "Dockerfile")
        cmd = exec_form(next(a for k, a in steps if k == "CMD"))
        assert cmd == services[service]["command"], folder
        healthcheck = next(a for k, a in steps if k == "HEALTHCHECK")
        health = exec_form(healthcheck.split("CMD", 1)[1].strip())
        assert health == services[service]["healthcheck"]["test"][1:], folder


# the load balancer -----------------------------------------------------------------------------
def test_load_balancer_fronts_every_proxy_on_port_8000(compose):
    services = compose["services"]
    balancer = services["loadbalancer"]
    assert "haproxy" in balancer["image"]
    (mount,) = [v for v in balancer["volumes"] if "haproxy.cfg" in v]
    config = (ROOT / mount.split(":")[0]).read_text()
    (published,) = balancer["ports"]
    host_port, container_port = (int(p) for p in str(published).split(":"))
    assert host_port == 8000
    assert re.search(rf"^\s*bind\s+:{container_port}\s*$", config, re.MULTILINE)
    template = re.search(r"^\s*server-template\s+\S+\s+(\d+)\s+([\w.-]+):(\d+)", config, re.MULTILINE)
    assert template, "no server-template for the scaled proxies"
    assert template.group(2) == "proxy"
    assert int(template.group(3)) == _port_flag(services["proxy"]["command"])
    assert re.search(r"^\s*nameserver\s+\S+\s+127\.0\.0\.11:53", config, re.MULTILINE)  # Docker's DNS
    assert "/-/healthz" in config
    # Readiness: a proxy gets traffic on 200 only, not on "Route table is not populated yet."
    # (the container's own check, deploy/healthcheck.py, is liveness: tests/test_healthz.py).
    assert re.search(r"^\s*http-check\s+expect\s+status\s+200\s*$", config, re.MULTILINE)


def test_haproxy_accepts_its_config():
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed")
    check = subprocess.run([haproxy, "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


# Prometheus ------------------------------------------------------------------------------------
def test_prometheus_finds_every_instance_through_dns(compose):
    services = compose["services"]
    prometheus = services["prometheus"]
    (mount,) = [v for v in prometheus["volumes"] if v.endswith("prometheus.yml:ro")]
    source, target = mount.split(":")[:2]
    assert f"--config.file={target}" in prometheus["command"]
    config = yaml.safe_load((ROOT / source).read_text())
    jobs = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert sd["type"] == "A"
            for name in sd["names"]:
                jobs[name] = (job.get("metrics_path", "/metrics"), sd["port"])
    controller_env = services["controller"]["environment"]
    assert controller_env["BROKER_SERVE_DASHBOARD_HOST"] == "0.0.0.0"
    scraped = {  # where each process serves its metrics
        "proxy": ("/-/metrics", _port_flag(services["proxy"]["command"])),
        "worker": ("/metrics", 9500),
        "controller": ("/metrics", int(controller_env["BROKER_SERVE_DASHBOARD_PORT"])),
    }
    for service, (path, port) in scraped.items():
        assert jobs.get(service) == (path, port), service
        assert port in exposed_ports(services[service]), service


def test_promtool_accepts_the_config_and_the_dashboard_queries(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    check = subprocess.run([promtool, "check", "config", "--syntax-only",
                            str(DEPLOY / "prometheus" / "prometheus.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # Each panel query as a recording rule, with Grafana's variables filled in.
    rules = [{"record": f"dashboard:query{n}", "expr": expr.replace("$__rate_interval", "1m")
              .replace("$application", ".*")} for n, expr in enumerate(_dashboard_queries())]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    check = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr


# Grafana ---------------------------------------------------------------------------------------
def _grafana_mounts(compose: dict[str, Any]) -> dict[str, Path]:
    mounts = {}
    for volume in compose["services"]["grafana"]["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            mounts[target] = ROOT / source
    return mounts


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(compose):
    services = compose["services"]
    mounts = _grafana_mounts(compose)
    provisioning = mounts["/etc/grafana/provisioning"]
    datasources = [d for f in sorted((provisioning / "datasources").glob("*.yml"))
                   for d in yaml.safe_load(f.read_text())["datasources"]]
    (prometheus,) = [d for d in datasources if d["type"] == "prometheus"]
    assert prometheus["url"] == "http://prometheus:9090"
    assert any(str(p).endswith(":9090") for p in services["prometheus"]["ports"])

    providers = [p for f in sorted((provisioning / "dashboards").glob("*.yml"))
                 for p in yaml.safe_load(f.read_text())["providers"]]
    (provider,) = providers
    dashboards = mounts[provider["options"]["path"]]
    assert sorted(p.name for p in dashboards.glob("*.json")) == ["broker-serve.json"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/broker-serve.json"


def test_grafana_dashboard_charts_the_metrics(compose):
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "broker-serve.json").read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    expressions = []
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "prometheus", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus", panel["title"]
            expressions.append(target["expr"])
            for metric in re.findall(r"\bbroker_serve_\w+", target["expr"]):
                base = re.sub(r"_(bucket|sum|count)$", "", metric)
                assert metric in METRICS or (base in HISTOGRAMS and metric != base), (
                    f"{panel['title']}: unknown metric {metric}"
                )
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == "prometheus"
    _assert_panels_do_not_overlap(dashboard["panels"])

    text = "\n".join(expressions)
    assert re.search(r"rate\(broker_serve_proxy_requests_total", text)  # request rate
    for quantile in ("0.5", "0.95", "0.99"):  # latency percentiles
        assert f"histogram_quantile({quantile}, sum by (le) " \
               "(rate(broker_serve_proxy_request_duration_seconds_bucket" in text
    assert 'status=~"5.."' in text and "broker_serve_replica_errors_total" in text  # errors
    for metric in ("broker_serve_controller_queue_depth", "broker_serve_controller_replicas",
                   "broker_serve_controller_autoscaling_decisions_total"):
        assert metric in text, metric


def _assert_panels_do_not_overlap(panels: list[dict[str, Any]]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def _dashboard_queries() -> list[str]:
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "broker-serve.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
