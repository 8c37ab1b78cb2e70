"""What replica processes did, written down where a test can read it: one file of events per
process, in a directory of the test's own."""

from __future__ import annotations

import os
from pathlib import Path


def note(directory: str, event: str) -> None:
    """Append `event` to this process's events (called in replicas)."""
    with open(os.path.join(directory, f"events-{os.getpid()}"), "a") as events:
        events.write(event + "\n")


def events(directory: Path) -> dict[int, list[str]]:
    """Each process's events, by pid."""
    return {int(path.name.removeprefix("events-")): path.read_text().split()
            for path in directory.glob("events-*")}


def exited(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie waiting for its parent counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True
