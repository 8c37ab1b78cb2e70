"""Error accounting: everything that went wrong while a figure was measured.

A figure is a result only if its measurement saw no error of any kind, and every count could be
read. The kinds, and where each count comes from (bench/README.md, "Errors"):

- `non_2xx`, `connect`, `read`, `write`, `timeout`: wrk's own counts (bench/wrk.py);
- `non_ok`: gRPC calls answered with a status other than OK (DEADLINE_EXCEEDED counts as a
  `timeout`), as the gRPC load generator counts them (bench/grpc_load.py);
- `unanswered`: requests the proxy still had in flight a few seconds after a wrk run ended
  (`broker_serve_proxy_inflight_requests`). wrk counts a timeout only when a late answer
  arrives, so a request never answered would show nowhere else;
- `failed`: calls and requests of the harness's own clients that raised or answered wrongly;
- `redelivered`: the sum of `broker_serve_replica_redeliveries_total` on the worker node's
  `/metrics`, after the measurement minus before;
- `channels_lost`: the same for `broker_serve_replica_channels_lost_total`;
- `broker_log`: channel and connection errors RabbitMQ logged for this cluster's connections
  (tests/broker_log.py);
- `dead_lettered`: the growth of the cluster's dead-letter queue `bs.<cluster>.dead`.
"""

from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.broker_log import BrokerError, BrokerLog, find_log

WRK_KINDS = ("non_2xx", "connect", "read", "write", "timeout")
CLUSTER_KINDS = ("redelivered", "channels_lost", "broker_log", "dead_lettered")
KINDS = (*WRK_KINDS, "non_ok", "unanswered", "failed", *CLUSTER_KINDS)
REQUEST_KINDS = (*WRK_KINDS, "non_ok", "unanswered", "failed")  # the "errors" of the summary line
MAX_EXAMPLES = 5
MAX_FAILURES = 10  # a measurement stops after this many failed calls: each may wait a timeout

COUNTERS = {
    "redelivered": "broker_serve_replica_redeliveries_total",
    "channels_lost": "broker_serve_replica_channels_lost_total",
}
INFLIGHT = "broker_serve_proxy_inflight_requests"
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{[^}]*\})?\s+(?P<value>\S+)")
# Urllib would honour $http_proxy even for 127.0.0.1: scrapes never go through a proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Errors:
    """The errors of one figure (or of a whole measurement, or run: they add up)."""

    counts: dict[str, int] = field(default_factory=dict)  # kind -> count, per kind counted
    unknown: dict[str, str] = field(default_factory=dict)  # kind -> why it was not counted
    examples: list[str] = field(default_factory=list)  # the first few errors themselves

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def valid(self) -> bool:
        return self.total == 0 and not self.unknown

    def __add__(self, other: Errors) -> Errors:
        counts = dict(self.counts)
        for kind, count in other.counts.items():
            counts[kind] = counts.get(kind, 0) + count
        return Errors(counts, {**self.unknown, **other.unknown},
                      [*self.examples, *other.examples][:MAX_EXAMPLES])

    def summary(self) -> str:
        """`0`, or what went wrong: `timeout 5, redelivered 12`, `broker log ?`."""
        parts = [f"{_label(k)} {self.counts[k]}" for k in KINDS if self.counts.get(k)]
        parts += [f"{_label(k)} ?" for k in KINDS if k in self.unknown]
        return ", ".join(parts) or "0"

    def to_json(self) -> dict[str, Any]:
        return {"errors": {k: self.counts[k] for k in KINDS if k in self.counts},
                "errors_unknown": dict(self.unknown), "error_examples": list(self.examples),
                "valid": self.valid}


def _label(kind: str) -> str:
    return {"non_2xx": "non-2xx", "non_ok": "non-OK"}.get(kind, kind.replace("_", " "))


class Tally:
    """The failed calls of a measurement made of many calls, and the first few of them."""

    def __init__(self) -> None:
        self.failed = 0
        self.examples: list[str] = []

    def fail(self, text: str) -> None:
        self.failed += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(text[:300])

    @property
    def exhausted(self) -> bool:
        return self.failed >= MAX_FAILURES

    def errors(self) -> Errors:
        return Errors({"failed": self.failed}, examples=list(self.examples))


@dataclass(frozen=True)
class Snapshot:
    """The cluster's counts at one moment; a string says why one could not be read."""

    counters: dict[str, int] | str
    dead: int | str


class ClusterProbe:
    """Reads the cluster-side counts before and after each measurement (a window), and keeps
    the RabbitMQ errors of this cluster logged outside any window."""

    def __init__(self, cluster: str, metrics_port: int, amqp_url: str) -> None:
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.amqp_url = amqp_url
        self.dead_queue = f"bs.{cluster}.dead"
        # broker_serve names each connection `broker-serve <cluster> <role> <id>`; the
        # harness's own probe connections use the same prefix, so their errors count too.
        self.ours = f"broker-serve {cluster} "
        self.log, self.log_problem = _open_log()
        self.outside: list[BrokerError] = []
        self.others = 0  # errors of other clients of this broker: not ours, not counted
        self._probes = 0
        self._marker: bytes | None = None  # the last probe connection's name line, if unseen
        self.amqp_problem = ""
        self._offset = self.log.path.stat().st_size if self.log else 0

    @property
    def log_source(self) -> str:
        return str(self.log.path) if self.log else f"not read: {self.log_problem}"

    # windows ----------------------------------------------------------------------------------
    def begin(self) -> Snapshot:
        self.outside += self._log_errors()
        return Snapshot(self._counters(), self._dead_letters())

    def end(self, before: Snapshot) -> Errors:
        after = Snapshot(self._counters(), self._dead_letters())
        return (_counter_delta(before.counters, after.counters)
                + _dead_delta(self.dead_queue, before.dead, after.dead) + self.logged())

    def finish(self) -> None:
        """After the cluster stopped: what RabbitMQ logged since the last window."""
        if self.log is None:
            return
        connection = self._connect()  # only to mark the log
        if connection is not None:
            connection.close()
        self.outside += self._log_errors()

    def unanswered(self, proxy_port: int, settle_s: float = 5.0) -> Errors:
        """Requests the proxy still has in flight once the load stopped; a no-op's last
        requests finish within milliseconds, so wait a little before counting."""
        url = f"http://127.0.0.1:{proxy_port}/-/metrics"
        deadline = time.monotonic() + settle_s
        while True:
            sums = scrape(url, (INFLIGHT,))
            if isinstance(sums, str):
                return Errors(unknown={"unanswered": sums})
            if INFLIGHT not in sums:
                return Errors(unknown={"unanswered": f"{url} has no {INFLIGHT}"})
            if sums[INFLIGHT] <= 0 or time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        count = sums[INFLIGHT]
        if not count:
            return Errors({"unanswered": 0})
        return Errors({"unanswered": count}, examples=[
            f"{count} requests still in flight at the proxy {settle_s:g}s after wrk ended"])

    # the counts -------------------------------------------------------------------------------
    def _counters(self) -> dict[str, int] | str:
        sums = scrape(self.metrics_url, tuple(COUNTERS.values()))
        if isinstance(sums, str):
            return sums
        return {kind: sums[name] for kind, name in COUNTERS.items() if name in sums}

    def _connect(self) -> Any:
        """A short-lived connection named like ours (a long-lived idle one would miss its
        heartbeats); None, with `self.amqp_problem` set, if it cannot be made."""
        try:
            import pika  # type: ignore[import-untyped]
        except ImportError:
            self.amqp_problem = "pika is not installed (it is in the `test` extra)"
            return None
        self._probes += 1
        name = f"{self.ours}bench-probe {self._probes}"
        params = pika.URLParameters(self.amqp_url)
        params.client_properties = {"connection_name": name}
        params.socket_timeout = params.stack_timeout = 10
        try:
            connection = pika.BlockingConnection(params)
        except pika.exceptions.AMQPError as exc:
            self.amqp_problem = f"cannot connect to RabbitMQ: {exc!r}"
            return None
        self._marker = f"has a client-provided name: {name}\n".encode()
        return connection

    def _dead_letters(self) -> int | str:
        connection = self._connect()
        if connection is None:
            return self.amqp_problem
        try:
            frame = connection.channel().queue_declare(self.dead_queue, passive=True)
            return int(frame.method.message_count)
        except Exception as exc:  # noqa: BLE001 - reported as "not counted"
            return f"passive declare of {self.dead_queue} failed: {exc!r}"
        finally:
            if connection.is_open:
                connection.close()

    # RabbitMQ's log ---------------------------------------------------------------------------
    def logged(self) -> Errors:
        """The errors RabbitMQ logged for this cluster's connections since the last read."""
        if self.log is None:
            return Errors(unknown={"broker_log": self.log_problem})
        errors = self._log_errors()
        return Errors({"broker_log": len(errors)}, examples=[str(e) for e in errors])

    def _log_errors(self) -> list[BrokerError]:
        """This cluster's errors logged since the last read; other clients' are only counted."""
        if self.log is None:
            return []
        self._barrier()
        ours = []
        for error in self.log.read():
            if error.connection.startswith(self.ours):
                ours.append(error)
            elif not error.expected:
                self.others += 1
        return ours

    def _barrier(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) until the last probe connection's name line is in the log file.
        RabbitMQ writes its log with a delay: once that line is there, so is everything logged
        before it, so a window's errors are read in that window."""
        marker, self._marker = self._marker, None
        if self.log is None or marker is None:
            return
        deadline = time.monotonic() + timeout_s
        with self.log.path.open("rb") as handle:
            while time.monotonic() < deadline:
                handle.seek(self._offset)
                data = handle.read()
                found = data.find(marker)
                if found >= 0:
                    self._offset += found + len(marker)
                    return
                # Keep a marker's length back: its line may be half written.
                self._offset += max(0, len(data) - len(marker))
                time.sleep(0.05)


def scrape(url: str, names: tuple[str, ...]) -> dict[str, int] | str:
    """The sum over labels of each metric in `names` present at `url` (a Prometheus text
    endpoint on 127.0.0.1), or why it could not be read."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"scrapes only target 127.0.0.1 here, not {url!r}")
    try:
        with _OPENER.open(url, timeout=5) as response:
            text = response.read().decode()
    except (OSError, urllib.error.URLError) as exc:
        return f"cannot read {url}: {exc}"
    sums: dict[str, float] = {}
    for line in text.splitlines():
        sample = _SAMPLE.match(line)
        if sample is not None and sample["name"] in names:
            sums[sample["name"]] = sums.get(sample["name"], 0.0) + float(sample["value"])
    return {name: round(value) for name, value in sums.items()}


def _open_log() -> tuple[BrokerLog | None, str]:
    path = find_log()
    if path is None:
        return None, ("no RabbitMQ log found in /var/log/rabbitmq/ (set "
                      "BROKER_SERVE_TEST_RABBITMQ_LOG to its path)")
    if not path.exists():
        return None, f"no RabbitMQ log at {path}"
    if not os.access(path, os.R_OK):
        return None, f"cannot read RabbitMQ's log {path}"
    return BrokerLog(Path(path)), ""


def _counter_delta(before: dict[str, int] | str, after: dict[str, int] | str) -> Errors:
    if isinstance(before, str) or isinstance(after, str):
        reason = before if isinstance(before, str) else str(after)
        return Errors(unknown=dict.fromkeys(COUNTERS, reason))
    errors = Errors()
    for kind, name in COUNTERS.items():
        # Each replica's counters appear with its first sample; one has run by the end.
        if kind not in after:
            errors.unknown[kind] = f"the worker node's /metrics has no {name}"
        else:
            errors.counts[kind] = after[kind] - before.get(kind, 0)
    return errors


def _dead_delta(queue: str, before: int | str, after: int | str) -> Errors:
    if isinstance(before, str) or isinstance(after, str):
        return Errors(unknown={"dead_lettered": before if isinstance(before, str) else str(after)})
    grew = after - before
    return Errors({"dead_lettered": grew},
                  examples=[f"{grew} messages dead-lettered to {queue}"] if grew else [])
