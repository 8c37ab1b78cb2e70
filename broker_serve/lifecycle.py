"""Pieces of process lifecycle shared by the controller, worker nodes, proxies and replicas."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger("broker_serve")


def stop_on_signals(stopping: asyncio.Event) -> None:
    """SIGTERM or SIGINT sets `stopping`; the process then drains and exits."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)


async def sleep_or_stop(stopping: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except TimeoutError:
        pass


async def heartbeat_loop(beat: Callable[[], Awaitable[None]], interval_s: float,
                         stopping: asyncio.Event) -> None:
    """Call `beat` every `interval_s` until stopping. A failed beat is a warning, not an exit:
    serving goes on while Redis is away."""
    while not stopping.is_set():
        try:
            await beat()
        except Exception as exc:  # noqa: BLE001 - a failed beat must not stop serving
            log.warning("heartbeat failed: %s", exc)
        await sleep_or_stop(stopping, interval_s)


# Set by a parent for a child that must not outlive it: the parent's pid.
PARENT_PID_ENV = "BROKER_SERVE_DIE_WITH_PARENT"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent_env() -> dict[str, str]:
    """The environment of a child process that `die_with_parent_if_asked` ties to this one."""
    return {PARENT_PID_ENV: str(os.getpid())}


def die_with_parent_if_asked() -> None:
    """First thing in a process's main, while it has one thread: if its parent asked
    (`die_with_parent_env`), get SIGTERM when the parent dies (Linux only). A parent that died
    before this ran is gone already, so the process exits."""
    parent = os.environ.pop(PARENT_PID_ENV, None)  # not inherited by this one's children
    if parent is None:
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux
        return
    if os.getppid() != int(parent):  # reparented: the signal will never come
        raise SystemExit(f"exiting: the parent process {parent} exited before this one started")
