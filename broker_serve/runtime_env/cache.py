"""A host's cache of runtime_env packages and virtual environments (docs/architecture.md,
"Runtime environments").

Entries are content-addressed (`packages/<digest>`, `venvs/<digest>`), so every cluster and
process on the host shares them. Each entry has a lock file, so one process fetches or builds it
while the others wait, and a use marker whose time says when it was last used. Lock files are
never removed: a process waiting on one that was unlinked would hold a lock nobody else sees.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("broker_serve.runtime_env")

PACKAGES = "packages"
VENVS = "venvs"
_TEMPORARY_MARK = ".tmp-"
_ABANDONED_S = 3600.0  # a temporary folder this old belongs to a process that died


class HostCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def entry(self, kind: str, digest: str) -> Path:
        return self.root / kind / digest

    def archive(self, digest: str) -> Path:
        return self.root / PACKAGES / f"{digest}.zip"

    def temporary(self, kind: str, digest: str) -> Path:
        """A fresh folder beside the entry, renamed into place once complete."""
        return self.root / kind / f"{digest}{_TEMPORARY_MARK}{os.getpid()}-{time.monotonic_ns()}"

    @contextlib.contextmanager
    def locked(self, kind: str, digest: str) -> Iterator[Path]:
        """Hold the entry's lock (blocking; call it off the event loop), and mark it used."""
        folder = self.root / kind
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{digest}.lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.touch(kind, digest)
                yield self.entry(kind, digest)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def touch(self, kind: str, digest: str) -> None:
        marker = self.root / kind / f"{digest}.used"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()

    def prune(self, max_idle_s: float) -> list[str]:
        """Remove the entries unused for `max_idle_s` whose lock is free, and temporary folders
        abandoned by dead processes. Returns what it removed."""
        removed: list[str] = []
        now = time.time()
        for kind in (PACKAGES, VENVS):
            folder = self.root / kind
            if not folder.is_dir():
                continue
            for marker in folder.glob("*.used"):
                digest = marker.name.removesuffix(".used")
                try:
                    idle = now - marker.stat().st_mtime
                except FileNotFoundError:
                    continue
                if idle > max_idle_s and self._remove_if_free(kind, digest):
                    removed.append(f"{kind}/{digest}")
            for leftover in folder.glob(f"*{_TEMPORARY_MARK}*"):
                with contextlib.suppress(FileNotFoundError):
                    if now - leftover.stat().st_mtime > _ABANDONED_S:
                        shutil.rmtree(leftover, ignore_errors=True)
        if removed:
            log.info("pruned %d unused runtime_env cache entries from %s", len(removed),
                     self.root)
        return removed

    def _remove_if_free(self, kind: str, digest: str) -> bool:
        folder = self.root / kind
        with open(folder / f"{digest}.lock", "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # being fetched, built or used right now
            try:
                shutil.rmtree(self.entry(kind, digest), ignore_errors=True)
                if kind == PACKAGES:
                    self.archive(digest).unlink(missing_ok=True)
                (folder / f"{digest}.used").unlink(missing_ok=True)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return True
