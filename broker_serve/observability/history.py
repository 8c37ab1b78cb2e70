"""The metrics history the cluster keeps in Redis (docs/architecture.md, "Metrics history and
`serve.stat`"; the format in docs/protocol.md, "Metrics history").

- `HistoryWriter`: each proxy and replica appends, every interval, what its own latency
  histograms gained since its last write: one Redis call per process and interval, nothing
  per request.
- `read_windows`: the history's histograms per endpoint and per deployment over windows
  ending now, for `serve.stat` and `broker-serve stats`.
- `Histogram`: bucket counts and their percentiles, as Prometheus' `histogram_quantile`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from ..exceptions import BrokerServeError
from ..lifecycle import sleep_or_stop
from ..settings import Settings
from ..state.store import Store
from .metrics import LATENCY_BUCKETS

log = logging.getLogger("broker_serve.history")

Table = Literal["endpoints", "backends"]
TABLES: tuple[Table, ...] = ("endpoints", "backends")
# (endpoint, application) in `endpoints`, (application, deployment) in `backends`.
Key = tuple[str, str]
# A process's cumulative histograms: per key, the count in each bucket and the sum of seconds.
Totals = dict[Key, tuple[list[int], float]]


@dataclass
class Histogram:
    """Cumulative bucket counts by upper bound, as in the exposition."""

    buckets: dict[float, float] = field(default_factory=dict)

    @classmethod
    def of_counts(cls, counts: dict[float, float]) -> Histogram:
        """From the count in each bucket (by upper bound, `inf` the last)."""
        total, buckets = 0.0, {}
        for bound in sorted(counts):
            total += counts[bound]
            buckets[bound] = total
        buckets.setdefault(float("inf"), total)
        return cls(buckets)

    def minus(self, earlier: Histogram | None) -> Histogram:
        if earlier is None:
            return self
        delta = {le: count - earlier.buckets.get(le, 0.0) for le, count in self.buckets.items()}
        if any(value < 0 for value in delta.values()):  # the process restarted in between
            return self
        return Histogram(delta)

    def add(self, other: Histogram) -> None:
        """Merge `other` in, also where the two have different bounds."""
        bounds = self.buckets.keys() | other.buckets.keys()
        self.buckets = {le: self._at(le) + other._at(le) for le in sorted(bounds)}

    def _at(self, le: float) -> float:
        """How many are at most `le`, as far as these buckets tell."""
        below = [bound for bound in self.buckets if bound <= le]
        return self.buckets[max(below)] if below else 0.0

    @property
    def count(self) -> float:
        return self.buckets.get(float("inf"), 0.0)

    def quantile(self, q: float) -> float | None:
        """Linear interpolation inside the bucket holding the rank, as histogram_quantile."""
        total = self.count
        if total <= 0:
            return None
        rank = q * total
        lower, below = 0.0, 0.0
        for le in sorted(self.buckets):
            count = self.buckets[le]
            if count >= rank and count > 0:  # > 0: the 0th percentile is in the first one used
                if le == float("inf"):
                    return lower
                inside = count - below
                return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = le, count
        return lower


# writing ---------------------------------------------------------------------------------------
class HistoryWriter:
    """Writes one process's rows of `table`: every interval, what `totals` (cumulative, read
    from the process's own metrics) gained since the last write that reached Redis. So a
    failed write is carried by the next one, and nothing is counted twice."""

    def __init__(self, store: Store, settings: Settings, process: str, table: Table,
                 totals: Callable[[], Totals],
                 key_of: Callable[[Key], Key | None] = lambda key: key) -> None:
        self.store = store
        self.process = process
        self.table = table
        self.interval_s = settings.history_interval_s
        self.default_window_s = settings.history_window_s
        self._totals = totals
        self._key_of = key_of  # None: not recorded
        self._written: Totals = {}
        self._failing = False
        self._writing = asyncio.Lock()  # one write at a time: each diffs the last one

    async def run(self, stopping: asyncio.Event) -> None:
        """Write every interval until `stopping`. The process writes its last interval itself
        (`write`) once its requests are done, so that it counts them too."""
        while self.interval_s > 0 and not stopping.is_set():
            await sleep_or_stop(stopping, self.interval_s)
            if not stopping.is_set():
                # Cancelled mid-write, the write still ends (and says what it wrote), so the
                # process's last write does not count its interval again.
                await asyncio.shield(self.write())

    async def write(self) -> None:
        async with self._writing:
            await self._write()

    async def _write(self) -> None:
        if self.interval_s <= 0:
            return
        totals = self._totals()
        rows = self._gained(totals)
        if rows:
            try:
                await self.store.append_history(self._entry(rows), self.default_window_s)
            except BrokerServeError as exc:  # kept for the next write; serving goes on
                if not self._failing:
                    log.warning("could not write the metrics history: %s", exc)
                self._failing = True
                return
        if self._failing:
            log.info("writing the metrics history again")
            self._failing = False
        self._written = totals

    def _gained(self, totals: Totals) -> dict[Key, tuple[list[int], float]]:
        rows: dict[Key, tuple[list[int], float]] = {}
        for key, (counts, seconds) in totals.items():
            before = self._written.get(key)
            if before is not None:
                counts = [now - then for now, then in zip(counts, before[0])]
                seconds -= before[1]
            row_key = self._key_of(key)
            if row_key is None or not any(counts):
                continue
            if row_key in rows:  # two keys of the process's own, one row (a renamed route)
                earlier, earlier_seconds = rows[row_key]
                counts = [a + b for a, b in zip(earlier, counts)]
                seconds += earlier_seconds
            rows[row_key] = (counts, seconds)
        return rows

    def _entry(self, rows: dict[Key, tuple[list[int], float]]) -> bytes:
        return orjson.dumps({
            "process": self.process,
            "interval_s": self.interval_s,
            "bounds": LATENCY_BUCKETS,
            self.table: [[first, second, _without_trailing_zeros(counts), seconds]
                         for (first, second), (counts, seconds) in rows.items()],
        })


def _without_trailing_zeros(counts: list[int]) -> list[int]:
    end = len(counts)
    while end and not counts[end - 1]:
        end -= 1
    return counts[:end]


# reading ---------------------------------------------------------------------------------------
@dataclass
class HistoryWindows:
    """The history's histograms over windows ending at Redis' `now_ms`."""

    window_s: float  # the history window
    recorded_s: float  # how far back the history goes: at most `window_s`
    # per window: per table, per key, the histogram
    windows: dict[float, dict[Table, dict[Key, Histogram]]]


class WindowTooLong(ValueError):
    """A window longer than the history window was asked for: 0.8 refused it too."""


def check_windows(windows: Iterable[float], history_window_s: float) -> None:
    longest = max(windows)
    if longest > history_window_s:
        raise WindowTooLong(
            f"aggregation window {longest:g} s is longer than the history window of "
            f"{history_window_s:g} s (gc_window_seconds): ask for a shorter window, or keep "
            "more history with set_history_window()")


async def read_windows(store: Store, windows: list[float], default_window_s: float
                       ) -> HistoryWindows:
    """Every endpoint and deployment of the longest window, in each of `windows`. Raises
    WindowTooLong (a ValueError) for a window longer than the history window."""
    read = await store.history(max(windows), default_window_s)
    check_windows(windows, read.window_s)
    counts: dict[float, dict[Table, dict[Key, dict[float, float]]]] = {
        window: {table: {} for table in TABLES} for window in windows}
    for at_ms, data in read.entries:
        age_ms = read.now_ms - at_ms
        inside = [counts[w] for w in windows if age_ms < w * 1000]
        for table, key, buckets in _rows(orjson.loads(data)):
            for window in inside:
                into = window[table].setdefault(key, {})
                for bound, count in buckets:
                    into[bound] = into.get(bound, 0.0) + count
    seen = {table: {key for window in counts.values() for key in window[table]}
            for table in TABLES}
    recorded_s = 0.0
    if read.since_ms is not None:
        recorded_s = min(read.window_s, max(0.0, (read.now_ms - read.since_ms) / 1000))
    return HistoryWindows(read.window_s, recorded_s, {
        window: {table: {key: Histogram.of_counts(by_table[table].get(key, {}))
                         for key in sorted(seen[table])} for table in TABLES}
        for window, by_table in counts.items()})


def _rows(entry: dict[str, Any]) -> Iterable[tuple[Table, Key, list[tuple[float, int]]]]:
    """An entry's rows: table, key, and (upper bound, count) of each bucket."""
    bounds = [*(float(b) for b in entry.get("bounds", LATENCY_BUCKETS)), float("inf")]
    for table in TABLES:
        for first, second, counts, _ in entry.get(table, ()):
            yield table, (str(first), str(second)), list(zip(bounds, counts))
