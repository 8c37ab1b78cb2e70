"""Run the services of docker-compose.yml as local processes, as Compose would start them.

There is no Docker engine on the test machines, so tests/test_compose.py proves the compose
wiring this way. Each service built from this repository (the non-infrastructure ones) runs its
`command` after the image's ENTRYPOINT, in the image's WORKDIR (this checkout), with its own
`environment` and these substitutions only:

- URLs naming a compose service (`rabbitmq`, `redis`) point at the machine's RabbitMQ and Redis,
  with the machine's credentials: its broker has only guest and its Redis only `default`, not
  the users of each role that the compose RabbitMQ imports and the compose Redis loads
  (tests/test_compose.py checks those, and boots a node of each on them).
- `BROKER_SERVE_CLUSTER` is the test's namespace.
- `/run/secrets/<name>`, where Compose mounts a secret the service lists, is the secret's
  `file` in this checkout.
- Each instance gets a free local port for every container port its service exposes, in place of
  that port wherever it appears in the command, the environment or the health check: scaled
  instances share one host here, where each container had an address of its own.

`depends_on` is honoured: `service_healthy` runs the dependency's own health check command.

`load_compose` reads the file as `docker compose config` would: `${VAR:-default}` resolved
from an env file only (the committed .env by default, deploy/ha.env for the ha profile; the
shell's environment is left out, so that the result does not depend on who runs the tests),
and only the services of the profiles its COMPOSE_PROFILES enables, their `required: false`
dependencies on the others dropped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from .conftest import AMQP_URL, REDIS_URL, ROOT, free_port

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_FILE = ROOT / ".env"  # what Compose reads when it is given no --env-file
DOCKERFILE = ROOT / "Dockerfile"

# The machine's services stand in for the compose services of the same role.
STAND_INS = {"rabbitmq": AMQP_URL, "redis": REDIS_URL}
SECRETS_DIR = "/run/secrets/"  # where Compose mounts a service's secrets


def load_compose(path: Path = COMPOSE_FILE, env_file: Path | None = ENV_FILE) -> dict[str, Any]:
    """The project Compose runs from `path` with `--env-file env_file` (None: no env file)."""
    variables = read_env_file(env_file) if env_file is not None else {}
    compose = interpolate_tree(load_compose_file(path), variables)
    profiles = {p.strip() for p in variables.get("COMPOSE_PROFILES", "").split(",") if p.strip()}
    return with_profiles(compose, profiles)


def load_compose_file(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The file as written: every profile, variables not resolved."""
    with path.open() as file:
        compose = yaml.safe_load(file)  # resolves the `<<: *anchor` merges as Compose does
    assert isinstance(compose, dict) and isinstance(compose.get("services"), dict)
    return compose


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and `#` comments skipped, one pair of quotes removed."""
    variables = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, equals, value = line.removeprefix("export ").partition("=")
        assert equals and re.fullmatch(r"[A-Za-z_]\w*", key.strip()), f"{path}:{number}: {line}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        variables[key.strip()] = value
    return variables


# $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, ${VAR:+alt},
# ${VAR+alt}, $VAR: the forms Compose interpolates (without nesting, which this file avoids).
_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_]\w*)"
                       r"(?:(?P<operator>:?[-?+])(?P<argument>[^}]*))?\}|(?P<plain>[A-Za-z_]\w*))")


def interpolate(value: str, variables: dict[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        operator, argument = match["operator"] or "", match["argument"] or ""
        assert "${" not in argument, f"nested interpolation is not handled: {match[0]}"
        current = variables.get(name)
        is_set = current is not None and (current != "" or not operator.startswith(":"))
        if operator.endswith("-"):
            return current if is_set and current is not None else argument
        if operator.endswith("?"):
            assert is_set and current is not None, f"{name}: {argument or 'not set'}"
            return current
        if operator.endswith("+"):
            return argument if is_set else ""
        return current or ""

    return _VARIABLE.sub(substitute, value)


def interpolate_tree(value: Any, variables: dict[str, str]) -> Any:
    """Every string value in `value` interpolated (mapping keys are left as they are)."""
    if isinstance(value, str):
        return interpolate(value, variables)
    if isinstance(value, dict):
        return {key: interpolate_tree(item, variables) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate_tree(item, variables) for item in value]
    return value


def with_profiles(compose: dict[str, Any], profiles: set[str]) -> dict[str, Any]:
    """The services Compose enables with these profiles active: those with no `profiles` and
    those with an active one. A dependency on a service left out is dropped if it is
    `required: false`; Compose refuses the project otherwise."""
    services = {name: service for name, service in compose["services"].items()
                if not service.get("profiles") or profiles & set(service["profiles"])}
    enabled = {}
    for name, service in services.items():
        declared = service.get("depends_on") or {}
        if isinstance(declared, list):
            declared = {dependency: {} for dependency in declared}
        kept = {}
        for dependency, spec in declared.items():
            if dependency in services:
                kept[dependency] = spec
            else:
                assert dependency in compose["services"], f"{name}: unknown {dependency}"
                assert (spec or {}).get("required", True) is False, (
                    f"{name} requires {dependency}, which profiles {sorted(profiles)} leave out")
        enabled[name] = {**service, "depends_on": kept} if "depends_on" in service else service
    return {**compose, "services": enabled}


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with comments dropped and continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def exec_form(arguments: str) -> list[str]:
    """ENTRYPOINT/CMD arguments: the JSON (exec) form, or a shell-form string split."""
    if arguments.startswith("["):
        value = json.loads(arguments)
        assert isinstance(value, list)
        return [str(v) for v in value]
    return shlex.split(arguments)


@dataclass(frozen=True)
class Image:
    entrypoint: list[str]
    workdir: str

    @classmethod
    def from_dockerfile(cls, path: Path = DOCKERFILE) -> Image:
        entrypoint: list[str] = []
        workdir = "/"
        for keyword, arguments in dockerfile_instructions(path):
            if keyword == "ENTRYPOINT":
                entrypoint = exec_form(arguments)
            elif keyword == "WORKDIR":
                workdir = arguments
        return cls(entrypoint, workdir)


def built_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services whose image this repository builds: the non-infrastructure ones."""
    return {name: service for name, service in compose["services"].items() if "build" in service}


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Dependency -> condition, from either form of `depends_on`."""
    value = service.get("depends_on") or {}
    if isinstance(value, list):
        return {name: "service_started" for name in value}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in value.items()}


def exposed_ports(service: dict[str, Any]) -> list[int]:
    return [int(str(port).split("/")[0]) for port in service.get("expose", [])]


def start_order(services: dict[str, dict[str, Any]]) -> list[str]:
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"depends_on cycle: {' -> '.join((*path, name))}"
        if name in order:
            return
        for dependency in depends_on(services[name]):
            if dependency in services:
                visit(dependency, (*path, name))
        order.append(name)

    for name in services:
        visit(name, ())
    return order


@dataclass
class Instance:
    service: str
    index: int
    ports: dict[int, int]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class LocalCompose:
    compose: dict[str, Any]
    cluster: str
    log_dir: Path
    scale: dict[str, int] = field(default_factory=dict)
    image: Image = field(default_factory=Image.from_dockerfile)
    instances: dict[str, list[Instance]] = field(default_factory=dict)

    @property
    def services(self) -> dict[str, dict[str, Any]]:
        return built_services(self.compose)

    # translation -------------------------------------------------------------------------
    def environment(self, service: str, instance: Instance) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_SERVE_")}
        declared = self.services[service].get("environment") or {}
        if isinstance(declared, list):
            declared = dict(item.split("=", 1) for item in declared)
        for key, value in declared.items():
            value = self._secret(service, self._url(str(value)))
            if key.endswith("_PORT") and value.isdigit():
                value = str(instance.ports.get(int(value), value))
            env[key] = value
        env["BROKER_SERVE_CLUSTER"] = self.cluster
        return env

    def _secret(self, service: str, value: str) -> str:
        name = value.removeprefix(SECRETS_DIR)
        if name == value:
            return value
        assert name in self.services[service].get("secrets", []), f"{service} lacks {name}"
        return str(ROOT / self.compose["secrets"][name]["file"])

    def _url(self, value: str) -> str:
        parts = urlsplit(value)
        if not parts.scheme or parts.hostname not in self.compose["services"]:
            return value
        assert parts.hostname in STAND_INS, (
            f"{value}: only {sorted(STAND_INS)} have local stand-ins"
        )
        local = urlsplit(STAND_INS[parts.hostname])
        return urlunsplit(parts._replace(netloc=local.netloc))

    def argv(self, args: list[str], instance: Instance) -> list[str]:
        """A container's argv as a local one: its programs from this virtualenv, the image's
        WORKDIR as this checkout, container ports as the instance's local ports."""
        program = Path(sys.executable).parent / args[0]
        assert "/" not in args[0] and program.exists(), f"{args[0]}: not in this virtualenv"
        workdir = self.image.workdir.rstrip("/") + "/"
        local = [str(program)]
        for arg in args[1:]:
            if arg.isdigit() and int(arg) in instance.ports:
                arg = str(instance.ports[int(arg)])
            elif arg.startswith(workdir):
                arg = str(ROOT / arg[len(workdir):])
            local.append(arg)
        return local

    def command(self, service: str, instance: Instance) -> list[str]:
        command = self.services[service]["command"]
        assert isinstance(command, list), f"{service}: use the exec form for `command`"
        return self.argv([*self.image.entrypoint, *command], instance)

    def healthcheck(self, service: str, instance: Instance) -> list[str] | None:
        test = (self.services[service].get("healthcheck") or {}).get("test")
        if test is None:
            return None
        assert isinstance(test, list) and test[0] == "CMD", f"{service}: use [CMD, ...]"
        return self.argv(test[1:], instance)

    # lifecycle ---------------------------------------------------------------------------
    def up(self, timeout: float = 60) -> None:
        for service in start_order(self.services):
            self.wait_for_dependencies(service, timeout)
            self.start(service)

    def start(self, service: str) -> list[Instance]:
        count = self.scale.get(service, 1)
        started = []
        for index in range(1, count + 1):
            ports = {port: free_port() for port in exposed_ports(self.services[service])}
            instance = Instance(service, index, ports, self.log_dir / f"{service}-{index}.log")
            with instance.log.open("wb") as log:
                instance.process = subprocess.Popen(
                    self.command(service, instance), cwd=ROOT,
                    env=self.environment(service, instance), stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
            started.append(instance)
        self.instances[service] = started
        return started

    def wait_for_dependencies(self, service: str, timeout: float) -> None:
        for dependency, condition in depends_on(self.services[service]).items():
            if dependency not in self.services:
                continue  # infrastructure: the machine's own service stands in
            if condition == "service_healthy":
                self.wait_healthy(dependency, timeout)
            elif condition == "service_completed_successfully":
                for instance in self.instances[dependency]:
                    assert instance.process is not None
                    assert instance.process.wait(timeout) == 0, instance.tail()

    def healthy(self, service: str) -> bool:
        for instance in self.instances[service]:
            command = self.healthcheck(service, instance)
            assert command is not None, f"{service} has no healthcheck to wait for"
            check = subprocess.run(command, cwd=ROOT, env=self.environment(service, instance),
                                   capture_output=True, timeout=30)
            if check.returncode != 0:
                return False
        return True

    def wait_healthy(self, service: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy(service):
            self.assert_running()
            assert time.monotonic() < deadline, f"{service} not healthy within {timeout}s"
            time.sleep(0.2)

    def assert_running(self) -> None:
        for instance in self.all_instances():
            assert instance.process is not None
            code = instance.process.poll()
            assert code is None, f"{instance.name} exited with {code}:\n{instance.tail()}"

    def all_instances(self) -> list[Instance]:
        return [instance for group in self.instances.values() for instance in group]

    def down(self, timeout: float = 40) -> None:
        """SIGTERM in reverse start order, as `docker compose down` does, then SIGKILL whatever
        of this namespace is left (replica processes included)."""
        deadline = time.monotonic() + timeout
        for service in reversed(list(self.instances)):
            running = [i.process for i in self.instances[service]
                       if i.process is not None and i.process.poll() is None]
            for process in running:
                process.send_signal(signal.SIGTERM)
            for process in running:
                try:
                    process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for pid in self.leftovers():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftovers(self) -> list[int]:
        """Processes (other than this one) running in the namespace: nothing else uses it."""
        marker = f"BROKER_SERVE_CLUSTER={self.cluster}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in environ.split(b"\0") and state != "Z":
                found.append(int(entry.name))
        return found

    def logs(self) -> str:
        return "\n".join(f"--- {i.name}: {' '.join(i.process.args) if i.process else ''}\n"
                         f"{i.tail()}" for i in self.all_instances())
