"""Whether this process traces: decided once, from the standard OTEL_* variables.

Tracing is off unless an exporter is configured: `OTEL_TRACES_EXPORTER` (`otlp`, `console`,
comma-separated) or an OTLP endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`
keep it off. While it is off, `traces` is None and the request path checks only that: no
header is parsed, nothing is allocated, and neither `otel.py` nor OpenTelemetry's tracing
SDK is imported. The spans themselves are in `otel.py` (docs/architecture.md, "Tracing").
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .otel import Traces

log = logging.getLogger("broker_serve.tracing")

# This process's spans, once `setup` turned tracing on; None while it is off.
traces: Traces | None = None
_decided = False
_lock = threading.Lock()


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The exporters the environment asks for; none means tracing is off."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        return [name.strip() for name in named.split(",") if name.strip() not in ("", "none")]
    endpoint = (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    return ["otlp"] if endpoint else []


def setup(role: str, instance_id: str | None = None) -> None:
    """Decide, once per process, whether it traces (role: proxy, replica, driver, ...)."""
    global traces, _decided
    with _lock:
        if _decided:
            return
        _decided = True
        names = exporter_names(os.environ)
        if not names:
            return
        try:
            from .otel import Traces, exporters

            traces = Traces(role, instance_id, exporters(names))
        except ImportError as exc:
            log.warning("OTEL_* ask for traces, but OpenTelemetry is not installed (pip install "
                        "'broker-serve[otel]'): tracing stays off (%s)", exc)
            return
        except ValueError as exc:
            log.warning("tracing stays off: %s", exc)
            return
    atexit.register(shutdown)
    log.info("tracing on: %s exports spans through %s", role, ", ".join(names))


def shutdown() -> None:
    """Export the spans still buffered, and stop tracing (a process's last step)."""
    global traces
    with _lock:
        ending, traces = traces, None
    if ending is not None:
        ending.shutdown()
