"""Starting a cluster on this machine: a controller, a proxy and a worker node as processes.

`serve.run` and `broker-serve run` start one as child processes that die with the driver;
`broker-serve start` starts one detached, with its pids and logs under a state directory so that
`broker-serve stop` can find it. Unless the operator set a cluster secret, its processes share
one generated into that directory (credentials.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

from tenacity import RetryCallState, Retrying, retry_if_result, stop_after_delay, wait_fixed

from ..credentials import local_secret_file
from ..exceptions import ClusterUnavailable
from ..lifecycle import die_with_parent_env
from ..protocol.names import Names
from ..settings import Settings, state_dir
from ..state import connection
from ..state.liveness import process_id

READY_TIMEOUT_S = 60.0


class LocalCluster:
    def __init__(self, settings: Settings, http_host: str = "127.0.0.1", http_port: int = 8000,
                 detached: bool = False, proxy: bool = True) -> None:
        self.settings = settings
        self.proxy = proxy  # False with proxy location Disabled
        self.http_host = http_host
        self.http_port = http_port
        self.detached = detached
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        commands = {
            "controller": ["controller"],
            "worker": ["worker", "--no-proxy"],  # this cluster runs its own proxy below
            "proxy": ["proxy", "--host", self.http_host, "--port", str(self.http_port)],
        }
        if not self.proxy:
            del commands["proxy"]
        directory = state_dir(self.settings.cluster)
        directory.mkdir(parents=True, exist_ok=True)
        secret_file = local_secret_file(self.settings)
        secret_env = {"BROKER_SERVE_CLUSTER_SECRET_FILE": str(secret_file)} if secret_file else {}
        for role, args in commands.items():
            self.processes[role] = self._spawn(role, args, directory, secret_env)
        if self.detached:
            pids = {role: p.pid for role, p in self.processes.items()}
            (directory / "pids.json").write_text(json.dumps(pids))
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def _spawn(self, role: str, args: list[str], directory: Path,
               secret_env: dict[str, str]) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "broker_serve", *args]
        env = {**os.environ, **self.settings.env(), **secret_env}
        if not self.detached:
            # A process group of their own: a Ctrl-C at the terminal reaches only the driver,
            # which deletes its application through this controller, then stops them.
            return subprocess.Popen(command, env={**env, **die_with_parent_env()},
                                    process_group=0)
        with open(directory / f"{role}.log", "ab") as log:  # the child has its own copy
            return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self) -> None:
        """Wait until this cluster's own controller leads, its node has joined and its proxy
        answers. Records a killed cluster left behind (a lease, nodes, proxies) do not count."""
        names = Names(self.settings.cluster)
        ids = {role: process_id(process.pid) for role, process in self.processes.items()}
        client = connection.sync_client(self.settings.redis_url, self.settings.client_tls())

        def ready() -> bool:
            for role, process in self.processes.items():
                if process.poll() is not None:
                    raise ClusterUnavailable(
                        f"the local {role} exited with code {process.returncode} while "
                        f"starting; see its log above"
                        + (f" or in {state_dir(self.settings.cluster)}" if self.detached
                           else "")
                    )
            leader = client.get(names.controller_lease) == ids["controller"].encode()
            node = client.hexists(names.nodes, ids["worker"])
            proxy = "proxy" not in ids or client.hexists(names.proxies, ids["proxy"])
            return bool(leader and node and proxy)

        def not_ready(state: RetryCallState) -> NoReturn:
            raise ClusterUnavailable("the local cluster did not become ready in time")

        try:
            Retrying(stop=stop_after_delay(READY_TIMEOUT_S), wait=wait_fixed(0.1),
                     retry=retry_if_result(lambda done: not done),
                     retry_error_callback=not_ready)(ready)
        finally:
            client.close()

    def stop(self, timeout: float = 30.0) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in self.processes.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def stop_detached(cluster: str, timeout: float = 30.0) -> list[str]:
    """Stop the detached cluster `broker-serve start` left running. Returns the roles stopped."""
    pid_file = state_dir(cluster) / "pids.json"
    if not pid_file.exists():
        return []
    pids: dict[str, int] = json.loads(pid_file.read_text())
    stopped = []
    for role, pid in pids.items():
        try:
            os.kill(pid, signal.SIGTERM)
            stopped.append(role)
        except ProcessLookupError:
            pass
    Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(0.05),
             retry=retry_if_result(lambda alive: alive), retry_error_callback=lambda state: None
             )(lambda: any(_alive(pid) for pid in pids.values()))
    for pid in pids.values():
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    pid_file.unlink(missing_ok=True)
    return stopped


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True
