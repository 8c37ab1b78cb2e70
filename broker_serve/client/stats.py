"""`serve.stat()` and the history window: Ray Serve 0.8's metric statistics, read from the
history the cluster keeps in Redis (docs/architecture.md, "Metrics history and `serve.stat`").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real
from typing import Any

from ..observability.history import Histogram, HistoryWindows, read_windows
from .runtime import current_runtime, get_runtime

DEFAULT_PERCENTILES = (50, 90, 95)
DEFAULT_WINDOWS_S = (10, 60, 300, 600, 3600)


def stat(percentiles: Iterable[float] = DEFAULT_PERCENTILES,
         agg_windows_seconds: Iterable[float] = DEFAULT_WINDOWS_S) -> dict[str, Any]:
    """Request counts and latency percentiles (ms) per endpoint and per backend over each
    window, as 0.8's `serve.stat`. The longest window must not be longer than the history
    window (`gc_window_seconds`); otherwise ValueError.

    Returns `{"history_window_s", "recorded_s", "endpoints": {endpoint: {window: entry}},
    "backends": {application: {deployment: {window: entry}}}}`, each entry
    `{"count": int, "latency_ms": {percentile: float or None}}`.
    """
    wanted = _numbers("percentiles", percentiles)
    if not all(0 <= p <= 100 for p in wanted):
        raise ValueError(f"percentiles must be between 0 and 100, got {list(wanted)}")
    windows = _numbers("agg_windows_seconds", agg_windows_seconds)
    if not all(w > 0 for w in windows):
        raise ValueError(f"agg_windows_seconds must be positive, got {list(windows)}")
    runtime = current_runtime() or get_runtime()
    view = runtime.run_sync(read_windows(runtime.store, list(windows),
                                         runtime.settings.history_window_s))
    return _shaped(view, wanted)


def set_history_window(seconds: float) -> None:
    """Keep this many seconds of metrics history, cluster-wide (0.8's `gc_window_seconds`).
    Applies at once: a shorter window drops the older history now."""
    (window,) = _numbers("seconds", [seconds])
    if window <= 0:
        raise ValueError(f"the history window must be positive, got {seconds!r}")
    runtime = current_runtime() or get_runtime()
    runtime.run_sync(runtime.store.set_history_window(window))


def _numbers(name: str, values: Iterable[float]) -> tuple[float, ...]:
    """`values` in order, without repeats; each a finite real number."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a list of numbers, got {values!r}")
    numbers = tuple(dict.fromkeys(values))
    if not numbers:
        raise ValueError(f"{name} must not be empty")
    for value in numbers:
        if isinstance(value, bool) or not isinstance(value, Real) or \
                not math.isfinite(value):
            raise TypeError(f"{name} must be finite numbers, got {value!r}")
    return numbers


def _shaped(view: HistoryWindows, percentiles: tuple[float, ...]) -> dict[str, Any]:
    endpoints: dict[str, dict[float, Any]] = {}
    backends: dict[str, dict[str, dict[float, Any]]] = {}
    for window, tables in view.windows.items():
        merged: dict[str, Histogram] = {}  # an endpoint's rows of every application
        for (endpoint, _application), histogram in tables["endpoints"].items():
            merged.setdefault(endpoint, Histogram()).add(histogram)
        for endpoint, histogram in merged.items():
            endpoints.setdefault(endpoint, {})[window] = _entry(histogram, percentiles)
        for (application, deployment), histogram in tables["backends"].items():
            backends.setdefault(application, {}).setdefault(deployment, {})[window] = \
                _entry(histogram, percentiles)
    return {"history_window_s": view.window_s, "recorded_s": round(view.recorded_s, 3),
            "endpoints": endpoints, "backends": backends}


def _entry(histogram: Histogram, percentiles: tuple[float, ...]) -> dict[str, Any]:
    latency = {}
    for p in percentiles:
        seconds = histogram.quantile(p / 100)
        latency[p] = None if seconds is None else seconds * 1000
    return {"count": int(histogram.count), "latency_ms": latency}
