"""The parts of runtime_env on their own: options and their merge, archives read, checked and
extracted, the host cache's atomicity and pruning, and pip environments layered over
broker-serve's (docs/architecture.md, "Runtime environments")."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from broker_serve.controller.reseed import StateCopy
from broker_serve.exceptions import RuntimeEnvError
from broker_serve.protocol import messages
from broker_serve.runtime_env import archives, options, venvs
from broker_serve.runtime_env.cache import PACKAGES, VENVS, HostCache
from broker_serve.runtime_env.environment import (
    Environment,
    Package,
    Resolver,
    materialize,
    seal,
    unseal,
    upload,
)
from broker_serve.runtime_env.pruning import prune_stored_packages
from broker_serve.state.store import Store

from .asyncio_tests import in_loop
from .conftest import REDIS_URL
from .runtime_env_files import pure_python_wheel, zip_of

MB = 1 << 20
SECRET = b"s" * 32  # the operator's; the specs' signatures need no Redis


# options ------------------------------------------------------------------------------------
def test_a_deployment_runtime_env_is_laid_over_its_application_as_ray_merges_them():
    app = {"working_dir": "https://example.invalid/a.zip", "pip": ["a"],
           "env_vars": {"SHARED": "app", "APP_ONLY": "1"}}
    deployment = {"pip": ["b"], "env_vars": {"SHARED": "deployment"}}
    assert options.merge(app, deployment) == {
        "working_dir": "https://example.invalid/a.zip", "pip": ["b"],
        "env_vars": {"SHARED": "deployment", "APP_ONLY": "1"}}
    assert options.merge(None, deployment) == deployment
    assert options.merge(app, None) == app
    assert app["env_vars"] == {"SHARED": "app", "APP_ONLY": "1"}  # not changed in place


def test_unknown_keys_and_bad_values_are_refused_by_name():
    with pytest.raises(RuntimeEnvError, match=r"runtime_env \['conda', 'container'\] of app x "
                                              "is not supported"):
        options.parse({"conda": "env.yaml", "container": {"image": "x"}, "pip": ["a"]}, "app x")
    with pytest.raises(RuntimeEnvError, match="env_vars.N: Input should be a valid string"):
        options.parse({"env_vars": {"N": 3}}, "app x")
    with pytest.raises(RuntimeEnvError, match="must be a mapping"):
        options.parse(["pip"], "app x")
    with pytest.raises(RuntimeEnvError, match="pip.PipOptions.pip_version"):
        options.parse({"pip": {"packages": ["a"], "pip_version": "==23"}}, "app x")
    parsed = options.parse({"conda": None, "pip": {"packages": ["a"], "pip_check": True},
                            "config": {"setup_timeout_seconds": 30}}, "app x")
    assert parsed.config.setup_timeout_seconds == 30 and not parsed.is_empty
    assert options.parse({}, "app x").is_empty


# archives -----------------------------------------------------------------------------------
def _tree(root: Path) -> None:
    (root / "pkg").mkdir(parents=True)
    (root / "main.py").write_text("VALUE = 1\n")
    (root / "pkg" / "__init__.py").write_text("")
    (root / "run.sh").write_text("#!/bin/sh\n")
    (root / "run.sh").chmod(0o755)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"\0")
    (root / "data.csv").write_text("a,b\n")


def test_a_directory_packs_to_the_same_bytes_until_a_file_changes(tmp_path):
    _tree(tmp_path / "app")
    first = archives.pack_directory(tmp_path / "app", "", ["*.csv"], 10 * MB)
    os.utime(tmp_path / "app" / "main.py", (1, 1))  # times do not count
    assert archives.pack_directory(tmp_path / "app", "", ["*.csv"], 10 * MB) == first
    with zipfile.ZipFile(io.BytesIO(first)) as opened:
        assert sorted(opened.namelist()) == ["main.py", "pkg/__init__.py", "run.sh"]
        assert stat.S_IMODE(opened.getinfo("run.sh").external_attr >> 16) == 0o755
    (tmp_path / "app" / "main.py").write_text("VALUE = 2\n")
    assert archives.pack_directory(tmp_path / "app", "", ["*.csv"], 10 * MB) != first
    as_module = archives.pack_directory(tmp_path / "app", "app", [], 10 * MB)
    assert archives.check(as_module, "app", 10 * MB) == "app"


def test_a_github_archive_is_used_from_inside_its_one_folder():
    github = zip_of({"repo-HEAD/": "", "repo-HEAD/text_ml.py": "x", "repo-HEAD/a/b.py": "y"})
    assert archives.check(github, "github", MB) == "repo-HEAD"
    assert archives.check(zip_of({"repo/x.py": "", "other.py": ""}), "mixed", MB) == ""
    assert archives.check(zip_of({"only.py": ""}), "one file", MB) == ""


@pytest.mark.parametrize(("entries", "error"), [
    ({"../escaped.py": "x"}, "escapes the directory"),
    ({"a/../../escaped.py": "x"}, "escapes the directory"),
    ({"/etc/passwd": "x"}, "escapes the directory"),
    ({"C:/windows.py": "x"}, "escapes the directory"),
])
def test_entries_that_climb_out_are_refused(entries, error):
    with pytest.raises(RuntimeEnvError, match=error):
        archives.check(zip_of(entries), "evil.zip", MB)


def test_symlinks_bombs_and_non_zips_are_refused(monkeypatch):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        link = zipfile.ZipInfo("link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    with pytest.raises(RuntimeEnvError, match="'link' is a symlink"):
        archives.check(buffer.getvalue(), "links.zip", MB)
    bomb = zip_of({"zeros": b"\0" * (5 * MB)})
    assert len(bomb) < 50_000
    with pytest.raises(RuntimeEnvError, match="holds 5.0 MiB once extracted, over the limit of "
                                              "1.0 MiB"):
        archives.check(bomb, "bomb.zip", MB)
    with pytest.raises(RuntimeEnvError, match="not a zip archive"):
        archives.check(b"<html>not found</html>", "page.zip", MB)
    monkeypatch.setattr(archives, "MAX_ENTRIES", 3)
    with pytest.raises(RuntimeEnvError, match="4 entries, over the limit of 3"):
        archives.check(zip_of({f"{n}.py": "" for n in range(4)}), "many.zip", MB)


def test_local_sources_are_read_relative_to_the_base_dir(tmp_path):
    _tree(tmp_path / "app")
    (tmp_path / "given.zip").write_bytes(zip_of({"m.py": ""}))
    kwargs = {"as_module": False, "excludes": [], "max_bytes": MB, "timeout_s": 5}
    assert archives.read_source("given.zip", str(tmp_path), **kwargs) == zip_of({"m.py": ""})
    assert archives.read_source("app", str(tmp_path), **kwargs) == archives.pack_directory(
        tmp_path / "app", "", [], MB)
    with pytest.raises(RuntimeEnvError, match="does not exist"):
        archives.read_source("absent", str(tmp_path), **kwargs)
    with pytest.raises(RuntimeEnvError, match="neither a directory nor a .zip"):
        archives.read_source("app/main.py", str(tmp_path), **kwargs)
    with pytest.raises(RuntimeEnvError, match=r"s3:// sources are not supported"):
        archives.read_source("s3://bucket/a.zip", str(tmp_path), **kwargs)


# the host cache -----------------------------------------------------------------------------
def _package(archive: bytes, subdir: str = "") -> Package:
    return {"uri": "test.zip", "digest": hashlib.sha256(archive).hexdigest(), "subdir": subdir}


def test_a_damaged_archive_leaves_nothing_half_extracted(tmp_path):
    cache = HostCache(tmp_path / "cache")
    good = zip_of({"a.py": "A = 1\n" * 1000, "b.py": "".join(f"B{n} = {n * n}\n"
                                                            for n in range(1000))})
    with zipfile.ZipFile(io.BytesIO(good)) as opened:
        info = opened.getinfo("b.py")
    # in the middle of b.py's compressed data, after its 30-byte header, name and extra
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + \
        info.compress_size // 2
    damaged = good[:offset] + bytes([good[offset] ^ 0xFF]) + good[offset + 1:]
    with pytest.raises(RuntimeEnvError, match="damaged zip archive"):
        materialize(cache, _package(damaged), damaged, MB)
    folder = cache.entry(PACKAGES, _package(damaged)["digest"])
    assert not folder.exists()
    assert [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name] == []
    with pytest.raises(RuntimeEnvError, match="content changed since the application was built"):
        materialize(cache, _package(good), damaged, MB)


def test_concurrent_preparations_extract_a_package_once(tmp_path):
    cache = HostCache(tmp_path / "cache")
    archive = zip_of({"repo/x.py": "X = 1\n"})
    package = _package(archive, "repo")
    results: list[Path | None] = []
    threads = [threading.Thread(target=lambda: results.append(
        materialize(cache, package, archive, MB))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    folder = cache.entry(PACKAGES, package["digest"])
    assert results == [folder / "repo"] * 8
    assert (folder / "repo" / "x.py").read_text() == "X = 1\n"
    assert cache.archive(package["digest"]).read_bytes() == archive
    # cached now: no archive needed
    assert materialize(cache, package, None, MB) == folder / "repo"


def test_pruning_removes_entries_unused_for_the_ttl_unless_in_use(tmp_path):
    cache = HostCache(tmp_path / "cache")
    old, fresh, busy = (zip_of({f"{n}.py": ""}) for n in ("old", "fresh", "busy"))
    for archive in (old, fresh, busy):
        materialize(cache, _package(archive), archive, MB)
    long_ago = time.time() - 7200
    for archive in (old, busy):
        marker = cache.root / PACKAGES / f"{_package(archive)['digest']}.used"
        os.utime(marker, (long_ago, long_ago))
    taken = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with cache.locked(PACKAGES, _package(busy)["digest"]):
            marker = cache.root / PACKAGES / f"{_package(busy)['digest']}.used"
            os.utime(marker, (long_ago, long_ago))
            taken.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(10)
    try:
        assert cache.prune(3600) == [f"{PACKAGES}/{_package(old)['digest']}"]
    finally:
        release.set()
        holder.join()
    assert not cache.entry(PACKAGES, _package(old)["digest"]).exists()
    assert not cache.archive(_package(old)["digest"]).exists()
    assert cache.entry(PACKAGES, _package(fresh)["digest"]).is_dir()
    assert cache.entry(PACKAGES, _package(busy)["digest"]).is_dir()


# resolving ----------------------------------------------------------------------------------
def test_a_requirements_file_is_read_into_the_environment(tmp_path):
    (tmp_path / "requirements.txt").write_text("# pinned\nsix==1.16.0  # six\n\nidna\n")
    resolver = Resolver(HostCache(tmp_path / "cache"), str(tmp_path), MB, 5)
    pip = resolver.pip("requirements.txt")
    assert pip["packages"] == ["six==1.16.0", "idna"]
    assert resolver.pip(["six==1.16.0", "idna"])["digest"] == pip["digest"]
    assert resolver.pip(["idna"])["digest"] != pip["digest"]
    with pytest.raises(RuntimeEnvError, match="names another file"):
        resolver.pip(["-r other.txt"])
    with pytest.raises(RuntimeEnvError, match="cannot read the requirements file"):
        resolver.pip("absent.txt")


# pip environments ---------------------------------------------------------------------------
def test_a_pip_environment_adds_its_packages_over_broker_serves(tmp_path):
    wheel = pure_python_wheel(tmp_path, "bs_layer_probe", "1.0", "VALUE = 'from the wheel'\n")
    cache = HostCache(tmp_path / "cache")
    said: list[str] = []
    python = venvs.ensure(cache, "k1", [str(wheel)], [], True, 120, said.append)
    source = ("import bs_layer_probe, broker_serve, sys; "
              "print(bs_layer_probe.VALUE, bs_layer_probe.__file__, sys.prefix)")
    probe = subprocess.run([str(python), "-c", source], capture_output=True, text=True,
                           check=True)
    value, where, prefix = probe.stdout.rsplit(" ", 2)
    assert value == "from the wheel"
    assert where.startswith(str(cache.entry(VENVS, "k1")))
    assert prefix.strip() == str(cache.entry(VENVS, "k1"))
    assert any("installing 1 pip requirement(s)" in message for message in said)
    with pytest.raises(ImportError):
        __import__("bs_layer_probe")  # broker-serve's own environment is untouched
    ready = cache.entry(VENVS, "k1") / venvs.READY
    made = ready.stat().st_mtime_ns
    assert venvs.ensure(cache, "k1", [str(wheel)], [], True, 120, said.append) == python
    assert ready.stat().st_mtime_ns == made  # built once


def test_a_failed_install_says_what_pip_said_and_leaves_no_environment(tmp_path):
    cache = HostCache(tmp_path / "cache")
    with pytest.raises(RuntimeEnvError) as failed:
        venvs.ensure(cache, "k2", ["bs-no-such-package-xyz==0.0.1"], ["--no-index"], False, 120,
                     lambda message: None)
    assert "pip install failed" in str(failed.value)
    assert "No matching distribution found for bs-no-such-package-xyz" in str(failed.value)
    assert not cache.entry(VENVS, "k2").exists()


# packages in Redis --------------------------------------------------------------------------
@in_loop
async def test_stored_packages_no_spec_names_are_pruned_and_a_lost_redis_gets_them_back(
        cluster, tmp_path):
    store = Store(REDIS_URL, cluster.name)
    try:
        cache = HostCache(tmp_path / "cache")
        named, unnamed, young = (zip_of({f"{n}.py": ""}) for n in ("named", "unnamed", "young"))
        for archive in (named, unnamed, young):
            materialize(cache, _package(archive), archive, MB)
        environment: Environment = {
            "working_dir": _package(named), "py_modules": [], "env_vars": {}, "pip": None,
            "setup_timeout_s": 60.0}
        spec = messages.pack({"pickled": b"", "sig": b"", "sys_path": [],
                              **seal(environment, SECRET)})
        specs = {store.names.spec("app", "Dep", "v1"): spec}
        await upload(store, cache, specs)
        await store.put_package(_package(unnamed)["digest"], unnamed)
        assert await store.package(_package(named)["digest"]) == named
        await store.put_app({"name": "app", "route_prefix": "/", "ingress": "Dep",
                             "version": "v", "deployments": {"Dep": {"version": "v1"}},
                             "deployed_at": 0.0}, specs)
        await store.put_package(_package(young)["digest"], young)
        old = time.time() - 10
        await store._redis.zadd(store.names.packages, {  # stored "long ago"
            _package(named)["digest"]: old, _package(unnamed)["digest"]: old})
        assert await prune_stored_packages(store, grace_s=5) == [_package(unnamed)["digest"]]
        assert await store.package(_package(unnamed)["digest"]) is None
        assert await store.package(_package(named)["digest"]) == named
        assert await store.package(_package(young)["digest"]) == young  # too young to tell

        # Redis loses everything: the copy writes the spec back, and the package from the cache.
        copy = StateCopy(cache)
        await store.mark_seeded()
        await copy.take(store)
        keys = [key async for key in store._redis.scan_iter(match=f"bs:{cluster.name}:*")]
        await store._redis.delete(*keys)
        assert await copy.restore_if_lost(store)
        assert await store.package(_package(named)["digest"]) == named
        assert unseal(messages.unpack(await store.spec("app", "Dep", "v1")),
                      SECRET) == environment
    finally:
        await store.close()


STOPPING_SCRIPT = '''
import sys, threading, time
from pathlib import Path

from broker_serve.exceptions import RuntimeEnvError
from broker_serve.runtime_env import venvs
from broker_serve.runtime_env.cache import HostCache

cache = HostCache(Path(sys.argv[1]))
said, result = [], {}


def install():
    try:
        venvs.ensure(cache, "slow", ["bs-slow-probe==1.0"],
                     ["--index-url", sys.argv[2], "--retries", "0", "--timeout", "120"],
                     False, 120, said.append)
    except RuntimeEnvError as exc:
        result["error"] = str(exc)


thread = threading.Thread(target=install)
thread.start()
deadline = time.monotonic() + 30
while not any("installing" in m for m in said) and time.monotonic() < deadline:
    time.sleep(0.05)
time.sleep(0.5)  # pip is waiting for the index now
stopped = time.monotonic()
venvs.stop_installs()
thread.join(30)
print(round(time.monotonic() - stopped, 2), cache.entry("venvs", "slow").exists())
print(result.get("error", "no error"))
'''


def test_a_stopping_process_ends_its_pip_installs_instead_of_waiting(tmp_path):
    """A worker node or controller that stops kills the installs it runs (a pip waiting on a
    slow index would hold it up to the setup timeout), and leaves no half-built venv."""
    silent = socket.socket()  # an index that accepts connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held: list[socket.socket] = []
    accepting = threading.Thread(target=lambda: held.extend(iter(
        lambda: silent.accept()[0], None)), daemon=True)
    accepting.start()
    try:
        done = subprocess.run(
            [sys.executable, "-c", STOPPING_SCRIPT, str(tmp_path / "cache"),
             f"http://127.0.0.1:{silent.getsockname()[1]}/simple"],
            capture_output=True, text=True, timeout=60)
    finally:
        silent.close()
        for connection in held:
            connection.close()
    assert done.returncode == 0, done.stderr
    timing, error = done.stdout.strip().splitlines()[:2]
    took, venv_left = timing.split()
    assert float(took) < 5.0, done.stdout
    assert venv_left == "False"
    assert "this process is stopping" in error, done.stdout
