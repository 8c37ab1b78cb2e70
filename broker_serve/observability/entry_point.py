"""The catch-all of each long-running process (controller, worker node, proxy, replica).

Whatever a process's main coroutine lets out is logged once through the process's own log
handler and the process exits 1, instead of dying with a bare traceback on stderr.
`asyncio.run` cancels and awaits the tasks still running first, so nothing is left pending.
Last, the spans still buffered are exported (`tracing.shutdown`).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn

from ..exceptions import BrokerServeError
from . import tracing

log = logging.getLogger("broker_serve.process")


def run_entry_point(main: Coroutine[Any, Any, int | None], role: str) -> NoReturn:
    """Run `main` and exit with its code (None: 0). `role` names the process in the log."""
    try:
        code = asyncio.run(main)
    except BrokerServeError as exc:  # expected trouble, e.g. RabbitMQ or Redis unreachable
        log.error("%s stopped: %s", role, exc)
        log.debug("%s stopped by", role, exc_info=exc)
        sys.exit(1)
    except Exception:  # the process's boundary: a bug, so its traceback is logged
        log.exception("%s failed", role)
        sys.exit(1)
    finally:
        tracing.shutdown()
    sys.exit(code or 0)
