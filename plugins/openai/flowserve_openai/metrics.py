"""Prometheus metrics with vLLM's names and label names under the ``flowserve:`` prefix, one
registry per app.

Histograms and counters are recorded by the frontend when a request ends; gauges (running
and waiting requests, KV cache usage, instances by state) and the counters the instances keep
(prefix cache, preemptions, KV transfers) are read from the deployments when Prometheus
scrapes. Every series has vLLM's ``model_name`` label (the deployment's name); finish reasons
are vLLM's ``finished_reason``. The series of a removed deployment go at the next scrape.
docs/observability.md lists them, and the vLLM metrics FlowServe does not have.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

if TYPE_CHECKING:
    from flowserve_core.deployment import Deployment
    from flowserve_core.server import Server

# vLLM's buckets, so that dashboards built for vLLM read these the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
COLD_START_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
#: vLLM's 1-2-5 series for token counts (it stops at max_model_len; this at a million)
TOKEN_BUCKETS = tuple(float(m * 10**e) for e in range(7) for m in (1, 2, 5) if m * 10**e <= 1_000_000)
MODEL = "model_name"  # vLLM's label names, so dashboards made for vLLM select the same series


class ServerMetrics:
    """The app's Prometheus registry and the instruments the frontend records into."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, server: Server):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("flowserve:time_to_first_token_seconds", "Time to first token.",
                              [MODEL], buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("flowserve:inter_token_latency_seconds", "Time between output tokens.",
                             [MODEL], buckets=ITL_BUCKETS, registry=r)
        self.tpot = Histogram("flowserve:request_time_per_output_token_seconds",
                              "Per request: time from the first token to the last over the tokens after the first.",
                              [MODEL], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("flowserve:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             [MODEL], buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("flowserve:request_queue_time_seconds", "Time a request waited to be scheduled.",
                               [MODEL], buckets=REQUEST_BUCKETS, registry=r)
        self.inference = Histogram("flowserve:request_inference_time_seconds",
                                   "Time from first scheduled to the last token (prefill and decode).",
                                   [MODEL], buckets=REQUEST_BUCKETS, registry=r)
        self.prefill = Histogram("flowserve:request_prefill_time_seconds",
                                 "Time from first scheduled to the first token.", [MODEL], buckets=REQUEST_BUCKETS,
                                 registry=r)
        self.decode = Histogram("flowserve:request_decode_time_seconds", "Time from the first token to the last.",
                                [MODEL], buckets=REQUEST_BUCKETS, registry=r)
        self.request_prompt_tokens = Histogram("flowserve:request_prompt_tokens", "Prompt tokens per request.",
                                               [MODEL], buckets=TOKEN_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram("flowserve:request_generation_tokens",
                                                   "Generated tokens per request.", [MODEL], buckets=TOKEN_BUCKETS,
                                                   registry=r)
        self.max_tokens_param = Histogram("flowserve:request_params_max_tokens",
                                          "The max_tokens of requests that set one.", [MODEL],
                                          buckets=TOKEN_BUCKETS, registry=r)
        self.prompt_tokens = Counter("flowserve:prompt_tokens", "Prompt tokens of finished requests.",
                                     [MODEL], registry=r)
        self.generation_tokens = Counter("flowserve:generation_tokens", "Generated tokens.", [MODEL], registry=r)
        self.success = Counter("flowserve:request_success", "Finished requests by finish reason.",
                               [MODEL, "finished_reason"], registry=r)
        self._per_model = (self.ttft, self.itl, self.tpot, self.e2e, self.queue, self.inference, self.prefill,
                           self.decode, self.request_prompt_tokens, self.request_generation_tokens,
                           self.max_tokens_param, self.prompt_tokens, self.generation_tokens)
        self.server = server
        #: the models (and their finish reasons) that have series in the instruments above
        self._recorded: dict[str, set[str]] = {}
        self._collector = _DeploymentCollector(server)
        r.register(self._collector)

    def request_finished(self, model: str, handle: Any, inter_token_latencies: list[float]) -> None:
        """Record one ended request (``handle`` is its ``RequestHandle``)."""
        output, request = handle.output, handle.request
        generated = len(output.output_token_ids)
        timing = output.metrics
        if timing is not None:
            scheduled, first, finished = timing.scheduled_time, timing.first_token_time, timing.finished_time
            if first is not None:
                self.ttft.labels(model).observe(first - timing.arrival_time)
            if scheduled is not None:
                self.queue.labels(model).observe(scheduled - timing.arrival_time)
            if finished is not None:
                self.e2e.labels(model).observe(finished - timing.arrival_time)
            if scheduled is not None and finished is not None:
                self.inference.labels(model).observe(finished - scheduled)
            if scheduled is not None and first is not None:
                self.prefill.labels(model).observe(first - scheduled)
            if first is not None and finished is not None:
                self.decode.labels(model).observe(finished - first)
                if generated > 1:
                    self.tpot.labels(model).observe((finished - first) / (generated - 1))
        itl = self.itl.labels(model)
        for latency in inter_token_latencies:
            itl.observe(latency)
        self.prompt_tokens.labels(model).inc(len(request.prompt_token_ids))
        self.generation_tokens.labels(model).inc(generated)
        self.request_prompt_tokens.labels(model).observe(len(request.prompt_token_ids))
        self.request_generation_tokens.labels(model).observe(generated)
        if request.params.max_tokens is not None:
            self.max_tokens_param.labels(model).observe(request.params.max_tokens)
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
            for instrument in self._per_model:
                with contextlib.suppress(KeyError):
                    instrument.remove(model)
            for reason in self._recorded.pop(model):
                with contextlib.suppress(KeyError):
                    self.success.remove(model, reason)
        self._collector.forget(served)


class _DeploymentCollector:
    """Reads the deployments' load when scraped. Prefix-cache counters sum the instances'
    own counters, keeping what instances that went away had counted."""

    def __init__(self, server: Server):
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
                                    labels=[MODEL])
        waiting = GaugeMetricFamily("flowserve:num_requests_waiting", "Requests waiting to run.", labels=[MODEL])
        kv = GaugeMetricFamily("flowserve:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).",
                               labels=[MODEL])
        instances = GaugeMetricFamily("flowserve:num_instances", "Engine instances by state.",
                                      labels=[MODEL, "state"])
        by_path = GaugeMetricFamily("flowserve:num_instances_by_start_path",
                                    "Engine instances not gone, by how they started (unknown until ready).",
                                    labels=[MODEL, "path"])
        scale_events = CounterMetricFamily("flowserve:scale_events",
                                           "Instances the scaler started (up) and that ended (down).",
                                           labels=[MODEL, "direction"])
        hits = CounterMetricFamily("flowserve:prefix_cache_hits", "Prefix-cache hits the KV cache managers counted.",
                                   labels=[MODEL])
        queries = CounterMetricFamily("flowserve:prefix_cache_queries",
                                      "Prefix-cache lookups the KV cache managers counted.", labels=[MODEL])
        preemptions = CounterMetricFamily("flowserve:num_preemptions", "Requests the batch schedulers preempted.",
                                          labels=[MODEL])
        role_waiting = GaugeMetricFamily("flowserve:role_num_requests_waiting",
                                         "Tasks waiting on the instances of each role (PD: prefill, decode).",
                                         labels=[MODEL, "role"])
        role_prefill = GaugeMetricFamily("flowserve:role_waiting_prefill_tokens",
                                         "Prompt tokens queued for prefill on the instances of each role.",
                                         labels=[MODEL, "role"])
        kv_bytes = CounterMetricFamily("flowserve:kv_transfer_bytes",
                                       "KV bytes decode instances imported from prefill instances.", labels=[MODEL])
        kv_seconds = CounterMetricFamily("flowserve:kv_transfer_seconds",
                                         "Seconds decode instances spent fetching KV handoffs.", labels=[MODEL])
        for name, deployment in list(self.server.deployments.items()):
            stats = deployment.stats()
            running.add_metric([name], stats.num_running)
            waiting.add_metric([name], stats.num_waiting)
            kv.add_metric([name], stats.kv_used_blocks / stats.kv_total_blocks if stats.kv_total_blocks else 0.0)
            for state, count in stats.instances.items():
                instances.add_metric([name, state], count)
            paths: dict[str, int] = {}
            for instance in list(deployment.pool.instances.values()):
                path = instance.info.start_path or "unknown"
                paths[path] = paths.get(path, 0) + 1
            for path, count in sorted(paths.items()):
                by_path.add_metric([name, path], count)
            scale_events.add_metric([name, "up"], deployment.pool.started)
            scale_events.add_metric([name, "down"], deployment.pool.stopped)
            totals = self._totals(name, deployment)
            hits.add_metric([name], totals[0])
            queries.add_metric([name], totals[1])
            kv_bytes.add_metric([name], totals[2])
            kv_seconds.add_metric([name], totals[3])
            preemptions.add_metric([name], totals[4])
            by_role: dict[str, list[int]] = {}
            for instance in list(deployment.pool.instances.values()):
                counts = by_role.setdefault(instance.info.role.value, [0, 0])
                counts[0] += instance.stats.scheduler.num_waiting
                counts[1] += instance.stats.scheduler.waiting_prefill_tokens
            for role, (tasks, tokens) in by_role.items():
                role_waiting.add_metric([name, role], tasks)
                role_prefill.add_metric([name, role], tokens)
            self._cold_starts.note(name, deployment)
        return [running, waiting, kv, instances, by_path, scale_events, hits, queries, preemptions, role_waiting,
                role_prefill, kv_bytes, kv_seconds, self._cold_starts.family()]

    def _totals(self, name: str, deployment: Deployment) -> list[float]:
        """Prefix hits, prefix queries, KV bytes and seconds imported, preemptions: what the
        instances count, plus what instances that went away had counted."""
        current = {instance_id: (instance.stats.kv.prefix_hits, instance.stats.kv.prefix_queries,
                                 instance.stats.scheduler.kv_transfer_bytes, instance.stats.scheduler.kv_transfer_seconds,
                                 instance.stats.scheduler.num_preemptions)
                   for instance_id, instance in list(deployment.pool.instances.items())}
        retired = self._retired.setdefault(name, [0, 0, 0, 0.0, 0])
        for instance_id, counts in self._last.get(name, {}).items():
            if instance_id not in current:
                for i, count in enumerate(counts):
                    retired[i] += count
        self._last[name] = current
        return [retired[i] + sum(counts[i] for counts in current.values()) for i in range(len(retired))]


class _ColdStarts:
    """Instance start times by start path (naive, prewarmed, preloaded, forked, in-process),
    counted once per instance when a scrape first sees it started (an instance that starts
    and ends between two scrapes is not counted)."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], list[int]] = {}
        self._sums: dict[tuple[str, str], float] = {}
        self._seen: dict[str, set[str]] = {}

    def note(self, name: str, deployment: Deployment) -> None:
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
                                       labels=[MODEL, "path"])
        for key, counts in sorted(self._buckets.items()):
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, COLD_START_BUCKETS), "+Inf"], counts):
                cumulative += count
                buckets.append((bound, cumulative))
            family.add_metric(list(key), buckets, self._sums[key])
        return family
