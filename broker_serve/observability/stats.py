"""`broker-serve stats`: latency percentiles per deployment and per endpoint over windows.

By default the command reads the metrics history the cluster keeps in Redis (`history.py`), so
every window is full at once, up to the history window; only the queue depth is read from the
controller's `/metrics`. A window longer than the history recorded so far is marked `*`.

Given `--url`s, it reads those Prometheus endpoints itself instead (worker nodes' `/metrics`,
proxies' `/-/metrics`, the controller's `/metrics`). It samples them every `interval` seconds
and keeps the samples, so a window's percentiles come from the difference of the histogram
buckets between the newest sample and the one a window earlier, as Prometheus'
`histogram_quantile` over `rate()` does. Until the command has run for a window's length, that
window covers only the time since its first sample (marked `*`).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from ..settings import Settings
from ..state.records import NodeRecord, ProxyRecord
from ..state.store import Store
from .history import Histogram, HistoryWindows, WindowTooLong, read_windows

__all__ = ["Histogram", "WindowTooLong", "discover", "read", "render", "run", "run_history"]

QUANTILES = (0.5, 0.9, 0.95)
FETCH_TIMEOUT_S = 3.0
_WILDCARDS = ("", "0.0.0.0", "::", "[::]")

Key = tuple[str, str]  # (application, deployment) or (application, route)


@dataclass
class Sample:
    """One reading of every endpoint: histograms per (endpoint, table, key, series)."""

    at: float
    histograms: dict[tuple[str, str, Key, tuple[Any, ...]], Histogram]
    queued: dict[Key, float]
    unreachable: list[str]


# endpoints --------------------------------------------------------------------------------------
async def _records(settings: Settings) -> tuple[dict[str, ProxyRecord], dict[str, NodeRecord]]:
    store = Store(settings.redis_url, settings.cluster, settings.client_tls())
    try:
        return await store.proxies(), await store.nodes()
    finally:
        await store.close()


def discover(settings: Settings) -> list[str]:
    """The cluster's endpoints, from the proxy and worker node records in Redis."""
    proxies, nodes = asyncio.run(_records(settings))
    urls = []
    scheme = settings.server_tls().scheme  # the proxies' and the REST API's
    for proxy in proxies.values():
        host = _reachable(proxy.get("host"), proxy.get("hostname"))
        urls.append(f"{scheme}://{host}:{proxy['port']}/-/metrics")
    for record in nodes.values():
        if record.get("metrics_port"):
            host = _reachable(None, record.get("host"))
            urls.append(f"http://{host}:{record['metrics_port']}/metrics")
    urls.append(controller_url(settings))
    return sorted(set(urls))


def controller_url(settings: Settings) -> str:
    host = _reachable(settings.dashboard_host, socket.gethostname())
    return f"{settings.server_tls().scheme}://{host}:{settings.dashboard_port}/metrics"


def _reachable(bound: str | None, hostname: str | None) -> str:
    """Where to connect to a server bound to `bound` on the host called `hostname`."""
    if bound and bound not in _WILDCARDS:
        return f"[{bound}]" if ":" in bound else bound
    if not hostname or hostname == socket.gethostname():
        return "127.0.0.1"
    return hostname


def _fetch(url: str, verify: str | bool = True) -> str | None:
    try:
        answer = requests.get(url, timeout=FETCH_TIMEOUT_S, verify=verify)
    except requests.RequestException:
        return None
    return answer.text if answer.status_code == 200 else None


def read(urls: Iterable[str], verify: str | bool = True) -> Sample:
    """`verify`: the CA file HTTPS endpoints are checked with (ClientTls.verify)."""
    urls = list(urls)
    at = time.monotonic()
    with ThreadPoolExecutor(max(1, min(16, len(urls)))) as pool:
        texts = list(pool.map(lambda url: _fetch(url, verify), urls))
    sample = Sample(at, {}, {}, [])
    for url, text in zip(urls, texts):
        if text is None:
            sample.unreachable.append(url)
        else:
            _parse(url, text, sample)
    return sample


def _parse(url: str, text: str, sample: Sample) -> None:
    for family in text_string_to_metric_families(text):
        if family.name == "broker_serve_controller_queue_depth":
            for s in family.samples:
                key = (s.labels["application"], s.labels["deployment"])
                sample.queued[key] = max(sample.queued.get(key, 0.0), s.value)
            continue
        table = _TABLES.get(family.name)
        if table is None:
            continue
        for s in family.samples:
            if not s.name.endswith("_bucket") or s.labels.get("method") == "websocket":
                continue
            labels = dict(s.labels)
            le = float(labels.pop("le"))
            key = (labels.get("application", ""),
                   labels.get("deployment", labels.get("route", "")))
            series = (url, table, key, tuple(sorted(labels.items())))
            sample.histograms.setdefault(series, Histogram()).buckets[le] = s.value


# Histogram families shown, and the table each goes to.
_TABLES = {
    "broker_serve_replica_processing_seconds": "deployments",
    "broker_serve_proxy_request_duration_seconds": "routes",
}


# windows ----------------------------------------------------------------------------------------
@dataclass
class Row:
    key: Key
    window: float
    covered: float
    requests: float
    quantiles: list[float | None]


def window_rows(samples: list[Sample], table: str, window: float) -> list[Row]:
    """Per key of `table`: requests and percentiles between the newest sample and the newest
    one at least `window` older (or the oldest there is)."""
    newest = samples[-1]
    base = next((s for s in reversed(samples[:-1]) if newest.at - s.at >= window - 1e-6),
                samples[0])
    totals: dict[Key, Histogram] = {}
    for series, histogram in newest.histograms.items():
        if series[1] != table:
            continue
        delta = histogram.minus(base.histograms.get(series))
        totals.setdefault(series[2], Histogram()).add(delta)
    covered = newest.at - base.at
    return [Row(key, window, covered, h.count, [h.quantile(q) for q in QUANTILES])
            for key, h in sorted(totals.items())]


def render(samples: list[Sample], windows: list[float]) -> str:
    """The tables of the scraped samples."""
    tables = {table: [row for window in windows for row in window_rows(samples, table, window)]
              for table in ("deployments", "routes")}
    return _render(tables, samples[-1], "the command has run for less than that window")


def history_rows(view: HistoryWindows) -> dict[str, list[Row]]:
    """The tables of the cluster's history: `deployments`, and `routes` by endpoint (the
    route's traffic name, or its prefix)."""
    tables: dict[str, list[Row]] = {"deployments": [], "routes": []}
    for window, by_table in view.windows.items():
        covered = min(window, view.recorded_s)
        for (application, deployment), h in by_table["backends"].items():
            tables["deployments"].append(Row((application, deployment), window, covered,
                                             h.count, [h.quantile(q) for q in QUANTILES]))
        for (endpoint, application), h in by_table["endpoints"].items():
            tables["routes"].append(Row((application, endpoint), window, covered, h.count,
                                        [h.quantile(q) for q in QUANTILES]))
    return tables


def render_history(view: HistoryWindows, controller: Sample) -> str:
    """The tables of the history; queue depths from the controller's scraped `controller`."""
    return _render(history_rows(view), controller,
                   f"the cluster's history goes back less than that window "
                   f"({view.recorded_s:.0f} s of at most {view.window_s:g} s)")


def _render(tables: dict[str, list[Row]], newest: Sample, partial_means: str) -> str:
    lines = [(f"broker-serve stats at {time.strftime('%H:%M:%S')}: percentiles in ms; * = "
              f"{partial_means}")]
    if newest.unreachable:
        lines.append("unreachable: " + ", ".join(newest.unreachable))
    for table, title, second in (("deployments", "Processing time per deployment (replicas)",
                                  "deployment"),
                                 ("routes", "Latency per route (proxies, end to end)", "route")):
        rows = sorted(tables[table], key=lambda r: (r.key, r.window))
        header = ["application", second, "window", "requests", "req/s", "p50", "p90", "p95"]
        if table == "deployments":
            header.append("queued")
        body = []
        for row in rows:
            partial = row.covered + 1e-6 < row.window
            cells = [row.key[0], row.key[1], f"{row.window:g}s{'*' if partial else ''}",
                     f"{row.requests:.0f}",
                     f"{row.requests / row.covered:.1f}" if row.covered > 0 else "-",
                     *(f"{q * 1000:.2f}" if q is not None else "-" for q in row.quantiles)]
            if table == "deployments":
                queued = newest.queued.get(row.key)
                cells.append(f"{queued:.0f}" if queued is not None else "-")
            body.append(cells)
        lines += ["", title, *(_table(header, body) if body else ["(no requests seen)"])]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cells[i]) for cells in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) if i < 3 else cell.rjust(width)
                      for i, (cell, width) in enumerate(zip(cells, widths))).rstrip()
            for cells in [header, *rows]]


def run(settings: Settings, urls: list[str], interval: float, windows: list[float],
        count: int | None, echo: Callable[[str], None]) -> None:
    """Sample every `interval` seconds and print the tables, `count` times (or forever)."""
    history: deque[Sample] = deque()
    keep = max(windows) + 2 * interval
    printed = 0
    while count is None or printed < count:
        history.append(read(urls or discover(settings), settings.client_tls().verify()))
        while len(history) > 2 and history[-1].at - history[1].at >= keep:
            history.popleft()
        if len(history) > 1:
            echo(render(list(history), windows) + "\n")
            printed += 1
        if count is None or printed < count:
            time.sleep(max(0.0, interval - (time.monotonic() - history[-1].at)))


def run_history(settings: Settings, interval: float, windows: list[float], count: int | None,
                echo: Callable[[str], None]) -> None:
    """Print the tables of the cluster's history every `interval` seconds, `count` times (or
    forever). Raises WindowTooLong for a window longer than the history window."""
    asyncio.run(_history_tables(settings, interval, windows, count, echo))


async def _history_tables(settings: Settings, interval: float, windows: list[float],
                          count: int | None, echo: Callable[[str], None]) -> None:
    store = Store(settings.redis_url, settings.cluster, settings.client_tls())
    try:
        printed = 0
        while count is None or printed < count:
            started = time.monotonic()
            view = await read_windows(store, windows, settings.history_window_s)
            controller = await asyncio.to_thread(read, [controller_url(settings)],
                                                 settings.client_tls().verify())
            echo(render_history(view, controller) + "\n")
            printed += 1
            if count is None or printed < count:
                await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
    finally:
        await store.close()
