"""Whether the process that wrote a record still runs.

Heartbeats say a process lives until their TTL runs out, so a killed process looks alive for
up to 10 s. Each heartbeat therefore carries its writer's stamp: the kernel's boot id, the
writer's PID namespace, its pid and its start time. A reader in the same boot and the same PID
namespace (the same machine or container) can then tell from /proc at once whether the writer
is gone. From anywhere else nothing is provable, and a record waits for its TTL as before.
See docs/architecture.md, "Control state".
"""

from __future__ import annotations

import os
import socket
from typing import Any

import orjson

_own: tuple[int, dict[str, Any]] | None = None  # (pid, stamp): computed once per process


def process_id(pid: int | None = None) -> str:
    """The id a controller, worker node or proxy gives itself: `<host name>-<pid>`."""
    return f"{socket.gethostname()}-{pid if pid is not None else os.getpid()}"


def stamp() -> bytes:
    """This process's stamp (JSON), the value of its heartbeats."""
    return orjson.dumps(_own_stamp())


def _own_stamp() -> dict[str, Any]:
    global _own
    pid = os.getpid()
    if _own is None or _own[0] != pid:
        _own = (pid, {"pid": pid, "boot": _boot_id(), "pid_ns": _pid_namespace(),
                      "start": _start_time(pid)})
    return _own[1]


def is_gone(value: bytes | str | None) -> bool:
    """True if the stamp names a process of this boot and PID namespace that no longer runs
    (or whose pid now belongs to another process). False when that is not provable: a stamp
    from elsewhere, or a value that is no stamp at all (a replica's heartbeat is a number)."""
    mine = _own_stamp()
    theirs = _parse(value)
    if theirs is None or mine["boot"] is None or mine["pid_ns"] is None:
        return False
    if (theirs.get("boot"), theirs.get("pid_ns")) != (mine["boot"], mine["pid_ns"]):
        return False
    pid = theirs.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # another user's process: it exists
    start = _start_time(pid)
    if start is None:  # hidden from us (hidepid): it exists, whose it is we cannot tell
        return False
    return start != theirs.get("start") or _state(pid) == "Z"


def _parse(value: bytes | str | None) -> dict[str, Any] | None:
    if not value:
        return None
    try:
        parsed = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as file:
            return file.read().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_time(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None
