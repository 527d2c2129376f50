"""Prometheus metrics with vLLM's names under the ``flowserve:`` prefix, one registry per app.

Histograms and counters are recorded by the frontend when a request ends; gauges (running
and waiting requests, KV cache usage, instances by state) and the prefix-cache counters are
read from the deployments when Prometheus scrapes. Every series has a ``model`` label (the
deployment's name). The series of a removed deployment go at the next scrape.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

# vLLM's buckets, so that dashboards built for vLLM read these the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
COLD_START_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class ServerMetrics:
    """The app's Prometheus registry and the instruments the frontend records into."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, server: Any):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("flowserve:time_to_first_token_seconds", "Time to first token.",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("flowserve:inter_token_latency_seconds", "Time between output tokens.",
                             ["model"], buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("flowserve:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             ["model"], buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("flowserve:request_queue_time_seconds", "Time a request waited to be scheduled.",
                               ["model"], buckets=REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("flowserve:prompt_tokens", "Prompt tokens of finished requests.",
                                     ["model"], registry=r)
        self.generation_tokens = Counter("flowserve:generation_tokens", "Generated tokens.", ["model"], registry=r)
        self.success = Counter("flowserve:request_success", "Finished requests by finish reason.",
                               ["model", "finish_reason"], registry=r)
        self.server = server
        #: the models (and their finish reasons) that have series in the instruments above
        self._recorded: dict[str, set[str]] = {}
        self._collector = _DeploymentCollector(server)
        r.register(self._collector)

    def request_finished(self, model: str, handle: Any, inter_token_latencies: list[float]) -> None:
        """Record one ended request (``handle`` is its ``RequestHandle``)."""
        output, request = handle.output, handle.request
        timing = output.metrics
        if timing is not None:
            if timing.first_token_time is not None:
                self.ttft.labels(model).observe(timing.first_token_time - timing.arrival_time)
            if timing.scheduled_time is not None:
                self.queue.labels(model).observe(timing.scheduled_time - timing.arrival_time)
            if timing.finished_time is not None:
                self.e2e.labels(model).observe(timing.finished_time - timing.arrival_time)
        itl = self.itl.labels(model)
        for latency in inter_token_latencies:
            itl.observe(latency)
        self.prompt_tokens.labels(model).inc(len(request.prompt_token_ids))
        self.generation_tokens.labels(model).inc(len(output.output_token_ids))
        self.success.labels(model, output.finish_reason or "abort").inc()
        self._recorded.setdefault(model, set()).add(output.finish_reason or "abort")

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        self._forget_removed()
        return generate_latest(self.registry)

    def _forget_removed(self) -> None:
        """Drop the series of deployments that were removed (their children would otherwise
        stay in the registry for ever, one set per name ever served)."""
        served = set(self.server.deployments)
        for model in [m for m in self._recorded if m not in served]:
            for instrument in (self.ttft, self.itl, self.e2e, self.queue, self.prompt_tokens, self.generation_tokens):
                with contextlib.suppress(KeyError):
                    instrument.remove(model)
            for reason in self._recorded.pop(model):
                with contextlib.suppress(KeyError):
                    self.success.remove(model, reason)
        self._collector.forget(served)


class _DeploymentCollector:
    """Reads the deployments' load when scraped. Prefix-cache counters sum the instances'
    own counters, keeping what instances that went away had counted."""

    def __init__(self, server: Any):
        self.server = server
        self._retired: dict[str, list[float]] = {}
        self._last: dict[str, dict[str, tuple]] = {}
        self._cold_starts = _ColdStarts()

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: the registry must not read the deployments at registration."""
        return []

    def forget(self, served: set[str]) -> None:
        """Drop what is kept of deployments no longer ``served``."""
        for table in (self._retired, self._last):
            for name in [n for n in table if n not in served]:
                del table[name]
        self._cold_starts.forget(served)

    def collect(self) -> Iterable[Metric]:
        """The gauges and prefix-cache counters, read now."""
        running = GaugeMetricFamily("flowserve:num_requests_running", "Requests running on an instance.",
                                    labels=["model"])
        waiting = GaugeMetricFamily("flowserve:num_requests_waiting", "Requests waiting to run.", labels=["model"])
        kv = GaugeMetricFamily("flowserve:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).",
                               labels=["model"])
        instances = GaugeMetricFamily("flowserve:num_instances", "Engine instances by state.",
                                      labels=["model", "state"])
        hits = CounterMetricFamily("flowserve:prefix_cache_hits", "Prefix-cache hits the KV cache managers counted.",
                                   labels=["model"])
        queries = CounterMetricFamily("flowserve:prefix_cache_queries",
                                      "Prefix-cache lookups the KV cache managers counted.", labels=["model"])
        role_waiting = GaugeMetricFamily("flowserve:role_num_requests_waiting",
                                         "Tasks waiting on the instances of each role (PD: prefill, decode).",
                                         labels=["model", "role"])
        role_prefill = GaugeMetricFamily("flowserve:role_waiting_prefill_tokens",
                                         "Prompt tokens queued for prefill on the instances of each role.",
                                         labels=["model", "role"])
        kv_bytes = CounterMetricFamily("flowserve:kv_transfer_bytes",
                                       "KV bytes decode instances imported from prefill instances.", labels=["model"])
        kv_seconds = CounterMetricFamily("flowserve:kv_transfer_seconds",
                                         "Seconds decode instances spent fetching KV handoffs.", labels=["model"])
        for name, deployment in list(self.server.deployments.items()):
            stats = deployment.stats()
            running.add_metric([name], stats.num_running)
            waiting.add_metric([name], stats.num_waiting)
            kv.add_metric([name], stats.kv_used_blocks / stats.kv_total_blocks if stats.kv_total_blocks else 0.0)
            for state, count in stats.instances.items():
                instances.add_metric([name, state], count)
            totals = self._totals(name, deployment)
            hits.add_metric([name], totals[0])
            queries.add_metric([name], totals[1])
            kv_bytes.add_metric([name], totals[2])
            kv_seconds.add_metric([name], totals[3])
            by_role: dict[str, list[int]] = {}
            for instance in list(deployment.pool.instances.values()):
                counts = by_role.setdefault(instance.info.role.value, [0, 0])
                counts[0] += instance.stats.scheduler.num_waiting
                counts[1] += instance.stats.scheduler.waiting_prefill_tokens
            for role, (tasks, tokens) in by_role.items():
                role_waiting.add_metric([name, role], tasks)
                role_prefill.add_metric([name, role], tokens)
            self._cold_starts.note(name, deployment)
        return [running, waiting, kv, instances, hits, queries, role_waiting, role_prefill, kv_bytes, kv_seconds,
                self._cold_starts.family()]

    def _totals(self, name: str, deployment: Any) -> list[float]:
        """Prefix hits, prefix queries, KV bytes and seconds imported: what the instances count,
        plus what instances that went away had counted."""
        current = {instance_id: (instance.stats.kv.prefix_hits, instance.stats.kv.prefix_queries,
                                 instance.stats.scheduler.kv_transfer_bytes, instance.stats.scheduler.kv_transfer_seconds)
                   for instance_id, instance in list(deployment.pool.instances.items())}
        retired = self._retired.setdefault(name, [0, 0, 0, 0.0])
        for instance_id, counts in self._last.get(name, {}).items():
            if instance_id not in current:
                for i, count in enumerate(counts):
                    retired[i] += count
        self._last[name] = current
        return [retired[i] + sum(counts[i] for counts in current.values()) for i in range(4)]


class _ColdStarts:
    """Instance start times by start path (naive, prewarmed, preloaded, forked, in-process),
    counted once per instance when a scrape first sees it started (an instance that starts
    and ends between two scrapes is not counted)."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], list[int]] = {}
        self._sums: dict[tuple[str, str], float] = {}
        self._seen: dict[str, set[str]] = {}

    def note(self, name: str, deployment: Any) -> None:
        seen, live = self._seen.setdefault(name, set()), set()
        for instance_id, instance in list(deployment.pool.instances.items()):
            live.add(instance_id)
            info = instance.info
            if instance_id in seen or not info.start_seconds:
                continue
            seen.add(instance_id)
            key = (name, info.start_path or "unknown")
            counts = self._buckets.setdefault(key, [0] * (len(COLD_START_BUCKETS) + 1))
            index = next((i for i, bound in enumerate(COLD_START_BUCKETS) if info.start_seconds <= bound),
                         len(COLD_START_BUCKETS))
            counts[index] += 1
            self._sums[key] = self._sums.get(key, 0.0) + info.start_seconds
        seen &= live  # ids of instances that are gone never come back

    def forget(self, served: set[str]) -> None:
        """Drop the start times of deployments no longer ``served``."""
        for name in [n for n in self._seen if n not in served]:
            del self._seen[name]
        for key in [k for k in self._buckets if k[0] not in served]:
            del self._buckets[key], self._sums[key]

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily("flowserve:instance_cold_start_seconds",
                                       "Time from a scaler starting an instance to it being ready, by start path.",
                                       labels=["model", "path"])
        for key, counts in sorted(self._buckets.items()):
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, COLD_START_BUCKETS), "+Inf"], counts):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(key), buckets, self._sums[key])
        return family
