"""The rows the harness measures and what it reports of them: the final table with each
figure's errors, the whole run's totals, the targets, and the JSON."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import REQUEST_KINDS, Errors

SOCKET_KINDS = ("connect", "read", "write", "timeout")


@dataclass
class Row:
    name: str
    value: float
    unit: str
    ratio_to: str | None = None  # the ceiling row this row is compared with
    errors: Errors = field(default_factory=Errors)
    details: dict[str, Any] = field(default_factory=dict)
    measurement: str = ""  # set when the harness adds the row


@dataclass(frozen=True)
class Target:
    label: str
    row: str
    bound: float
    at_least: bool  # a floor (throughput) rather than a ceiling (latency)
    of_ceiling: bool = False  # the bound is on the ratio to the same run's ceiling

    def describe(self) -> str:
        unit = "x ceiling" if self.of_ceiling else " ms"
        return f"{'>=' if self.at_least else '<='} {self.bound:g}{unit}"


# The targets. "p50 at 1 connection" is checked for both no-op deployments.
TARGETS = (
    Target("sync no-op req/s, 32 connections", "noop_sync_rps_c32", 0.15, True, True),
    Target("sync no-op p50, 1 connection", "noop_sync_latency_c1_p50", 0.8, False),
    Target("async no-op p50, 1 connection", "noop_latency_c1_p50", 0.8, False),
    Target("handle call p50", "handle_call_p50", 0.5, False),
)


def ratio(rows: dict[str, Row], row: Row) -> float | None:
    if row.ratio_to is None or row.ratio_to not in rows:
        return None
    base = rows[row.ratio_to].value
    return row.value / base if base else None


def fmt(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value)}"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) >= 10:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _columns(header: tuple[str, ...], lines: Sequence[tuple[str, ...]],
             right: set[int]) -> list[str]:
    widths = [max(len(line[i]) for line in [header, *lines]) for i in range(len(header))]

    def one(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return [one(header), rule, *(one(line) for line in lines), rule]


def table(rows: dict[str, Row]) -> str:
    header = ("measurement", "value", "unit", "ratio to ceiling", "errors", "valid")
    lines = []
    for row in rows.values():
        r = ratio(rows, row)
        lines.append((row.name, fmt(row.value), row.unit, "" if r is None else f"{r:.3f}x",
                      row.errors.summary(), "yes" if row.errors.valid else "NO"))
    note = ("ratio = value / the ceiling's value: throughput below 1x and latency above 1x are "
            "slower than plain uvicorn + Starlette. A figure is a result (valid) only if its "
            "run had no error of any kind and every count could be read.")
    return "\n".join([*_columns(header, lines, {1, 3}), note])


# totals ---------------------------------------------------------------------------------------
def _count(total: Errors, *kinds: str) -> int | None:
    """The sum of `kinds`, or None if one of them was not counted somewhere."""
    if any(kind in total.unknown for kind in kinds):
        return None
    return sum(total.counts.get(kind, 0) for kind in kinds)


def totals_json(total: Errors, rows: dict[str, Row]) -> dict[str, Any]:
    return {
        "errors": _count(total, *REQUEST_KINDS),
        "non_2xx": _count(total, "non_2xx"),
        "non_ok": _count(total, "non_ok"),
        "socket_errors": _count(total, *SOCKET_KINDS),
        "unanswered": _count(total, "unanswered"),
        "failed": _count(total, "failed"),
        "redeliveries": _count(total, "redelivered"),
        "channel_closes": _count(total, "broker_log", "channels_lost"),
        "broker_log": _count(total, "broker_log"),
        "channels_lost": _count(total, "channels_lost"),
        "dead_letters": _count(total, "dead_lettered"),
        "not_counted": dict(total.unknown),
        "figures": len(rows),
        "results": sum(row.errors.valid for row in rows.values()),
    }


def totals_text(totals: dict[str, Any]) -> str:
    def n(key: str) -> str:
        return "?" if totals[key] is None else str(totals[key])

    line = (f"totals: errors {n('errors')} (non-2xx {n('non_2xx')}, non-OK gRPC "
            f"{n('non_ok')}, socket "
            f"{n('socket_errors')}, unanswered {n('unanswered')}, failed {n('failed')}), "
            f"redeliveries {n('redeliveries')}, channel closes {n('channel_closes')} "
            f"(RabbitMQ log {n('broker_log')}, replica channels lost {n('channels_lost')}), "
            f"dead letters {n('dead_letters')}; {totals['results']} of {totals['figures']} "
            "figures are results")
    why = [f"  not counted: {kind}: {reason}" for kind, reason in totals["not_counted"].items()]
    return "\n".join([line, *why])


# targets --------------------------------------------------------------------------------------
def evaluate(rows: dict[str, Row], target: Target) -> dict[str, Any]:
    row = rows.get(target.row)
    verdict: dict[str, Any] = {"target": target.label, "row": target.row,
                               "bound": target.describe(), "value": None, "met": None}
    if row is None:
        return {**verdict, "status": "not measured"}
    value = row.value
    shown = f"{fmt(row.value)} {row.unit}"
    if target.of_ceiling:
        of_ceiling = ratio(rows, row)
        if of_ceiling is None:
            return {**verdict, "status": "no ceiling in this run", "shown": shown}
        value = of_ceiling
        shown = f"{value:.3f}x ({fmt(row.value)} of {fmt(rows[row.ratio_to or ''].value)} req/s)"
    verdict.update(value=value, shown=shown)
    if not row.errors.valid:
        return {**verdict, "status": f"not a result ({row.errors.summary()})"}
    met = value >= target.bound if target.at_least else value <= target.bound
    return {**verdict, "met": met, "status": "met" if met else "missed"}


def targets_text(verdicts: list[dict[str, Any]], smoke: bool) -> str:
    lines = [(str(v["target"]), str(v["bound"]), str(v.get("shown", "")), str(v["status"]))
             for v in verdicts]
    title = "targets (ratios against this run's ceiling)"
    if smoke:
        title += ": a smoke run is too brief to be compared with them"
    return "\n".join([title + ":", *_columns(("target", "bound", "value", "status"), lines,
                                             set())[:-1]])
