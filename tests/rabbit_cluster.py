"""A throwaway RabbitMQ cluster of extra nodes on this machine, for chaos tests.

The system node (`rabbit@localhost`, port 5672) is left alone. Each extra node runs as user
`rabbitmq` (so it shares the system's Erlang cookie through HOME=/var/lib/rabbitmq), with its own
name, config, data and log directories under one temporary directory, and free ports for AMQP
and distribution. No plugin is enabled, so nothing else binds a fixed port.

The first node boots standalone; the others list it as their classic-config peer and join it
while they boot, which spares the `stop_app; join_cluster; start_app` round trip (a second boot
of each node). A node that was killed restarts from its data directory and rejoins by itself.

    with RabbitCluster() as cluster:
        cluster.amqp_url      # "amqp://guest:guest@127.0.0.1:p1/,amqp://...:p2/,..."
        cluster.kill(0)
        cluster.start(0)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from .conftest import free_port

RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
RABBITMQCTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"
RABBITMQ_USER = "rabbitmq"
# The system node's home: it holds the Erlang cookie every node and CLI call must share.
RABBITMQ_HOME = "/var/lib/rabbitmq"
HOST = "localhost"
# tmpfs, where there is one: quorum queues fsync their log, and the disk is shared with others.
TEMP_ROOT = "/dev/shm" if os.path.isdir("/dev/shm") else None
DIRECTORY_PREFIX = "bs-rabbit-"


class RabbitClusterError(RuntimeError):
    """A node did not start, join or die in time; the message carries its log tail."""


@dataclass
class RabbitNode:
    name: str
    amqp_port: int
    dist_port: int
    directory: Path
    seed: str | None
    process: subprocess.Popen[bytes] | None = None
    # More rabbitmq.conf lines, such as a TLS listener's (tests/tls_services.py).
    extra_config: tuple[str, ...] = ()

    @property
    def amqp_url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def config_file(self) -> Path:
        return self.directory / "rabbitmq.conf"

    @property
    def pid_file(self) -> Path:
        return self.directory / "beam.pid"

    @property
    def log_file(self) -> Path:
        return self.directory / "log" / f"{self.name}.log"

    @property
    def output_file(self) -> Path:
        """The server's stdout and stderr: where it says why it failed before logging."""
        return self.directory / "output.log"

    def config(self) -> str:
        lines = [f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}", "log.console = false"]
        if self.seed is not None:
            # Joins the seed on first boot, waiting up to 60 s for it to come up.
            lines += ["cluster_formation.peer_discovery_backend = classic_config",
                      f"cluster_formation.classic_config.nodes.1 = {self.seed}",
                      "cluster_formation.discovery_retry_limit = 120",
                      "cluster_formation.discovery_retry_interval = 500"]
        return "\n".join([*lines, *self.extra_config]) + "\n"

    def environment(self) -> dict[str, str]:
        return {
            "HOME": RABBITMQ_HOME,
            "LANG": "C.UTF-8",
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_CONFIG_FILE": str(self.config_file),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            # The server script then execs the VM instead of staying as a signal-forwarding
            # parent, so the process we start is beam.smp itself.
            "RUNNING_UNDER_SYSTEMD": "1",
        }

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in (self.output_file, self.log_file):
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            if text:
                parts.append(f"--- {path} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(parts) or f"(no log yet in {self.directory})"


class RabbitCluster:
    """`size` extra RabbitMQ nodes clustered together; also a context manager.

    Start and stop it from one thread that outlives the nodes (a test's own): the kernel kills
    each node when the thread that started it ends (setpriv --pdeathsig)."""

    def __init__(self, size: int = 3, timeout: float = 60,
                 extra_config: tuple[str, ...] = ()) -> None:
        self.size = size
        self.timeout = timeout
        self.extra_config = extra_config  # for every node's rabbitmq.conf
        self.directory: Path | None = None
        self.nodes: list[RabbitNode] = []

    def __enter__(self) -> Self:
        self.start_all()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop_all()

    @property
    def amqp_urls(self) -> list[str]:
        return [node.amqp_url for node in self.nodes]

    @property
    def amqp_url(self) -> str:
        """Every node, in the comma-separated form BROKER_SERVE_AMQP_URL reads."""
        return ",".join(self.amqp_urls)

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self.nodes]

    def start_all(self) -> None:
        remove_stale_directories()
        self.directory = Path(tempfile.mkdtemp(prefix=DIRECTORY_PREFIX, dir=TEMP_ROOT))
        run_id = secrets.token_hex(3)
        letters = "abcdefghijklmnopqrstuvwxyz"[:self.size]
        seed = f"bs{letters[0]}{run_id}@{HOST}"
        try:
            for letter in letters:
                name = f"bs{letter}{run_id}@{HOST}"
                node = RabbitNode(name, free_port(), free_port(), self.directory / letter,
                                  seed=None if name == seed else seed,
                                  extra_config=self.extra_config)
                self._prepare(node)
                self.nodes.append(node)
            shutil.chown(self.directory, RABBITMQ_USER, RABBITMQ_USER)
            for node in self.nodes:
                self._spawn(node)
            self._wait_until_all_running(self.nodes[0])
        except BaseException:
            self.stop_all()
            raise

    def kill(self, index: int) -> None:
        """SIGKILL node `index`'s beam.smp and wait until it is gone."""
        node = self.nodes[index]
        assert node.process is not None, f"{node.name} is not running"
        os.kill(self._beam_pid(node), signal.SIGKILL)
        self._reap(node)

    def start(self, index: int) -> None:
        """Start node `index` again from its data directory; return once it runs in the cluster."""
        node = self.nodes[index]
        assert node.process is None, f"{node.name} is already running"
        node.pid_file.unlink(missing_ok=True)
        self._spawn(node)
        self._wait_until_all_running(node)

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.process is not None:
                self._reap(node, kill_group=True)
        self.nodes = []
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None

    def log_tail(self, index: int, lines: int = 40) -> str:
        return self.nodes[index].log_tail(lines)

    def running_nodes(self, index: int) -> list[str]:
        """The nodes `rabbitmqctl cluster_status` on node `index` reports as running."""
        result = rabbitmqctl(self.nodes[index].name, "cluster_status", "--formatter", "json")
        if result.returncode != 0:
            return []
        return list(json.loads(result.stdout)["running_nodes"])

    def _prepare(self, node: RabbitNode) -> None:
        for sub in ("", "mnesia", "log"):
            (node.directory / sub).mkdir(exist_ok=True)
        node.config_file.write_text(node.config())
        (node.directory / "enabled_plugins").write_text("[].\n")
        for path in (node.directory, *node.directory.rglob("*")):
            shutil.chown(path, RABBITMQ_USER, RABBITMQ_USER)

    def _spawn(self, node: RabbitNode) -> None:
        environment = [f"{key}={value}" for key, value in node.environment().items()]
        with node.output_file.open("ab") as output:
            # setpriv execs (unlike runuser, which stays as a parent); --pdeathsig kills the
            # node if this process dies first, so an aborted run leaves no broker behind.
            node.process = subprocess.Popen(
                ["setpriv", f"--reuid={RABBITMQ_USER}", f"--regid={RABBITMQ_USER}",
                 "--init-groups", "--pdeathsig=KILL", "env", "-i", *environment,
                 RABBITMQ_SERVER],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                cwd=node.directory, start_new_session=True)

    def _wait_until_all_running(self, node: RabbitNode) -> None:
        """Wait until `node` reports every started node running and each accepts AMQP."""
        started = [other for other in self.nodes if other.process is not None]
        expected = {other.name for other in started}

        def all_running() -> bool:
            self._raise_if_exited(node)
            return (expected <= set(self.running_nodes(self.nodes.index(node)))
                    and all(accepts_connections(other.amqp_port) for other in started))

        wait_until(all_running, self.timeout,
                   lambda: f"{node.name} did not run in a cluster of {sorted(expected)} within "
                           f"{self.timeout} s\n{self._log_tails()}")

    def _raise_if_exited(self, node: RabbitNode) -> None:
        for other in self.nodes:
            if other.process is not None and other.process.poll() is not None:
                raise RabbitClusterError(
                    f"{other.name} exited with {other.process.returncode} (node {node.name} "
                    f"was starting)\n{other.log_tail()}")

    def _beam_pid(self, node: RabbitNode) -> int:
        assert node.process is not None
        # RUNNING_UNDER_SYSTEMD makes the started process beam.smp itself; the pid file is the
        # node's own word, should a later server script fork after all.
        if node.pid_file.exists():
            return int(node.pid_file.read_text().strip())
        return node.process.pid

    def _reap(self, node: RabbitNode, kill_group: bool = False) -> None:
        assert node.process is not None
        beam_pid = self._beam_pid(node)
        if kill_group:
            try:
                os.killpg(node.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            node.process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            raise RabbitClusterError(f"{node.name} (pid {beam_pid}) did not die") from None
        wait_until(lambda: not process_alive(beam_pid), self.timeout,
                   lambda: f"{node.name}'s beam.smp (pid {beam_pid}) did not die")
        try:
            # erl_child_setup and the disk monitor follow the VM out; make sure of it.
            os.killpg(node.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.process = None

    def _log_tails(self) -> str:
        return "\n".join(node.log_tail(20) for node in self.nodes)


def rabbitmqctl(node: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    command = ["setpriv", f"--reuid={RABBITMQ_USER}", f"--regid={RABBITMQ_USER}", "--init-groups",
               "env", f"HOME={RABBITMQ_HOME}", RABBITMQCTL, "-n", node, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def process_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def remove_stale_directories() -> None:
    """Remove what runs that were killed left (their nodes died with them, by --pdeathsig).
    A directory is stale when each node wrote its pid file and none of those processes lives;
    a run still starting a node has no pid file for it yet, so it is left alone."""
    for directory in Path(TEMP_ROOT or tempfile.gettempdir()).glob(f"{DIRECTORY_PREFIX}*"):
        node_directories = [path for path in directory.iterdir() if path.is_dir()]
        pid_files = [path / "beam.pid" for path in node_directories]
        if pid_files and not any(may_be_alive(path) for path in pid_files):
            shutil.rmtree(directory, ignore_errors=True)


def may_be_alive(pid_file: Path) -> bool:
    try:
        pid = pid_file.read_text().strip()
    except FileNotFoundError:
        return True
    # An empty file is one being written.
    return not pid or process_alive(int(pid))


def wait_until(condition: Callable[[], bool], timeout: float, describe: Callable[[], str],
               interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RabbitClusterError(describe())
        time.sleep(interval)
