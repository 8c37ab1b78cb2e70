"""Pieces of process lifecycle shared by the controller, worker nodes, proxies and replicas."""

from __future__ import annotations

import asyncio
import ctypes
import logging
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
    except asyncio.TimeoutError:
        pass


async def heartbeat_loop(beat: Callable[[], Awaitable[None]], interval_s: float,
                         stopping: asyncio.Event) -> None:
    """Call `beat` every `interval_s` until stopping. A failed beat is a warning, not an exit:
    serving goes on while Redis is away."""
    while not stopping.is_set():
        try:
            await beat()
        except Exception as exc:
            log.warning("heartbeat failed: %s", exc)
        await sleep_or_stop(stopping, interval_s)


def die_with_parent() -> None:
    """Run in the child before exec: get SIGTERM when the parent dies (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
