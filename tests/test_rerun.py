"""Running the same script again and again, each run cut short as it stops.

The cut is SIGTERM to the script's process group, then SIGKILL half a second later (Ctrl-C
followed by impatience, or a test runner or supervisor). It comes while the script serves, as
its main code returns, or while its atexit handler stops the local cluster. Whatever the cut
leaves behind (a lease, node, proxy and replica records with live heartbeats, the app's record,
status and specs), the next run must deploy and answer with its own code.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import orjson
import pytest
import redis

from broker_serve.state import liveness
from broker_serve.state.store import Store

from .conftest import REDIS_URL
from .waiting import wait_for

RUNS = 20
ANSWER_TIMEOUT_S = 90.0
KILL_AFTER_S = 0.5

# A function deployment: cloudpickle stamps a class pickled by value with a random id, so only
# a function's definition, and so its version, is the same when a new process runs the same
# code. "Same code" runs therefore meet the previous run's records of their very version.
SCRIPT = """
import time
import requests
from broker_serve import serve

@serve.deployment
def rerun() -> str:
    return "answer {version}"

serve.run(rerun.bind())
print("ANSWER", requests.get("http://127.0.0.1:{port}/", timeout=60).text, flush=True)
if "{cut}" == "serving":
    print("SERVING", flush=True)
    while True:
        time.sleep(3600)
print("RETURNING", flush=True)
"""

# Where each run is cut: while it serves; as its main code returns; or while its atexit
# handler stops the local cluster (marked by the worker node's own log line).
CUT_AT: dict[str, Callable[[str], bool]] = {
    "serving": lambda line: line == "SERVING",
    "returning": lambda line: line == "RETURNING",
    # The worker node logs this as the atexit handler's SIGTERM reaches it.
    "stopping": lambda line: "broker_serve.node.worker - worker node" in line and "stopping" in line,
}


class Run:
    """One driver script in its own process group; its stdout and stderr read line by line
    (stderr, with the local cluster's logs, also goes to `log`)."""

    def __init__(self, source: str, env: dict[str, str], log: Path) -> None:
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-c", source], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.pgid = self.process.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._readers = [threading.Thread(target=self._read, args=(stream,), daemon=True)
                         for stream in (self.process.stdout, self.process.stderr)]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            if stream is self.process.stderr:
                self.log.write(line)
                self.log.flush()
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)  # every process of the group closed this stream

    def wait_for_line(self, matches: Callable[[str], bool], what: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        closed = 0
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no {what} within {timeout:.0f}s") from None
            if line is None:
                closed += 1
                if closed == len(self._readers):
                    raise EOFError(f"the script exited (code {self.process.poll()}) "
                                   f"before printing {what}")
                continue
            if matches(line):
                return line

    def cut(self) -> None:
        """SIGTERM to the group, SIGKILL half a second later."""
        signal_group(self.pgid, signal.SIGTERM)
        time.sleep(KILL_AFTER_S)
        signal_group(self.pgid, signal.SIGKILL)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for reader in self._readers:
            reader.join(5)
        self.log.close()

    def tail(self, lines: int = 20) -> str:
        text = Path(self.log.name).read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


def signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces): state ppid pgrp ...
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_script_cut_short_again_and_again_deploys_its_own_code_every_time(cluster, tmp_path):
    groups: list[int] = []
    failures: list[str] = []
    version = 0
    try:
        for run_number in range(RUNS):
            # Every 6 runs give each cut with the same code as the run before and with
            # changed code.
            cut = list(CUT_AT)[run_number % 3]
            changed = run_number % 2 == 1
            version += changed
            expected = f"ANSWER answer v{version}"
            source = SCRIPT.format(version=f"v{version}", port=cluster.port, cut=cut)
            label = f"run {run_number} (cut {cut}, v{version}, {'changed' if changed else 'same'})"
            run = Run(source, cluster.env, tmp_path / f"run{run_number}.log")
            groups.append(run.pgid)
            started = time.monotonic()
            try:
                answer = run.wait_for_line(lambda line: line.startswith("ANSWER "), "answer",
                                           ANSWER_TIMEOUT_S)
                print(f"{label} answered after {time.monotonic() - started:.1f}s", flush=True)
                if answer != expected:
                    failures.append(f"{label}: got {answer!r}, wanted {expected!r}")
                run.wait_for_line(CUT_AT[cut], f"the {cut} marker", 30)
            except (TimeoutError, EOFError) as exc:
                failures.append(f"{label}: {exc}\n{run.tail()}")
            finally:
                run.cut()
    finally:
        for pgid in groups:
            signal_group(pgid, signal.SIGKILL)
        # Nothing of any run is left: every process of every group is gone.
        wait_for(lambda: not any(group_members(pgid) for pgid in groups), timeout=20)
    assert not failures, f"{len(failures)} of {RUNS} runs failed:\n" + "\n\n".join(failures)


def test_a_spec_that_a_live_record_names_is_never_deleted(cluster):
    """The controller's deletion of a deleted app's specs spares those a record written again
    in the meantime names: the check and the delete are one step."""

    async def scenario() -> tuple[bool, bool, bool]:
        store = Store(REDIS_URL, cluster.name)
        names = store.names
        old, new = names.spec("app", "D", "v1"), names.spec("app", "D", "v2")
        record = {"name": "app", "deployments": {"D": {"version": "v1"}}}
        try:
            await store.put_app(record, {old: b"old"})
            await store.delete_field(names.apps, "app")  # serve.delete, or a script's atexit
            await store.put_app({**record, "deployments": {"D": {"version": "v2"}}},
                                {new: b"new"})  # the next run deploys again
            await store.delete_unnamed_specs("app")  # the controller catches up with the delete
            kept = [await store.spec("app", "D", "v1"), await store.spec("app", "D", "v2")]
            await store.delete_field(names.apps, "app")
            await store.delete_unnamed_specs("app")
            return bool(kept[0]), bool(kept[1]), bool(await store.spec("app", "D", "v2"))
        finally:
            await store.close()

    assert asyncio.run(scenario()) == (False, True, False)


def test_a_stamp_tells_a_process_of_this_machine_that_ended():
    source = ("import sys; from broker_serve.state import liveness; "
              "print(liveness.stamp().decode(), flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", source], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    assert child.stdout is not None and child.stdin is not None
    stamp = child.stdout.readline().strip()
    assert not liveness.is_gone(stamp)
    child.stdin.close()
    child.wait(10)
    assert liveness.is_gone(stamp)
    # Another PID namespace (another container), or a value that is not a stamp at all, is
    # never judged: its record waits for its heartbeat's TTL.
    elsewhere = orjson.dumps({**orjson.loads(stamp), "pid_ns": "pid:[1]"})
    assert not liveness.is_gone(elsewhere)
    assert not liveness.is_gone(b"3")


def test_a_driver_whose_controller_dies_while_it_deploys_starts_its_own_cluster(cluster,
                                                                                 tmp_path):
    """A driver that joined a dying cluster (here: a lone controller, killed while the driver
    waits for its deploy) starts a local cluster instead of failing."""
    lone = subprocess.Popen([sys.executable, "-m", "broker_serve", "controller"],
                            env=cluster.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    groups = [lone.pid]
    client = redis.Redis.from_url(REDIS_URL)
    try:
        wait_for(lambda: client.get(f"bs:{cluster.name}:controller:lease"))
        source = SCRIPT.format(version="vlone", port=cluster.port, cut="returning")
        run = Run(source, cluster.env, tmp_path / "driver.log")
        groups.append(run.pgid)
        # It found a leader, so it deploys and waits; with no worker node nothing runs.
        wait_for(lambda: client.hexists(f"bs:{cluster.name}:apps", "default"), timeout=60)
        lone.kill()
        lone.wait(10)
        answer = run.wait_for_line(lambda line: line.startswith("ANSWER "), "answer", 60)
        assert answer == "ANSWER answer vlone"
        run.wait_for_line(CUT_AT["returning"], "the returning marker", 30)
        assert run.process.wait(60) == 0
    finally:
        client.close()
        for pgid in groups:
            signal_group(pgid, signal.SIGKILL)
        wait_for(lambda: not any(group_members(pgid) for pgid in groups), timeout=20)
