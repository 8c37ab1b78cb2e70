"""The cluster secret comes from the operator and is never in Redis (docs/architecture.md,
"Trust"): what a process without it cannot do, what a replica does with what another secret
signed, what Redis access alone gives, and the secret a local cluster generates."""

from __future__ import annotations

import asyncio
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis

from broker_serve import ClusterSecretMissing, RayServeException, UntrustedPayload, serve
from broker_serve.client.build import build_application
from broker_serve.client.runtime import current_runtime
from broker_serve.controller.declarative import apply_config
from broker_serve.credentials import cluster_secret, local_secret_file, secret_file
from broker_serve.protocol.call_values import pack_call, pack_value, unpack_call, unpack_value
from broker_serve.protocol.names import Names
from broker_serve.schema import ServeDeploySchema
from broker_serve.settings import Settings
from broker_serve.state.store import Store

from .conftest import REDIS_URL
from .values_models import Span

SETTINGS = ("BROKER_SERVE_CLUSTER_SECRET_FILE", "BROKER_SERVE_CLUSTER_SECRET")
NAMES_THE_SETTINGS = "set BROKER_SERVE_CLUSTER_SECRET_FILE .* or BROKER_SERVE_CLUSTER_SECRET,"
STALE = b"an older secret, e.g. the one a previous version kept in Redis"


class RunsWhenLoaded:
    """A value whose unpickling writes `path`: if the file appears, the pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (Path.write_text, (self.path, "loaded"))


@serve.deployment
class Recorder:
    """Appends a line to `path` for every call it runs."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def record(self, value: Any) -> str:
        with self.path.open("a") as file:
            file.write(f"{type(value).__name__}\n")
        return "recorded"


def _runs(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


# where the secret comes from ---------------------------------------------------------------
@pytest.fixture
def no_secret(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BROKER_SERVE_STATE_DIR", str(tmp_path / "state"))
    return Settings.from_env(cluster="secret-test")


@pytest.fixture
def secretless(no_secret: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    """A process that can neither find nor make a secret: its state dir cannot be created."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("BROKER_SERVE_STATE_DIR", str(tmp_path / "a-file" / "state"))
    settings = Settings.from_env(cluster="secret-test")
    assert cluster_secret(settings) == b""
    return settings


def test_the_operator_gives_the_secret_as_a_variable_or_a_file(no_secret, tmp_path, monkeypatch):
    # Nothing set: this host's own, generated once (the next test says more).
    assert cluster_secret(no_secret) == secret_file(no_secret).read_bytes().strip()
    path = tmp_path / "mounted"
    path.write_text("f" * 64 + "\n")  # as mounted: its mode is the orchestrator's
    path.chmod(0o644)
    monkeypatch.setenv("BROKER_SERVE_CLUSTER_SECRET_FILE", str(path))
    assert cluster_secret(Settings()) == b"f" * 64
    assert Settings().env()["BROKER_SERVE_CLUSTER_SECRET_FILE"] == str(path)  # to children
    monkeypatch.setenv("BROKER_SERVE_CLUSTER_SECRET", "v" * 40)
    assert cluster_secret(Settings()) == b"v" * 40  # the value wins
    assert "v" * 40 not in repr(Settings())  # and stays out of logs

    monkeypatch.setenv("BROKER_SERVE_CLUSTER_SECRET", "short")
    with pytest.raises(ClusterSecretMissing, match="shorter than 32"):
        cluster_secret(Settings())
    monkeypatch.delenv("BROKER_SERVE_CLUSTER_SECRET")
    monkeypatch.setenv("BROKER_SERVE_CLUSTER_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ClusterSecretMissing, match="cannot read BROKER_SERVE_CLUSTER_SECRET_FILE"):
        cluster_secret(Settings())
    # An operator's secret is not generated over, and the processes inherit it.
    assert local_secret_file(Settings()) is None


def test_a_host_generates_a_private_secret_once_and_reuses_it(no_secret):
    with ThreadPoolExecutor(8) as pool:  # drivers starting at once agree on one
        paths = set(pool.map(lambda _: local_secret_file(no_secret), range(8)))
    (path,) = paths
    assert path == secret_file(no_secret) == no_secret.state_dir / "secret-test" / "cluster-secret"
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
    secret = path.read_bytes().strip()
    assert len(secret) == 64 and int(secret, 16) >= 0
    assert [p.name for p in path.parent.iterdir()] == ["cluster-secret"]  # no temporary left
    assert local_secret_file(no_secret) == path and path.read_bytes().strip() == secret
    assert cluster_secret(no_secret) == secret  # what a process without a setting finds

    path.chmod(0o644)  # others may have read it: neither used nor reused
    assert cluster_secret(no_secret) == b""  # (and the warning says why)
    with pytest.raises(ClusterSecretMissing, match="must be yours with mode 0600"):
        local_secret_file(no_secret)


# a process without it -------------------------------------------------------------------------
def test_without_a_secret_nothing_is_signed_and_the_error_names_the_settings(secretless):
    assert pack_call((1, "plain"), {}, b"") == {"args": [1, "plain"], "kwargs": {}}
    assert pack_value((1, 2), b"")["data"]  # a typed value naming no class needs no signature
    for sign in (lambda: pack_call(({1, 2},), {}, b""), lambda: pack_value(Span(1, 2), b""),
                 lambda: build_application(Recorder.bind("x"), "app", "/", Names("t"), b"")):
        with pytest.raises(ClusterSecretMissing, match=NAMES_THE_SETTINGS):
            sign()
    # Nor does anything signed verify in such a process; a signed typed value decodes as an
    # unsigned one would, importing no module.
    assert unpack_value(pack_value(Span(1, 2), b"s" * 32), b"") == Span(1, 2)
    with pytest.raises(UntrustedPayload, match="cannot be verified: this process has no"):
        unpack_value(pack_value({1, 2}, b"s" * 32), b"")
    with pytest.raises(UntrustedPayload, match="of the call's pickled arguments does not verify "
                                               "under this cluster's secret"):
        unpack_call(pack_call(({1, 2},), {}, STALE), b"s" * 32)


def test_a_controller_without_a_secret_refuses_a_config_before_changing_anything(secretless):
    config = ServeDeploySchema.model_validate(
        {"applications": [{"name": "a", "import_path": "examples.hello:app"}]})

    async def apply() -> None:
        store = Store(REDIS_URL, "never-connected")  # refused before its first command
        try:
            await apply_config(store, secretless, config)
        finally:
            await store.close()

    with pytest.raises(ClusterSecretMissing, match="sign the applications' definitions"):
        asyncio.run(apply())


# what a replica does with another secret's signature ------------------------------------------
def test_a_replica_refuses_what_a_stale_secret_signed_and_runs_nothing_of_it(cluster, tmp_path):
    runs, loaded = tmp_path / "runs", tmp_path / "loaded"
    names = Names(cluster.name)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        # What an older version left in Redis: the controller deletes it at start.
        client.set(names.legacy_secret, STALE)
        handle = serve.run(Recorder.bind(str(runs)))
        assert client.get(names.legacy_secret) is None
    finally:
        client.close()
    # The local cluster's secret: generated private, and used by every process of it.
    path = Path(cluster.env["BROKER_SERVE_STATE_DIR"]) / cluster.name / "cluster-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    runtime = current_runtime()
    assert runtime is not None and runtime.secret == path.read_bytes().strip()
    assert handle.record.remote("plain").result() == "recorded"  # the replica verified its spec
    assert _runs(runs) == 1

    secret = runtime.secret
    try:
        runtime.secret = STALE  # a driver with the stale secret
        with pytest.raises(RayServeException) as refused:
            handle.record.remote(RunsWhenLoaded(loaded)).result(timeout_s=30)
        runtime.secret = b""  # and one without any: it cannot even send it
        with pytest.raises(ClusterSecretMissing, match=NAMES_THE_SETTINGS):
            handle.record.remote(RunsWhenLoaded(loaded)).result(timeout_s=30)
    finally:
        runtime.secret = secret
    assert refused.value.error_type == "UntrustedPayload"
    assert "signature of the call's pickled arguments does not verify under this cluster's " \
        "secret" in str(refused.value)
    assert "stale" in str(refused.value)
    assert not loaded.exists()  # never unpickled
    assert _runs(runs) == 1  # and the method never ran
    # The same call signed with the cluster's secret is loaded and runs.
    assert handle.record.remote(RunsWhenLoaded(loaded)).result(timeout_s=30) == "recorded"
    assert loaded.exists() and _runs(runs) == 2


# what Redis access alone gives ----------------------------------------------------------------
def _everything_in_redis(cluster: str) -> set[bytes]:
    """Every key and value of the cluster's namespace, as a reader of Redis sees them."""
    client = redis.Redis.from_url(REDIS_URL)
    found: set[bytes] = set()
    try:
        for key in client.scan_iter(match=f"bs:{cluster}:*", count=1000):
            found.add(key)
            kind = client.type(key).decode()
            if kind == "string":
                found.add(client.get(key))
            elif kind == "hash":
                for field, value in client.hgetall(key).items():
                    found |= {field, value}
            elif kind in ("set", "list", "zset"):
                found |= set(client.smembers(key) if kind == "set" else
                             client.lrange(key, 0, -1) if kind == "list" else
                             client.zrange(key, 0, -1))
            elif kind == "stream":
                for _, fields in client.xrange(key):
                    for field, value in fields.items():
                        found |= {field, value}
            else:
                raise AssertionError(f"{key!r}: an unexpected type {kind}")
    finally:
        client.close()
    return found


def test_redis_access_alone_cannot_make_a_replica_run_code(cluster, tmp_path):
    runs, loaded = tmp_path / "runs", tmp_path / "loaded"
    handle = serve.run(Recorder.bind(str(runs)))
    assert handle.record.remote("plain").result() == "recorded"
    runtime = current_runtime()
    assert runtime is not None
    secret = runtime.secret
    values = _everything_in_redis(cluster.name) - {b""}
    assert len(values) > 20  # the app, its spec, statuses, nodes, replicas, routes...
    # The secret is nowhere in Redis, in any encoding.
    for value in values:
        for form in (secret, bytes.fromhex(secret.decode()), secret.upper()):
            assert form not in value
    assert Names(cluster.name).legacy_secret.encode() not in values
    # Whatever a reader found there, a pickle signed with it is refused and never loaded.
    try:
        for value in values:
            runtime.secret = value
            with pytest.raises(RayServeException, match="does not verify under this cluster"):
                handle.record.remote(RunsWhenLoaded(loaded)).result(timeout_s=30)
    finally:
        runtime.secret = secret
    assert not loaded.exists()
    assert _runs(runs) == 1
