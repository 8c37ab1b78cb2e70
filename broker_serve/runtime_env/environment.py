"""A deployment's environment: resolved from its runtime_env where the application is built,
prepared on each node where its replicas run (docs/architecture.md, "Runtime environments").

The environment is plain data, signed in the spec:

    {"working_dir": Package | None, "py_modules": [Package], "env_vars": {name: value},
     "pip": {"packages", "pip_check", "install_options", "digest"} | None,
     "setup_timeout_s": float}

where a Package is `{"uri", "digest", "subdir"}`: the source as given (a local one made
absolute), the SHA-256 of its zip archive, and the folder inside the archive to use.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import orjson

from ..exceptions import RuntimeEnvError
from ..protocol import messages
from ..protocol.call_values import not_verified, sign, verifies
from ..settings import Settings
from ..state.store import Store
from . import archives, venvs
from .cache import PACKAGES, VENVS, HostCache
from .options import PipOptions, RuntimeEnvOptions

Progress = Callable[[str], None]


class Package(TypedDict):
    uri: str
    digest: str
    subdir: str


class PipEnvironment(TypedDict):
    packages: list[str]
    pip_check: bool
    install_options: list[str]
    digest: str


class Environment(TypedDict):
    working_dir: Package | None
    py_modules: list[Package]
    env_vars: dict[str, str]
    pip: PipEnvironment | None
    setup_timeout_s: float


def environment_digest(environment: Environment) -> str:
    return hashlib.sha256(orjson.dumps(environment, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def package_digests(environment: Environment) -> list[str]:
    packages = [environment["working_dir"], *environment["py_modules"]]
    return sorted({package["digest"] for package in packages if package})


# where the application is built ---------------------------------------------------------------
@dataclass
class Resolver:
    """Turns runtime_env options into environments, reading each source once per build and
    keeping its archive in the host's cache (from which `upload` stores it in Redis)."""

    cache: HostCache
    base_dir: str
    max_bytes: int
    timeout_s: float
    progress: Progress = lambda message: None
    known: dict[str, Package] = field(default_factory=dict)  # "<kind>:<source>" -> package

    @classmethod
    def from_settings(cls, settings: Settings, base_dir: str,
                      progress: Progress = lambda message: None) -> Resolver:
        return cls(HostCache(settings.runtime_env_cache()), base_dir,
                   settings.runtime_env_max_mb << 20, settings.build_timeout_s, progress)

    def resolve(self, options: RuntimeEnvOptions, where: str) -> Environment | None:
        """The environment `options` describe (None if they ask for nothing), or
        RuntimeEnvError naming `where` they were given."""
        if options.is_empty:
            return None
        try:
            working_dir = (self.package(options.working_dir, "working_dir", options.excludes)
                           if options.working_dir else None)
            modules = [self.package(source, "py_modules", options.excludes)
                       for source in options.py_modules]
            pip = self.pip(options.pip) if options.pip else None
        except RuntimeEnvError as exc:
            raise RuntimeEnvError(f"the runtime_env of {where}: {exc}") from None
        return {"working_dir": working_dir, "py_modules": modules,
                "env_vars": dict(options.env_vars), "pip": pip,
                "setup_timeout_s": options.config.setup_timeout_seconds}

    def package(self, source: str, kind: str, excludes: list[str]) -> Package:
        key = f"{kind}:{source}"
        if key in self.known:
            return self.known[key]
        self.progress(f"fetching {kind} {source}")
        as_module = kind == "py_modules"
        archive = archives.read_source(source, self.base_dir, as_module=as_module,
                                       excludes=excludes, max_bytes=self.max_bytes,
                                       timeout_s=self.timeout_s)
        top = archives.check(archive, source, self.max_bytes)
        digest = hashlib.sha256(archive).hexdigest()
        uri = source if "://" in source else str(
            Path(self.base_dir, os.path.expanduser(source)).resolve())
        package: Package = {"uri": uri, "digest": digest,
                            "subdir": "" if as_module else top}
        materialize(self.cache, package, archive, self.max_bytes)
        self.known[key] = package
        return package

    def pip(self, pip: list[str] | str | PipOptions) -> PipEnvironment:
        options = pip if isinstance(pip, PipOptions) else PipOptions(packages=pip)
        packages = options.packages
        if isinstance(packages, str):
            packages = self._requirements_file(packages)
        packages = [line.strip() for line in packages if line.strip()]
        for line in packages:
            if line.startswith(("-r", "-c", "--requirement", "--constraint")):
                raise RuntimeEnvError(f"pip: {line!r} names another file, which worker nodes "
                                      "do not have; list its requirements instead")
        if not packages:
            raise RuntimeEnvError("pip: no requirements are listed")
        content = {"packages": packages, "pip_check": options.pip_check,
                   "install_options": list(options.pip_install_options)}
        digest = hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)
                                ).hexdigest()[:32]
        return {"packages": packages, "pip_check": options.pip_check,
                "install_options": list(options.pip_install_options), "digest": digest}

    def _requirements_file(self, name: str) -> list[str]:
        path = Path(self.base_dir, os.path.expanduser(name))
        try:
            text = path.read_text()
        except OSError as exc:
            raise RuntimeEnvError(f"pip: cannot read the requirements file {path}: "
                                  f"{exc.strerror}") from None
        return [line.split(" #", 1)[0] for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]


def materialize(cache: HostCache, package: Package, archive: bytes | None,
                max_bytes: int) -> Path | None:
    """Extract the package into the cache unless it is there; None if it is not there and
    `archive` is None (fetch it, then call again). Blocking: call it off the event loop."""
    digest = package["digest"]
    with cache.locked(PACKAGES, digest) as folder:
        if not folder.is_dir():
            if archive is None and cache.archive(digest).is_file():
                archive = cache.archive(digest).read_bytes()
            if archive is None:
                return None
            if hashlib.sha256(archive).hexdigest() != digest:
                raise RuntimeEnvError(f"{package['uri']}: its content changed since the "
                                      "application was built; deploy it again")
            archives.check(archive, package["uri"], max_bytes)
            staging = cache.temporary(PACKAGES, digest)
            staging.mkdir(parents=True)
            try:
                archives.extract(archive, staging, package["uri"], max_bytes)
                if not cache.archive(digest).is_file():
                    kept = staging.with_name(staging.name + ".zip")
                    kept.write_bytes(archive)
                    kept.rename(cache.archive(digest))
                staging.rename(folder)
            finally:
                archives.remove_tree(staging)
    return folder / package["subdir"] if package["subdir"] else folder


async def upload(store: Store, cache: HostCache, specs: dict[str, bytes]) -> None:
    """Store the packages the specs name in Redis, from this host's cache where the build left
    them, before the specs are written."""
    digests: set[str] = set()
    for blob in specs.values():
        digests.update(messages.unpack(blob).get("packages", ()))
    for digest in sorted(digests):
        if await store.has_package(digest):
            continue
        archive = await asyncio.to_thread(cache.archive(digest).read_bytes)
        await store.put_package(digest, archive)


# in a spec ----------------------------------------------------------------------------------
def seal(environment: Environment, secret: bytes) -> dict[str, Any]:
    """The spec's fields for an environment: signed, so a node checks it before it fetches or
    installs anything."""
    data = messages.pack(environment)
    return {"environment": data, "environment_sig": sign(secret, data),
            "packages": package_digests(environment)}


def unseal(spec: dict[str, Any], secret: bytes) -> Environment | None:
    data, sig = spec.get("environment"), spec.get("environment_sig")
    if data is None:
        return None
    if not verifies(secret, data, sig):
        raise RuntimeEnvError(not_verified("the spec's runtime_env", secret, "prepare"))
    environment: Environment = messages.unpack(data)
    return environment


# where replicas run -------------------------------------------------------------------------
@dataclass(frozen=True)
class Prepared:
    """How to start a process in an environment."""

    python: str
    paths: list[str]
    env_vars: dict[str, str]
    cwd: str | None


NOTHING = Prepared(sys.executable, [], {}, None)


async def prepare(environment: Environment | None, cache: HostCache, store: Store | None,
                  max_bytes: int, progress: Progress) -> Prepared:
    """Fetch and extract the environment's packages and build its virtual environment on this
    host, unless its cache has them. `progress` may be called from another thread."""
    if environment is None:
        return NOTHING
    paths: list[str] = []
    cwd: str | None = None
    for kind, package in [("working_dir", environment["working_dir"]),
                          *(("py_modules", p) for p in environment["py_modules"])]:
        if package is None:
            continue
        path = await asyncio.to_thread(materialize, cache, package, None, max_bytes)
        if path is None:
            progress(f"fetching {kind} {package['uri']}")
            archive = await _fetch(package, store, max_bytes)
            path = await asyncio.to_thread(materialize, cache, package, archive, max_bytes)
        assert path is not None
        paths.append(str(path))
        if kind == "working_dir":
            cwd = str(path)
    python = sys.executable
    pip = environment["pip"]
    if pip is not None:
        python = str(await asyncio.to_thread(
            venvs.ensure, cache, venv_key(pip), pip["packages"], pip["install_options"],
            pip["pip_check"], environment["setup_timeout_s"], progress))
    return Prepared(python, paths, dict(environment["env_vars"]), cwd)


def venv_key(pip: PipEnvironment) -> str:
    """A host's environment for a requirement set is layered over this very interpreter and
    environment: another broker-serve installation on the host gets its own."""
    return hashlib.sha256(f"{pip['digest']}\0{sys.prefix}\0{sys.version}".encode()
                          ).hexdigest()[:32]


def cache_entries(environment: Environment | None) -> list[tuple[str, str]]:
    """The host cache entries an environment uses, to keep them from being pruned."""
    if environment is None:
        return []
    entries = [(PACKAGES, digest) for digest in package_digests(environment)]
    if environment["pip"] is not None:
        entries.append((VENVS, venv_key(environment["pip"])))
    return entries


async def _fetch(package: Package, store: Store | None, max_bytes: int) -> bytes:
    archive = await store.package(package["digest"]) if store is not None else None
    if archive is None and archives.is_url(package["uri"]):
        archive = await asyncio.to_thread(archives.download, package["uri"], max_bytes, 300.0)
        if hashlib.sha256(archive).hexdigest() == package["digest"] and store is not None:
            await store.put_package(package["digest"], archive)  # heal Redis for other nodes
    if archive is None:
        raise RuntimeEnvError(f"the package of {package['uri']} is neither cached on this node "
                              "nor in Redis (did Redis restart empty?); deploy the application "
                              "again")
    return archive
