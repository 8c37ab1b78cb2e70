"""Prometheus metrics of every process, in one place (docs/architecture.md, "Observability").

- `ProxyMetrics`: each proxy serves its registry at `/-/metrics` on its HTTP port.
- `ReplicaMetrics`: replicas write through prometheus-client's multiprocess mode into a
  directory their worker node owns; `NodeMetricsServer` serves every replica of the node at
  `:9500/metrics` (`BROKER_SERVE_METRICS_PORT`). Their latency histograms travel as counters
  (`CountedHistogram`), turned back into histograms there.
- `ControllerMetrics`: each controller serves its registry at `/metrics` on the REST API's port.

The request path only adds to plain in-process counters (`LocalHistogram`, about 0.1 us an
observation): the proxy's are read when scraped, and a replica's are moved into the
multiprocess files once a second. prometheus-client's own histogram costs about 0.7 us an
observation, and 1.5 us in multiprocess mode, and has no public way to add counts to a bucket.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

log = logging.getLogger("broker_serve.metrics")

# Seconds. Finer than prometheus-client's default at the low end, where a no-op request
# (about 0.5 ms through the proxy) lives, so that percentiles there mean something.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
FLUSH_S = 1.0  # how often a replica's observations reach its node's /metrics


class LocalHistogram:
    """Observations counted in this process, per bucket (bucket i counts values <= bound i,
    the last one the rest), not yet cumulative."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Buckets as an exposition has them: (le, count of values <= le)."""
        total, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            total += count
            buckets.append((floatToGoString(bound), float(total)))  # type: ignore[no-untyped-call]
        return buckets

    def add(self, other: LocalHistogram) -> None:
        for i, count in enumerate(other.counts):
            if count:
                self.counts[i] += count
        self.sum += other.sum

    def totals(self) -> tuple[list[int], float]:
        """A copy of the counts, and the sum: what the metrics history diffs."""
        return list(self.counts), self.sum

    def move_into(self, counted: CountedHistogramChild) -> None:
        """Add the observations to a `CountedHistogram`'s counters and start again."""
        if not any(self.counts):
            return
        for counter, count in zip(counted.buckets, self.counts):
            if count:
                counter.inc(count)
        counted.sum.inc(self.sum)
        self.counts = [0] * len(self.counts)
        self.sum = 0.0


# A histogram in counters -----------------------------------------------------------------------
BUCKETS_SUFFIX = "_bs_bucket_counts"  # per bucket (label `le`), not cumulative
SUM_SUFFIX = "_bs_sum"


class CountedHistogramChild:
    __slots__ = ("buckets", "sum")

    def __init__(self, buckets: list[Any], sum_counter: Any) -> None:
        self.buckets = buckets
        self.sum = sum_counter


class CountedHistogram:
    """A histogram written as two counters, since prometheus-client's `Histogram` takes only
    one observation at a time: the count of observations in each bucket, and their sum.
    `HistogramsOfCounters` reads them back as the histogram `name`. Counters, unlike
    histograms, merge across processes in multiprocess mode by plain sums."""

    def __init__(self, name: str, documentation: str, labelnames: list[str],
                 bounds: tuple[float, ...] = LATENCY_BUCKETS,
                 registry: CollectorRegistry | None = None) -> None:
        self.les = [floatToGoString(bound)  # type: ignore[no-untyped-call]
                    for bound in (*bounds, float("inf"))]
        self._bucket_counts = Counter(name + BUCKETS_SUFFIX, documentation,
                                      [*labelnames, "le"], registry=registry)
        self._sums = Counter(name + SUM_SUFFIX, documentation, labelnames, registry=registry)

    def labels(self, *values: str) -> CountedHistogramChild:
        # Every bucket at once, so that each appears in the exposition from the start.
        return CountedHistogramChild([self._bucket_counts.labels(*values, le) for le in self.les],
                                     self._sums.labels(*values) if values else self._sums)


class _MetricSource(Protocol):
    def collect(self) -> Iterable[Metric]: ...


class HistogramsOfCounters(Collector):
    """The metrics of `source`, with the counters of each `CountedHistogram` turned back into
    its histogram."""

    def __init__(self, source: _MetricSource) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        buckets: dict[str, Metric] = {}
        sums: dict[str, Metric] = {}
        for metric in self.source.collect():
            if metric.name.endswith(BUCKETS_SUFFIX):
                buckets[metric.name.removesuffix(BUCKETS_SUFFIX)] = metric
            elif metric.name.endswith(SUM_SUFFIX):
                sums[metric.name.removesuffix(SUM_SUFFIX)] = metric
            else:
                yield metric
        for name, counts in buckets.items():
            yield _histogram(name, counts, sums.get(name))


def _histogram(name: str, counts: Metric, sums: Metric | None) -> HistogramMetricFamily:
    per_labels: dict[tuple[tuple[str, str], ...], dict[float, tuple[str, float]]] = {}
    for sample in counts.samples:
        if not sample.name.endswith("_total"):  # `_created`
            continue
        labels = dict(sample.labels)
        le = labels.pop("le")
        per_labels.setdefault(tuple(sorted(labels.items())), {})[float(le)] = (le, sample.value)
    total: dict[tuple[tuple[str, str], ...], float] = {}
    for sample in sums.samples if sums is not None else ():
        if sample.name.endswith("_total"):
            total[tuple(sorted(sample.labels.items()))] = sample.value
    labelnames = [label for label, _ in next(iter(per_labels), ())]
    family = HistogramMetricFamily(name, counts.documentation, labels=labelnames)
    for key, by_bound in per_labels.items():
        cumulative, count = [], 0.0
        for _, (le, value) in sorted(by_bound.items()):
            count += value
            cumulative.append((le, count))
        family.add_metric([value for _, value in key], cumulative, total.get(key, 0.0))
    return family


def _process_registry() -> CollectorRegistry:
    """A registry with this process's CPU, memory and Python metrics."""
    # `_created` series only double what Prometheus stores
    disable_created_metrics()  # type: ignore[no-untyped-call]
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


# proxy ------------------------------------------------------------------------------------------
class _RouteStats:
    """The answers of one (application, route) or (application, gRPC method): counts by status
    (an HTTP status, or a gRPC code's name) and the latency histogram."""

    __slots__ = ("latency", "statuses")

    def __init__(self) -> None:
        self.statuses: dict[int | str, int] = {}
        self.latency = LocalHistogram()

    def observe(self, status: int | str, seconds: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.latency.observe(seconds)


def _answer_families(stats: dict[tuple[str, str], _RouteStats], kind: str, what: str,
                     duration_help: str, second_label: str, status_label: str
                     ) -> Iterator[Metric]:
    """A counter of answers by status (`<kind>s`) and a latency histogram
    (`<kind>_duration_seconds`), from per-key stats."""
    answers = CounterMetricFamily(f"{kind}s", what,
                                  labels=["application", second_label, status_label])
    duration = HistogramMetricFamily(f"{kind}_duration_seconds", duration_help,
                                     labels=["application", second_label])
    for (application, second), entry in list(stats.items()):
        for status, count in list(entry.statuses.items()):
            answers.add_metric([application, second, str(status)], count)
        duration.add_metric([application, second], entry.latency.cumulative(), entry.latency.sum)
    yield answers
    yield duration


class ProxyMetrics:
    """The proxy's metrics. Requests are counted in plain dicts and read when scraped; the
    gauges read the proxy's own counters when scraped."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or _process_registry()
        self._routes: dict[tuple[str, str], _RouteStats] = {}
        # gRPC calls, per (application, method path); their statuses are gRPC code names.
        self._grpc: dict[tuple[str, str], _RouteStats] = {}
        self.registry.register(self)  # collect() below
        self._rejections = Counter(
            "broker_serve_proxy_backpressure_rejections_total",
            "Requests answered 503 because the deployment's queue was at max_queued_requests.",
            ["application"], registry=self.registry)
        # Kept apart from the requests above: a shadow copy's response never reaches a client.
        self._shadows = Counter(
            "broker_serve_proxy_shadow_requests_total",
            "Shadow copies of requests (traffic policy), by the shadow application and how "
            "they ended: answered, error, timeout, unsent or skipped.",
            ["application", "outcome"], registry=self.registry)
        # The limits on untrusted input (docs/architecture.md, "Limits"); not per application:
        # most are refused before a route is matched.
        self._refused = Counter(
            "broker_serve_proxy_refused_requests_total",
            "Requests and WebSocket sessions refused at a limit: too_many_headers, "
            "headers_too_large, body_too_large, too_many_inflight, "
            "websocket_message_too_large.",
            ["reason"], registry=self.registry)
        self.inflight = Gauge("broker_serve_proxy_inflight_requests",
                              "HTTP requests in progress.", registry=self.registry)
        self.open_streams = Gauge("broker_serve_proxy_open_streams",
                                  "Responses streaming: started, not yet complete.",
                                  registry=self.registry)
        self.open_websockets = Gauge("broker_serve_proxy_open_websockets",
                                     "WebSocket sessions in progress.", registry=self.registry)

    def observe(self, application: str, route: str, status: int, seconds: float) -> None:
        stats = self._routes.get((application, route))
        if stats is None:
            stats = self._routes[(application, route)] = _RouteStats()
        stats.observe(status, seconds)

    def observe_grpc(self, application: str, method: str, code: str, seconds: float) -> None:
        stats = self._grpc.get((application, method))
        if stats is None:
            stats = self._grpc[(application, method)] = _RouteStats()
        stats.observe(code, seconds)

    def rejected(self, application: str) -> None:
        self._rejections.labels(application).inc()  # rare: the 503 path

    def refused(self, reason: str) -> None:
        self._refused.labels(reason).inc()  # only refused requests pay it

    def shadowed(self, application: str, outcome: str) -> None:
        self._shadows.labels(application, outcome).inc()  # only shadowed requests pay it

    def latency_totals(self) -> dict[tuple[str, str], tuple[list[int], float]]:
        """Per (application, route): the latency histogram so far, for the metrics history."""
        return {key: stats.latency.totals() for key, stats in list(self._routes.items())}

    def collect(self) -> Iterator[Metric]:
        yield from _answer_families(
            self._routes, "broker_serve_proxy_request", "HTTP requests answered by the proxy.",
            "From the request's arrival at the proxy to the end of its response.",
            "route", "status")
        if self._grpc:
            yield from _answer_families(
                self._grpc, "broker_serve_proxy_grpc_request",
                "gRPC calls answered by the proxy.",
                "From the call's arrival at the proxy to its status.", "method", "code")

    def render(self) -> bytes:
        return generate_latest(self.registry)


# replicas ---------------------------------------------------------------------------------------
class ReplicaMetrics:
    """One replica's metrics. Under a worker node they are written to its multiprocess
    directory (`PROMETHEUS_MULTIPROC_DIR`), which the node serves; elsewhere they stay in
    memory, unexported."""

    def __init__(self, application: str, deployment: str, replica_id: str) -> None:
        self.application = application
        self.deployment = deployment
        labels = ["application", "deployment"]
        # registry=None: the values live in the multiprocess files, not in a registry here.
        self._processing = CountedHistogram(
            "broker_serve_replica_processing_seconds",
            "From a request's pickup by a replica to its last reply event.",
            [*labels, "method"])
        self._queue_wait = CountedHistogram(
            "broker_serve_replica_queue_wait_seconds",
            "From the caller's publish (header bs-published-us) to the replica's pickup.",
            labels).labels(application, deployment)
        self.ongoing = Gauge(
            "broker_serve_replica_ongoing_requests", "Requests the replica is running.",
            [*labels, "replica"], registry=None, multiprocess_mode="livesum",
        ).labels(application, deployment, replica_id)
        self._errors = Counter(
            "broker_serve_replica_errors_total",
            "Requests that ended in an error event, or in an HTTP response of status >= 500.",
            [*labels, "status"], registry=None)
        self._batch_size = Histogram(
            "broker_serve_replica_batch_size", "Items per @serve.batch call.", labels,
            buckets=BATCH_BUCKETS, registry=None)
        self._model_loads = Counter(
            "broker_serve_replica_model_loads_total",
            "Models a @serve.multiplexed loader loaded (cache misses).", labels, registry=None)
        # Neither moves in a healthy cluster: the benchmark reports both beside its figures.
        self.redeliveries = Counter(
            "broker_serve_replica_redeliveries_total",
            "Requests this replica took that RabbitMQ had delivered before (redelivered).",
            labels, registry=None).labels(application, deployment)
        self.channels_lost = Counter(
            "broker_serve_replica_channels_lost_total",
            "Channels of this replica that RabbitMQ closed while it was using them.",
            labels, registry=None).labels(application, deployment)
        self._refused = Counter(
            "broker_serve_replica_refused_messages_total",
            "Messages this replica refused unread at a limit: message_too_large.",
            [*labels, "reason"], registry=None)
        self._processing_local: dict[str, tuple[LocalHistogram, CountedHistogramChild]] = {}
        self._queue_wait_local = LocalHistogram()
        self._error_children: dict[int, Any] = {}
        # Every request's processing time since the start but WebSocket sessions' (they last
        # minutes), for the metrics history; added to at each flush, never reset.
        self._recorded = LocalHistogram()

    def finished(self, method: str, seconds: float, status: int, error: bool) -> None:
        processing = self._processing_local.get(method)
        if processing is None:
            processing = self._processing_local[method] = (
                LocalHistogram(), self._processing.labels(self.application, self.deployment,
                                                          method))
        processing[0].observe(seconds)
        if error:
            errors = self._error_children.get(status)
            if errors is None:
                errors = self._error_children[status] = self._errors.labels(
                    self.application, self.deployment, str(status))
            errors.inc()

    def waited(self, seconds: float) -> None:
        self._queue_wait_local.observe(seconds)

    def refused(self, reason: str) -> None:
        self._refused.labels(self.application, self.deployment, reason).inc()

    def flush(self, ongoing: int) -> None:
        """Move the observations into the multiprocess files, and set the ongoing gauge."""
        for method, (local, counted) in self._processing_local.items():
            if method != "websocket":
                self._recorded.add(local)
            local.move_into(counted)
        self._queue_wait_local.move_into(self._queue_wait)
        self.ongoing.set(ongoing)

    async def flush_loop(self, ongoing: Callable[[], int], stopping: asyncio.Event) -> None:
        """Flush every `FLUSH_S` until `stopping`, and once more then."""
        while not stopping.is_set():
            self.flush(ongoing())
            try:
                await asyncio.wait_for(stopping.wait(), FLUSH_S)
            except TimeoutError:
                pass
        self.flush(ongoing())

    def processing_totals(self) -> dict[tuple[str, str], tuple[list[int], float]]:
        """The processing histogram so far, by (application, deployment), for the history."""
        return {(self.application, self.deployment): self._recorded.totals()}

    def batch_size_child(self) -> Any:
        return self._batch_size.labels(self.application, self.deployment)

    def model_loads_child(self) -> Any:
        return self._model_loads.labels(self.application, self.deployment)


_replica_metrics: ReplicaMetrics | None = None


def set_replica_metrics(metrics: ReplicaMetrics | None) -> None:
    global _replica_metrics
    _replica_metrics = metrics


def replica_child(kind: str) -> Any:
    """The batch-size histogram ("batch_size") or model-load counter ("model_loads") child
    of this replica, or None outside a replica. Batching and multiplexing call this once per
    queue or cache, not per call."""
    if _replica_metrics is None:
        return None
    if kind == "batch_size":
        return _replica_metrics.batch_size_child()
    return _replica_metrics.model_loads_child()


class NodeMetricsServer:
    """The worker node's `/metrics`: its replicas' multiprocess files, aggregated.

    The directory is the node's own, made when it starts serving and removed when it stops.
    Counters and histograms of replicas that exited stay in it (their totals must not go
    back), and the live gauges of each exited replica are dropped (`process_exited`)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.directory: str | None = None
        self._server: Any = None

    def start(self) -> int | None:
        """Listen; returns the port, or None (with a warning) if it is 0 or taken. Replicas
        started while there is no endpoint keep their metrics to themselves."""
        if not self.port:
            return None
        from prometheus_client import start_http_server

        directory = tempfile.mkdtemp(prefix="broker-serve-metrics-")
        registry = CollectorRegistry()
        collector = multiprocess.MultiProcessCollector
        replicas = collector(None, path=directory)  # type: ignore[no-untyped-call]
        registry.register(HistogramsOfCounters(replicas))
        try:
            self._server, _ = start_http_server(self.port, self.host, registry)
        except OSError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            log.warning("not serving the replicas' metrics: cannot listen on %s:%d (%s)",
                        self.host, self.port, exc)
            return None
        self.directory = directory
        port = int(self._server.server_address[1])
        log.info("replica metrics on http://%s:%d/metrics", self.host, port)
        return port

    def env(self) -> dict[str, str]:
        """What a replica process needs to write its metrics here."""
        return {MULTIPROC_ENV: self.directory} if self.directory else {}

    def process_exited(self, pid: int) -> None:
        if self.directory is None:
            return
        try:
            multiprocess.mark_process_dead(pid, self.directory)  # type: ignore[no-untyped-call]
        except OSError as exc:
            log.warning("could not drop the gauges of process %d: %s", pid, exc)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


# controller -------------------------------------------------------------------------------------
QueueDepth = Callable[[str], Awaitable[int]]
JobCounts = Callable[[], Awaitable[dict[str, int]]]  # the hash `bs:<cluster>:jobs:counts`
DeadLetterDepth = Callable[[], Awaitable[int]]
_FINISHED = ("SUCCEEDED", "FAILED", "CANCELLED")


class JobMetrics(Collector):
    """The job counts (docs/protocol.md, "The job record") of the deployments the controller
    knows, as they were read at the last scrape, and the dead-letter queue's depth.

    A Collector rather than Gauges: the values are Redis's, read in one HGETALL per scrape, and
    a deployment that is gone has no series without anything to clear. The totals are counters
    (their fields only ever go up) and start at 0 for every known deployment, so that the
    first job counts in `rate()`."""

    def __init__(self) -> None:
        self._counts: dict[str, int] | None = None  # None: not read (a gap, not zeros)
        self._deployments: list[tuple[str, str]] = []
        self._dead_letters: int | None = None

    def update(self, counts: dict[str, int] | None, deployments: Iterable[tuple[str, str]],
               dead_letters: int | None) -> None:
        self._counts = counts
        self._deployments = sorted(deployments)
        self._dead_letters = dead_letters

    def clear(self) -> None:
        self.update(None, (), None)

    def collect(self) -> Iterator[Metric]:
        if self._dead_letters is not None:
            yield GaugeMetricFamily(
                "broker_serve_dead_letters",
                "Messages in the dead-letter queue bs.<cluster>.dead, read when scraped.",
                value=self._dead_letters)
        if self._counts is None:
            return
        known = set(self._deployments)
        labels = ["application", "deployment"]
        jobs = GaugeMetricFamily(
            "broker_serve_jobs", "Jobs now PENDING (queued, or waiting to retry) or RUNNING, "
            "by priority.", labels=[*labels, "status", "priority"])
        finished = {key: dict.fromkeys(_FINISHED, 0) for key in self._deployments}
        retries = dict.fromkeys(self._deployments, 0)
        dead = dict.fromkeys(self._deployments, 0)
        for field, count in self._counts.items():
            kind, _, rest = field.partition("|")
            if kind in ("retries", "dead"):
                app, _, name = rest.partition("|")
                if (app, name) in known:
                    (retries if kind == "retries" else dead)[(app, name)] = count
                continue
            priority, _, where = rest.partition("|")
            app, _, name = where.partition("|")
            if (app, name) not in known:
                continue
            if kind in _FINISHED:
                finished[(app, name)][kind] += count
            else:
                jobs.add_metric([app, name, kind, priority], count)
        ended = CounterMetricFamily(
            "broker_serve_jobs_finished", "Jobs that ended, by how.",
            labels=[*labels, "status"])
        retried = CounterMetricFamily(
            "broker_serve_job_retries", "Failed job attempts that were run again.",
            labels=labels)
        dead_lettered = CounterMetricFamily(
            "broker_serve_job_dead_letters", "Failed jobs published to the dead-letter queue.",
            labels=labels)
        for key in self._deployments:
            for status, count in finished[key].items():
                ended.add_metric([*key, status], count)
            retried.add_metric(list(key), retries[key])
            dead_lettered.add_metric(list(key), dead[key])
        yield from (jobs, ended, retried, dead_lettered)


class ControllerMetrics:
    """The controller's metrics. Only the leader reports deployments: a standby's gauges are
    empty, so dashboards can take the maximum over controllers."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or _process_registry()
        labels = ["application", "deployment"]
        self._queue_depth = Gauge(
            "broker_serve_controller_queue_depth",
            "Requests waiting in the deployment's queue, read when scraped.", labels,
            registry=self.registry)
        self._replicas = Gauge(
            "broker_serve_controller_replicas", "Replicas of the deployment by state.",
            [*labels, "state"], registry=self.registry)
        self._decisions = Counter(
            "broker_serve_controller_autoscaling_decisions_total",
            "Changes of a deployment's replica count by the autoscaler.",
            [*labels, "direction"], registry=self.registry)
        self._leader = Gauge("broker_serve_controller_is_leader",
                             "1 if this controller holds the lease and acts, else 0.",
                             registry=self.registry)
        self._jobs = JobMetrics()
        self.registry.register(self._jobs)
        self.leader = False
        self._queues: dict[tuple[str, str], str] = {}
        self._leader.set(0)

    def set_leader(self, leader: bool) -> None:
        if self.leader and not leader:  # a standby reports no deployments
            self._replicas.clear()
            self._queue_depth.clear()
            self._jobs.clear()
            self._queues = {}
        self.leader = leader
        self._leader.set(1 if leader else 0)

    def set_deployments(self, apps: dict[str, Any], statuses: dict[str, Any]) -> None:
        """After a reconcile: the deployments' queues and replica counts by state."""
        self._queues = {(app, name): dep["queue"] for app, record in apps.items()
                        for name, dep in record.get("deployments", {}).items()}
        self._replicas.clear()
        for app, status in statuses.items():
            for name, deployment in status.get("deployments", {}).items():
                for state, count in deployment.get("replica_states", {}).items():
                    self._replicas.labels(app, name, state).set(count)

    def autoscaled(self, application: str, deployment: str, direction: str) -> None:
        self._decisions.labels(application, deployment, direction).inc()

    async def render(self, depth_of: QueueDepth | None = None,
                     job_counts: JobCounts | None = None,
                     dead_letters: DeadLetterDepth | None = None) -> bytes:
        """The exposition; the leader first reads each deployment's queue depth, the job
        counts and the dead-letter queue's depth."""
        if self.leader and job_counts is not None:
            await self._read_jobs(job_counts, dead_letters)
        if self.leader and depth_of is not None:
            depths = {}
            for key, queue in list(self._queues.items()):
                try:
                    depths[key] = await depth_of(queue)
                except Exception as exc:  # noqa: BLE001 - a scrape shows what it can
                    log.debug("no depth for %s: %s", queue, exc)
            self._queue_depth.clear()  # deleted deployments go
            for (app, name), depth in depths.items():
                self._queue_depth.labels(app, name).set(depth)
        return generate_latest(self.registry)

    async def _read_jobs(self, job_counts: JobCounts, dead_letters: DeadLetterDepth | None
                         ) -> None:
        counts: dict[str, int] | None
        try:
            counts = await job_counts()
        except Exception as exc:  # noqa: BLE001 - a scrape shows what it can
            log.debug("no job counts: %s", exc)
            counts = None
        depth = None
        if dead_letters is not None:
            try:
                depth = await dead_letters()
            except Exception as exc:  # noqa: BLE001
                log.debug("no dead-letter queue depth: %s", exc)
        self._jobs.update(counts, list(self._queues), depth)
